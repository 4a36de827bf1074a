"""A client's x-request-id decides nothing internal (issue 13, item 1).

The attack: direct streams route an answer to its request by the request's id, and that id was the
client's `x-request-id`. Two requests in flight with the same id (two tenants, or one client's
retry): one hung until its timeout, the other received the first one's answer. Now the gateway
makes an internal id for every request (serving.gateway.middleware) and only echoes and logs the
client's.

The direct-stream test runs the whole path but Ray: the gateway app, a RemoteEngine with a
ChannelClient, a ModelServer with a FakeEngine whose ChannelServer listens on a loopback port (real
TCP), and a stand-in for Ray's call (`tests.support.ReplicaHandle`, as in test_channel.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import pytest

from serving.engine.channel import ChannelClient
from serving.engine.fake import FakeEngine
from serving.engine.remote import RemoteEngine
from serving.engine.server import ModelServer
from serving.gateway.app import create_app
from tests.redis.support import client_for, make_config, sse_json
from tests.support import ReplicaHandle, no_serving_env, wait_for  # noqa: F401 - autouse fixture

HEX_ID = re.compile(r"^[0-9a-f]{32}$")
TINY = [{"name": "tiny", "source": "/models/tiny"}]
SAME = "same-id-1"


class Server(ModelServer):
    def __del__(self) -> None:  # Ray Serve awaits ModelServer's async __del__; plain Python cannot
        pass


def body(words: str, stream: bool, max_tokens: int = 12) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": words}], "max_tokens": max_tokens,
            "stream": stream}


def text_of(response) -> str:
    """The answer's text, streamed or not."""
    if response.headers["content-type"].startswith("text/event-stream"):
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in sse_json(response.text) if c["choices"])
    return response.json()["choices"][0]["message"]["content"]


def expected_text(words: str, max_tokens: int = 12) -> str:
    return " ".join(FakeEngine._words(words, max_tokens))  # the FakeEngine's answer is a function of the prompt


@pytest.mark.parametrize("stream", [True, False])
async def test_one_x_request_id_on_two_requests_over_direct_streams(stream: bool) -> None:
    fake = FakeEngine("tiny", itl_s=0.01)  # 12 tokens, ~0.1 s: the two requests overlap
    server = Server.__new__(Server)
    await server.__init__(TINY[0], "fake", {})
    server.engine = fake
    channel = ChannelClient()
    app = create_app(make_config(None, models=TINY), {"tiny": RemoteEngine(ReplicaHandle(server), channel=channel)})
    try:
        async with client_for(app) as client:
            # the first call goes through Ray's call and tells the gateway where to connect
            assert (await client.post("/v1/chat/completions", json=body("warm up", True))).status_code == 200
            assert await wait_for(lambda: any(o.connected for o in server._channel._outboxes.values()), timeout=5)
            outbox = next(iter(server._channel._outboxes.values()))
            frames = outbox.frames
            prompts = ["the first tenant's secret", "another tenant entirely"]
            # before: one of the two hung until the request timeout (600 s), the other got a mix
            answers = await asyncio.wait_for(asyncio.gather(*(
                client.post("/v1/chat/completions", json=body(p, stream), headers={"x-request-id": SAME})
                for p in prompts)), timeout=10)
        assert outbox.frames > frames  # the answers came over the direct stream
        for prompt, answer in zip(prompts, answers, strict=True):
            assert answer.status_code == 200, answer.text
            assert text_of(answer) == expected_text(prompt)  # each got its own answer
            assert answer.headers["x-request-id"] == SAME  # the client's id is echoed
        engine_ids = fake.started[1:]
        assert len(set(engine_ids)) == 2 and all(HEX_ID.match(i) for i in engine_ids)  # two internal ids
    finally:
        await channel.close()
        await server._channel.stop()


async def test_client_id_is_echoed_and_logged_only(caplog) -> None:
    fake = FakeEngine("tiny")
    app = create_app(make_config(None, models=TINY), {"tiny": fake})
    caplog.set_level(logging.ERROR, logger="serving.gateway")
    async with client_for(app) as client:
        given = await client.post("/v1/chat/completions", json=body("x", False), headers={"x-request-id": SAME})
        again = await client.post("/v1/chat/completions", json=body("x", False), headers={"x-request-id": SAME})
        insane = await client.post("/v1/chat/completions", json=body("x", False), headers={"x-request-id": "a b"})
    assert given.headers["x-request-id"] == again.headers["x-request-id"] == SAME
    assert HEX_ID.match(insane.headers["x-request-id"])  # not sane: the internal id stands in
    first, second, third = fake.started
    assert len({first, second, third}) == 3 and SAME not in fake.started
    assert third == insane.headers["x-request-id"]
    # what the engine answers with (vLLM: chatcmpl-<its request id>) carries the internal id
    assert json.loads(given.text)["id"] == f"fake-{first}"


async def test_a_failure_logs_both_ids(caplog) -> None:
    class Raises(FakeEngine):
        def generate(self, route, body, request_id, timeout_s=None, **_routing):  # a plain bug in an engine adapter
            raise KeyError("boom")

    app = create_app(make_config(None, models=TINY), {"tiny": Raises("tiny")})
    caplog.set_level(logging.ERROR, logger="serving.gateway")
    async with client_for(app) as client:
        response = await client.post("/v1/chat/completions", json=body("x", False), headers={"x-request-id": SAME})
    assert response.status_code == 500
    assert re.search(rf"request [0-9a-f]{{32}} \(x-request-id {SAME}\)", caplog.text), caplog.text
