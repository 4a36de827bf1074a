"""Clear what a force-stopped Ray left on the ports `serving up` binds, and name whatever else holds them.

After `ray stop --force` (or kill -9 of the driver) Ray Serve's HAProxy can outlive Ray, reparented to
init, still bound to the gateway port and to its stats and metrics ports; the next `serving up` then
fails deep inside Ray with HAProxy's bind errors in a log. `clear_leftovers` runs before Ray starts:
it stops such an orphaned HAProxy and raises a `PortInUseError` (a `ConfigError`: the CLI prints
`error: ...` and exits 2) for anything else on those ports.

An HAProxy counts as left over only when all of these hold:
  - its name (or executable) is `haproxy`;
  - its command line names Ray Serve's config file: `RAY_SERVE_HAPROXY_CONFIG_FILE_LOC` (default
    /tmp/haproxy-serve/haproxy.cfg), which Ray Serve places in a per-node folder, e.g.
    /tmp/haproxy-serve/<node id>/haproxy.cfg;
  - no live Ray process (a `ray::...` worker, `raylet`, `gcs_server`) is among its ancestors: Ray
    Serve starts HAProxy from its `ray::HAProxyManager` actor, so a running platform's HAProxy always
    has one, and an orphan's parent is init (or a subreaper such as `systemd --user`).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable, Mapping

import psutil

from serving.config import ConfigError, ServingConfig

RAY_HAPROXY_CONFIG = "/tmp/haproxy-serve/haproxy.cfg"
"""Ray Serve's default RAY_SERVE_HAPROXY_CONFIG_FILE_LOC (ray/serve/_private/constants.py)."""

HAPROXY_PORTS = {"haproxy_stats": ("RAY_SERVE_HAPROXY_STATS_PORT", 8404),
                 "haproxy_metrics": ("RAY_SERVE_HAPROXY_METRICS_PORT", 9101)}
"""platform_ports' names for the HAProxy ports -> (the variable Ray Serve reads, Ray's default)."""

HINTS = {"gateway": "pass --port (or set gateway.port)",
         "metrics": "set gateway.metrics_port",
         "haproxy_stats": "set RAY_SERVE_HAPROXY_STATS_PORT",
         "haproxy_metrics": "set RAY_SERVE_HAPROXY_METRICS_PORT"}
"""What a user can do instead of freeing the port, by platform_ports' name."""

RAY_DAEMONS = {"raylet", "gcs_server"}


class PortInUseError(ConfigError):
    """A port `serving up` needs is held by a process it must not (or cannot) stop."""


def platform_ports(config: ServingConfig, environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """The ports a local `serving up` binds, by name: gateway, metrics and, in HAProxy mode, HAProxy's.

    HAProxy mode is on unless RAY_SERVE_ENABLE_HA_PROXY is set to something other than "1" (the CLI
    sets it to "1" when unset); its stats and metrics ports come from the variables Ray Serve reads,
    with Ray's defaults 8404 and 9101. `environ` defaults to os.environ.

    Raises:
        ConfigError: a HAProxy port variable is not a port number.
    """
    environ = os.environ if environ is None else environ
    ports = {"gateway": config.gateway.port, "metrics": config.gateway.metrics_port}
    if environ.get("RAY_SERVE_ENABLE_HA_PROXY", "1") == "1":
        for name, (variable, default) in HAPROXY_PORTS.items():
            ports[name] = _env_port(environ, variable, default)
    return ports


def _env_port(environ: Mapping[str, str], variable: str, default: int) -> int:
    """The port number in `variable`, `default` when it is unset or empty.

    Raises:
        ConfigError: the value is not an integer in 1..65535.
    """
    text = environ.get(variable, "").strip()
    if not text:
        return default
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ConfigError(f"{variable}={text!r} is not a port number (1-65535)")
    return port


def clear_leftovers(ports: Mapping[str, int], *, config_location: str | None = None,
                    timeout_s: float = 5.0) -> list[str]:
    """Stop the HAProxy a previous Ray Serve left on `ports`; a line for each process stopped.

    `ports` maps a name (platform_ports' names get a matching hint in errors) to a port. Any process
    listening on one of them (on any address: Ray Serve's HAProxy binds all interfaces) is examined;
    nothing is stopped unless every listener is a left-over HAProxy. `config_location` is Ray Serve's
    HAProxy config file location (default: RAY_SERVE_HAPROXY_CONFIG_FILE_LOC, else Ray's default);
    SIGTERM, then SIGKILL after `timeout_s`.

    Raises:
        PortInUseError: a port is held by anything else (a running platform's HAProxy included), by a
            process this user cannot inspect or stop, or is still held after the HAProxy stopped.
    """
    location = config_location or os.environ.get("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC") or RAY_HAPROXY_CONFIG
    leftovers, problems = _survey(ports, location)
    if problems:
        raise PortInUseError("\n".join(problems))
    done = []
    for proc, held in leftovers.values():
        described = _describe(proc)  # before it ends: an ended process has no command line
        _stop(proc, held, timeout_s)
        done.append(f"stopped {described}, an HAProxy left by a previous Ray Serve on port(s) "
                    f"{', '.join(map(str, held))}")
    _check_released({port for _, held in leftovers.values() for port in held})
    return done


def _survey(ports: Mapping[str, int], location: str) -> tuple[dict[int, tuple[psutil.Process, list[int]]],
                                                               list[str]]:
    """The left-over HAProxies on `ports` (pid -> (process, its ports)) and a line per other holder.

    Raises nothing: what cannot be inspected becomes a problem line.
    """
    leftovers: dict[int, tuple[psutil.Process, list[int]]] = {}
    problems: list[str] = []
    listening = _listening_pids(ports.values())
    for name, port in ports.items():
        where = f"port {port} ({name})"
        fix = HINTS.get(name, "choose another port")
        for pid in listening[port]:
            if pid is None:
                problems.append(f"{where} is in use by a process this user cannot inspect; stop it or {fix}")
                continue
            try:
                proc = psutil.Process(pid)
                if is_leftover_haproxy(proc, location):
                    leftovers.setdefault(pid, (proc, []))[1].append(port)
                else:
                    problems.append(f"{where} is in use by {_describe(proc)}{_whose(proc, location)}; "
                                    f"stop it or {fix}")
            except psutil.NoSuchProcess:
                continue  # it ended meanwhile: the port is free (Ray's own bind reports a new holder)
            except psutil.AccessDenied:
                problems.append(f"{where} is in use by pid {pid}, which this user cannot inspect; "
                                f"stop it or {fix}")
    return leftovers, problems


def _listening_pids(ports: Iterable[int]) -> dict[int, set[int | None]]:
    """For each of `ports`, the pids listening on it (TCP, any address); None for an unknown owner.

    Raises nothing: where the system refuses to list connections (macOS without root), a port that
    cannot be bound counts as held by an unknown process.
    """
    found: dict[int, set[int | None]] = {port: set() for port in ports}
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return {port: {None} if _bind_fails(port) else set() for port in found}
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port in found:
            found[conn.laddr.port].add(conn.pid)
    return found


def _bind_fails(port: int) -> bool:
    """Whether binding TCP `port` on all IPv4 interfaces fails (someone listens there)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def is_leftover_haproxy(proc: psutil.Process, config_location: str = RAY_HAPROXY_CONFIG) -> bool:
    """Whether `proc` is Ray Serve's HAProxy (see the module docstring) with no live Ray ancestor.

    Raises:
        psutil.NoSuchProcess: `proc` ended.
        psutil.AccessDenied: its name or command line cannot be read.
    """
    return is_ray_haproxy(proc, config_location) and _ray_ancestor(proc) is None


def is_ray_haproxy(proc: psutil.Process, config_location: str = RAY_HAPROXY_CONFIG) -> bool:
    """Whether `proc` is an haproxy whose command line names Ray Serve's config file location.

    Raises:
        psutil.NoSuchProcess: `proc` ended.
        psutil.AccessDenied: its name or command line cannot be read.
    """
    cmdline = proc.cmdline()
    names = {proc.name(), os.path.basename(cmdline[0]) if cmdline else ""}
    return "haproxy" in names and any(_names_config(arg, config_location) for arg in cmdline[1:])


def _names_config(arg: str, location: str) -> bool:
    """Whether `arg` is `location` or Ray's per-node form of it (`<dir>/<node id>/<file>`)."""
    arg, location = os.path.normpath(arg), os.path.normpath(location)
    folder, file = os.path.split(location)
    return arg == location or (os.path.basename(arg) == file and os.path.dirname(os.path.dirname(arg)) == folder)


def _ray_ancestor(proc: psutil.Process) -> psutil.Process | None:
    """The nearest live ancestor of `proc` that is a Ray process, or None.

    An ancestor that cannot be inspected counts as a Ray process (never stop what might be running).

    Raises:
        psutil.NoSuchProcess: `proc` ended.
    """
    for parent in proc.parents():
        try:
            if _is_ray_process(parent):
                return parent
        except psutil.NoSuchProcess:
            continue
        except psutil.AccessDenied:
            return parent
    return None


def _is_ray_process(proc: psutil.Process) -> bool:
    """A Ray worker (its title `ray::...`), raylet or gcs_server.

    Raises:
        psutil.NoSuchProcess, psutil.AccessDenied: from reading its name or command line.
    """
    name = proc.name()
    cmdline = proc.cmdline()
    title = cmdline[0] if cmdline else ""
    return name in RAY_DAEMONS or name.startswith("ray::") or title.startswith("ray::")


def _whose(proc: psutil.Process, location: str) -> str:
    """For Ray Serve's HAProxy: why it is not stopped (the live Ray process above it); else ''.

    Raises:
        psutil.NoSuchProcess, psutil.AccessDenied: from inspecting `proc`.
    """
    if not is_ray_haproxy(proc, location):
        return ""
    ray = _ray_ancestor(proc)
    if ray is None:
        return ""
    return f", the HAProxy of a running Ray Serve (under {_describe(ray)}; stop that platform first)"


def _describe(proc: psutil.Process, limit: int = 500) -> str:
    """'pid N (command line)', the command line cut at `limit` characters; the name if it is unreadable.

    Raises nothing.
    """
    try:
        # Ray pads its workers' process titles with spaces: one space between words reads better
        text = " ".join(" ".join(proc.cmdline()).split()) or proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        text = "?"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"pid {proc.pid} ({text})"


def _describe_pid(pid: int | None) -> str:
    """_describe for a pid that may be unknown (None) or gone. Raises nothing."""
    if pid is None:
        return "a process this user cannot inspect"
    try:
        return _describe(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return f"pid {pid} (ended)"


def _stop(proc: psutil.Process, ports: list[int], timeout_s: float) -> None:
    """SIGTERM `proc`, SIGKILL it if it is still there after `timeout_s`, and wait for it to go.

    Raises:
        PortInUseError: this user may not signal it, or it outlives SIGKILL by `timeout_s`.
    """
    held = ", ".join(map(str, ports))
    try:
        proc.terminate()
        if _gone(proc, timeout_s):
            return
        proc.kill()
        if _gone(proc, timeout_s):
            return
    except psutil.NoSuchProcess:
        return
    except psutil.AccessDenied as exc:
        raise PortInUseError(f"port(s) {held} are held by {_describe(proc)}, an HAProxy left by a previous "
                             f"Ray Serve, which this user may not stop; stop it as its owner (kill {proc.pid})"
                             ) from exc
    raise PortInUseError(f"port(s) {held}: {_describe(proc)}, an HAProxy left by a previous Ray Serve, "
                         f"did not end within {timeout_s:g}s of SIGKILL")


def _gone(proc: psutil.Process, timeout_s: float) -> bool:
    """Whether `proc` ends (or is a zombie: its sockets are closed) within `timeout_s`.

    Raises nothing.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


RELEASE_WAIT_S = 2.0  # the kernel may list an ended process's listening socket a moment longer (no owner)


def _check_released(ports: set[int]) -> None:
    """Raise if any of `ports` is still listened on RELEASE_WAIT_S after its left-over HAProxy ended.

    Raises:
        PortInUseError: a port is still held (a new holder took it meanwhile).
    """
    deadline = time.monotonic() + RELEASE_WAIT_S
    held = _listening_pids(ports)
    while any(held.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
        held = _listening_pids(ports)
    for port, pids in sorted(held.items()):
        if pids:
            who = ", ".join(_describe_pid(pid) for pid in sorted(pids, key=lambda pid: pid or 0))
            raise PortInUseError(f"port {port} is still in use after the left-over HAProxy stopped: {who}")
