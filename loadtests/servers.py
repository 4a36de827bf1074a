"""Start and stop the servers the benchmark compares, one at a time, each in its own process group.

Also a small command line for the two servers that `serving up` does not start:

    python -m loadtests.servers fake-gateway  --port P [--ttft S] [--itl S]   # create_app + FakeEngine, no Ray
    python -m loadtests.servers fake-platform --port P [--ttft S] [--itl S]   # the Ray Serve app, fake engine
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
FAKE_MODEL = "fake-chat"
BENCH_KEY = "bench-key-0123456789abcdef"  # local benchmark servers only


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def session_of(pid: int | str) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[3])  # fields after the name: state ppid pgrp session


def session_pids(sid: int) -> list[int]:
    """Live processes of a session (a server started with start_new_session has its pid as session id)."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and session_of(p) == sid]


class Server:
    """A server process: started in a new session, ready when `ready_path` answers 200, stopped as a group."""

    def __init__(self, name: str, command: list[str], port: int, log: Path, *, ready_path: str = "/health",
                 env: dict[str, str] | None = None, direct_ingress: bool = False):
        self.name, self.command, self.port, self.log_path = name, command, port, log
        self.ready_path, self.env = ready_path, env or {}
        # Ray Serve's direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS or RAY_SERVE_THROUGHPUT_OPTIMIZED):
        # the gateway replica also serves HTTP on a port of its own (30000+); True: measure that port
        # instead of the configured one (which Ray's proxy, or HAProxy, still serves)
        self.direct_ingress = direct_ingress
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout_s: float = 600) -> "Server":
        try:
            return self._start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout_s: float) -> "Server":
        started = time.monotonic()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w")
        self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **self.env}, start_new_session=True)
        log.close()
        url = f"http://127.0.0.1:{self.port}{self.ready_path}"
        while time.monotonic() - started < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    if self.direct_ingress:
                        self.port = self._replica_port()
                    self.startup_s = time.monotonic() - started
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready in {timeout_s:.0f} s; see {self.log_path}")

    def _replica_port(self) -> int:
        """The HTTP port a gateway replica of this server listens on (from `ss`, Ray may not log it)."""
        import re

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            listing = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
            for line in listing.splitlines():
                port = re.search(r":(\d+)\s", line)
                pid = re.search(r"pid=(\d+)", line)
                if port and pid and 30000 <= int(port.group(1)) < 31000 and session_of(pid.group(1)) == self.proc.pid:
                    return int(port.group(1))
            time.sleep(0.5)
        raise RuntimeError(f"{self.name}: direct ingress asked for, but no replica listens on 30000-30999")

    def stop(self, timeout_s: float = 60) -> None:
        """SIGTERM (`serving up` then shuts Ray down cleanly), then SIGKILL whatever of its session is left."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        # Ray's workers put themselves in process groups of their own but stay in our session
        deadline = time.monotonic() + 20
        while session_pids(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in session_pids(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def plain_vllm(model: Any, port: int, log: Path, env: dict[str, str] | None = None) -> Server:
    """`python -m vllm.entrypoints.openai.api_server` with the exact `vllm serve` arguments of the platform."""
    from serving.engine.vllm_args import serve_argv

    argv, nulls = serve_argv(model)
    if nulls:
        raise ValueError(f"plain vLLM cannot take null arguments: {nulls}")
    # --api-key: plain vLLM checks the same bearer key the platform checks
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *argv, "--host", "127.0.0.1",
               "--port", str(port), "--api-key", BENCH_KEY]
    return Server("plain vLLM", command, port, log, env={**model.env, **(env or {})})


def platform(config_file: Path, port: int, log: Path, env: dict[str, str] | None = None,
             direct_ingress: bool = False) -> Server:
    """`serving up` — what users run. `env` reaches every Ray process (a local Ray inherits the driver's)."""
    command = [sys.executable, "-m", "serving.cli", "up", "--config", str(config_file), "--host", "127.0.0.1",
               "--port", str(port)]
    return Server("platform", command, port, log, ready_path="/ready", env=env, direct_ingress=direct_ingress)


def fake_gateway(port: int, log: Path, ttft_s: float, itl_s: float) -> Server:
    command = [sys.executable, "-m", "loadtests.servers", "fake-gateway", "--port", str(port),
               "--ttft", str(ttft_s), "--itl", str(itl_s)]
    return Server("gateway (fake engine, no Ray)", command, port, log, ready_path="/ready")


def fake_platform(port: int, log: Path, ttft_s: float, itl_s: float, env: dict[str, str] | None = None,
                  direct_ingress: bool = False) -> Server:
    command = [sys.executable, "-m", "loadtests.servers", "fake-platform", "--port", str(port),
               "--ttft", str(ttft_s), "--itl", str(itl_s)]
    return Server("platform (fake engine)", command, port, log, ready_path="/ready", env=env,
                  direct_ingress=direct_ingress)


_CPU_GROUPS = (  # (substring of the command line, group), first match wins
    ("ProxyActor", "proxy"), ("ServeReplica:serving:gateway", "gateway"), ("ServeReplica:", "model replica"),
    ("EngineCore", "engine core"), ("VLLM::", "engine core"), ("vllm.entrypoints.openai.api_server", "vLLM API server"),
    ("loadtests.servers fake-gateway", "gateway"), ("ray::", "ray other"), ("/ray/", "ray other"),
)


def cpu_seconds(sid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the live processes of a session, by role."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) != sid:
            continue
        group = next((g for key, g in _CPU_GROUPS if key in cmd), "other")
        out[group] = out.get(group, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def with_bench_key(data: dict[str, Any]) -> dict[str, Any]:
    """A configuration with the benchmark's API key: the platform is measured with auth on, as deployed."""
    # one key stands for every simulated user: no per-key concurrency cap below the benchmark's concurrency
    return {**data, "auth": {"enabled": True, "keys": [{"name": "bench", "key": BENCH_KEY, "max_concurrent": 100_000}]}}


def fake_config(port: int) -> Any:
    from serving.config import load_config

    return load_config(data=with_bench_key({"models": [{"name": FAKE_MODEL, "source": "fake"}],
                                            "gateway": {"host": "127.0.0.1", "port": port}}))


def _serve_fake_gateway(args: argparse.Namespace) -> None:
    import uvicorn

    from serving.engine.fake import FakeEngine
    from serving.gateway.app import create_app

    config = fake_config(args.port)
    app = create_app(config, {FAKE_MODEL: FakeEngine(FAKE_MODEL, ttft_s=args.ttft, itl_s=args.itl)})
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def _serve_fake_platform(args: argparse.Namespace) -> None:
    import ray
    from ray import serve

    import serving.cli
    from serving.app import deploy, local_resources, logical_cpus_needed

    config = fake_config(args.port)
    for name, value in getattr(serving.cli, "RAY_SERVE_ENV", {}).items():  # the Ray settings `serving up` uses
        os.environ.setdefault(name, value)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    ray.init(num_cpus=max(os.cpu_count() or 1, int(logical_cpus_needed(config) + 0.999)),
             resources=local_resources(config), include_dashboard=False,
             namespace="serving-bench")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        deploy(config, engine="fake", fake_options={"ttft_s": args.ttft, "itl_s": args.itl})
        print(f"ready: http://127.0.0.1:{args.port}/v1", flush=True)
        while not stop:
            time.sleep(0.5)
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.servers")
    parser.add_argument("server", choices=["fake-gateway", "fake-platform"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft", type=float, default=0.0, help="fake engine: seconds to the first token")
    parser.add_argument("--itl", type=float, default=0.0, help="fake engine: seconds between tokens")
    args = parser.parse_args(argv)
    if args.server == "fake-gateway":
        _serve_fake_gateway(args)
    else:
        _serve_fake_platform(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
