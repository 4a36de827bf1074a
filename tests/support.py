"""Helpers shared by the test suites: free ports, a real redis-server, SSE parsing, a raw ASGI client."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from serving.engine.fake import FakeEngine
from serving.engine.vllm import _receiver


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RayCall:
    """Stands in for a streaming Ray call: the replica's generator runs in a task of its own, items and
    errors reach the caller as Ray hands them over, and cancel() cancels the task (as Ray's cancel)."""

    def __init__(self, agen):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.create_task(self._pump(agen))

    async def _pump(self, agen) -> None:
        try:
            async for item in agen:
                self.queue.put_nowait(("item", item))
            self.queue.put_nowait(("end", None))
        except BaseException as exc:  # handed to the caller as Ray would
            self.queue.put_nowait(("error", exc))
            if isinstance(exc, asyncio.CancelledError):
                raise

    def __aiter__(self):
        return self

    async def __anext__(self):
        kind, value = await self.queue.get()
        if kind == "end":
            raise StopAsyncIteration
        if kind == "error":
            raise RuntimeError(f"call failed: {value!r}")
        return value

    def cancel(self) -> None:
        self.task.cancel()



class ReplicaHandle:
    """Stands in for a DeploymentHandle to one ModelServer replica (`server`); `calls` are its RayCalls."""

    def __init__(self, server: Any):
        self.server, self.calls = server, []

    def options(self, **_: Any) -> "ReplicaHandle":
        return self

    @property
    def generate(self) -> "ReplicaHandle":
        return self

    def remote(self, *args: Any, **kwargs: Any) -> RayCall:
        call = RayCall(self.server.generate(*args, **kwargs))
        self.calls.append(call)
        return call

class RedisServer:
    """One redis-server process that can be stopped and started again on the same port."""

    def __init__(self, workdir: Path | None = None):
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server; .ci/run does)")
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="redis-"))
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.paused = False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 10.0) -> "RedisServer":
        assert not self.running, "redis-server is already running"
        log = open(self.workdir / "redis.log", "ab")
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--daemonize", "no", "--protected-mode", "no"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5) as client:
                    if client.ping():
                        return self
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


def sse_payloads(text: str) -> list[str]:
    """Check SSE framing (`data: <payload>\\n\\n` only, ending with one [DONE]) and return the payloads."""
    assert text.endswith("data: [DONE]\n\n"), text[-300:]
    events = text.split("\n\n")
    assert events[-1] == ""
    payloads = []
    for event in events[:-1]:
        assert event.startswith("data: "), event
        assert "\n" not in event, event
        payloads.append(event[len("data: "):])
    assert payloads.count("[DONE]") == 1 and payloads[-1] == "[DONE]"
    return payloads[:-1]


def sse_json(text: str) -> list[dict]:
    return [json.loads(p) for p in sse_payloads(text)]


async def wait_for(predicate, timeout: float = 2.0, interval: float = 0.01) -> bool:
    """Poll `predicate` on the running loop until it holds or `timeout` passes."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            return False
        await asyncio.sleep(interval)
    return True


async def stream_and_hang_up(app, body: dict, *, after_chunks: int | None = None, after_s: float | None = None,
                             key: str | None = None, request_id: str | None = None,
                             spec_version: str = "2.3") -> list[dict]:
    """POST `body` to /v1/chat/completions as a raw ASGI client that goes away after `after_chunks`
    body chunks or `after_s` seconds (httpx's ASGI transport reads whole responses, so it cannot
    hang up mid-answer).

    spec_version 2.3 is what uvicorn (and so Ray Serve) gives: Starlette listens for http.disconnect;
    under 2.4 `send` raises after the hang-up, as an ASGI 2.4 server does."""
    raw = json.dumps(body).encode()
    headers = [(b"host", b"test"), (b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    if key:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000), "server": ("test", 80),
        "headers": headers,
    }
    gone = asyncio.Event()
    sent: list[dict] = []
    if after_s is not None:
        asyncio.get_running_loop().call_later(after_s, gone.set)
    receive = _receiver(raw, gone)  # the body once, then http.disconnect when the client is gone

    async def send(message: dict) -> None:
        if gone.is_set():
            raise OSError("client disconnected")
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            if after_chunks is not None and sum(1 for m in sent if m["type"] == "http.response.body") >= after_chunks:
                gone.set()

    try:
        await asyncio.wait_for(app(scope, receive, send), 5)
    except OSError:
        pass
    except Exception as exc:  # noqa: BLE001 - Starlette raises ClientDisconnect under ASGI 2.4
        assert type(exc).__name__ == "ClientDisconnect", exc
    return sent


_UNCHECKED = object()


def assert_envelope(response: httpx.Response, status: int, *, code: Any = None, param: Any = _UNCHECKED,
                    request_id: bool = False) -> dict:
    """The one OpenAI error envelope, never FastAPI's {"detail": ...}; returns the inner error.
    `param` is checked when given; `request_id`: the response must carry x-request-id."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] == code, error
    if param is not _UNCHECKED:
        assert error["param"] == param, error
    if request_id:
        assert "x-request-id" in response.headers
    return error


@pytest.fixture(autouse=True)
def no_serving_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_config reads SERVING_* variables: keep the caller's environment out of a test's verdict.
    Autouse wherever it is imported (the suites' conftests and the modules that build configurations)."""
    for key in list(os.environ):
        if key.startswith("SERVING_"):
            monkeypatch.delenv(key)


class Recording(FakeEngine):
    """A FakeEngine that keeps each request body it was given, with its route and request id (what the
    engine saw)."""

    def __init__(self, name: str, **kwargs: Any):
        super().__init__(name, **kwargs)
        self.bodies: list[dict[str, Any]] = []

    async def generate(self, route, body, request_id, timeout_s=None, *, affinity=None, adapter=None,
                       adapter_source=None):
        self.bodies.append({"route": route, "_request_id": request_id, "_affinity": affinity, "_adapter": adapter,
                            **json.loads(body)})
        async for item in super().generate(route, body, request_id, timeout_s, adapter=adapter,
                                           adapter_source=adapter_source):
            yield item
