"""The gateway on fake engines, served by uvicorn in a thread on 127.0.0.1 (no Ray, no vLLM).

Models: fake-a and fake-b answer (fake-a slower to its first token), fake-broken sends an in-band
error event after two tokens, fake-truncated ends its stream without finish_reason or [DONE],
fake-embed is an embedding model. The key TEST_KEY is the only API key.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from serving.engine.fake import FakeEngine
from serving.engine.protocol import Reply
from tests.support import no_serving_env  # noqa: F401 - autouse fixture

ROOT = Path(__file__).resolve().parents[2]
TEST_KEY = "test-key-0123456789abcdef"
FAKE_A = {"ttft_s": 0.03, "itl_s": 0.004}


class TruncatingEngine(FakeEngine):
    """Streams two tokens, then ends without finish_reason and without [DONE] (a cut-off stream)."""

    async def generate(self, route, body, request_id, timeout_s=None, **_routing) -> AsyncIterator[Reply | str]:
        request = json.loads(body)
        if not request.get("stream"):
            async for item in super().generate(route, body, request_id):
                yield item
            return
        yield Reply(200, None)
        for word in ("cut", " off"):
            chunk = {"id": "t", "object": "chat.completion.chunk", "model": request["model"],
                     "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gateway_config(port: int):
    from serving.config import load_config

    return load_config(data={
        "models": [{"name": n, "source": "fake"} for n in ("fake-a", "fake-b", "fake-broken", "fake-truncated")]
        + [{"name": "fake-embed", "source": "fake", "kind": "embed"}],
        "gateway": {"host": "127.0.0.1", "port": port},
        "auth": {"enabled": True, "keys": [{"name": "tests", "key": TEST_KEY}]},
    })


@pytest.fixture(scope="session")
def fake_gateway() -> str:
    """Base URL (…/v1) of the gateway on fake engines."""
    import uvicorn

    from serving.gateway.app import create_app

    port = free_port()
    engines: dict[str, Any] = {
        "fake-a": FakeEngine("fake-a", **FAKE_A),
        "fake-b": FakeEngine("fake-b", ttft_s=0.01, itl_s=0.002),
        "fake-broken": FakeEngine("fake-broken", ttft_s=0.005, itl_s=0.002, fail_after=2),
        "fake-truncated": TruncatingEngine("fake-truncated"),
        "fake-embed": FakeEngine("fake-embed", dim=16),
    }
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("SERVING_")}
    try:
        config = gateway_config(port)  # load_config reads SERVING_* variables: keep the caller's out
    finally:
        os.environ.update(saved)
    app = create_app(config, engines)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True, name="fake-gateway")
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the fake gateway did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


def run_module(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m <args>` from the repository root (how users run loadtests/)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVING_")}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)
