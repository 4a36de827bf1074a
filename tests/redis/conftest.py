"""A real redis-server for the whole session, flushed before every test; FakeEngines, no Ray, no vLLM.

`redis_server` is one `redis-server` (the Debian package) on a free loopback port, without
persistence, in a temporary directory. Tests that need Redis to fail call `redis_server.stop()` and
`redis_server.start()` (same port, so a gateway built before the stop can find it again); a stopped
server is started again before the next test.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
import pytest_asyncio
import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One redis-server process that can be stopped and started again on the same port."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.paused = False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        assert not self.running, "redis-server is already running"
        log = open(self.workdir / "redis.log", "ab")
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--daemonize", "no", "--protected-mode", "no"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5) as client:
                    if client.ping():
                        return
            except redis.RedisError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: "
                                   f"{(self.workdir / 'redis.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING in time")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (its clients' connections are closed, new ones are refused)."""
        self.resume()
        if not self.running:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections still open, but nothing is answered."""
        assert self.running and not self.paused
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.paused and self.running:
            self.process.send_signal(signal.SIGCONT)
        self.paused = False

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def flushall(self) -> None:
        with self.client() as client:
            client.flushall()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    if not os.path.exists(REDIS_SERVER):
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The server's URL, with an empty database; a test that stopped or froze the server gets it back after."""
    redis_server.resume()
    if not redis_server.running:
        redis_server.start()
    redis_server.flushall()
    yield redis_server.url
    redis_server.resume()
    if not redis_server.running:
        redis_server.start()


@pytest.fixture
def redis_client(redis_url: str, redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain synchronous client, to look at what the platform wrote."""
    with redis_server.client() as client:
        yield client


@pytest.fixture(autouse=True)
def _no_serving_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_config reads SERVING_* variables: keep the caller's environment out of these tests."""
    for key in list(os.environ):
        if key.startswith("SERVING_"):
            monkeypatch.delenv(key)


@pytest_asyncio.fixture(loop_scope="function")
async def gateway(redis_url: str):
    """A factory of gateway apps (create_app with FakeEngines) on the session's Redis; closed at the end.

    gateway(**sections) builds the configuration with support.make_config; `engines=` and `store=`
    go to create_app; `config=` replaces the configuration.
    """
    from serving.gateway.app import create_app
    from tests.redis.support import make_config, make_engines

    apps = []

    def build(*, config=None, engines=None, store=None, models=None, **sections):
        config = config or make_config(redis_url, models=models, **sections)
        app = create_app(config, engines if engines is not None else make_engines(), store=store)
        apps.append(app)
        return app

    yield build
    for app in apps:
        services = app.state.services
        await services.drain()
        await services.store.close()
