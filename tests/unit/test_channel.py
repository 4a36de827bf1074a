"""Direct streams (serving.engine.channel) between a ModelServer and a gateway's RemoteEngines.

Ray is simulated by `Handle`: each call runs ModelServer.generate in a task of its own, and
cancelling the call cancels that task where it waits, as Ray Serve does in a replica. Everything else
is the real code: the ModelServer with a FakeEngine, its ChannelServer on a loopback port, the
gateway's ChannelClient and RemoteEngine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from typing import Any

import pytest

from serving.engine.channel import END, ChannelClient, _frame
from serving.engine.fake import FakeEngine
from serving.engine.protocol import Reply
from serving.engine.remote import RemoteEngine
from serving.engine.server import ModelServer
from tests.support import wait_for


class Call:
    """A streaming call: the replica's generator runs in its own task; cancel() cancels that task."""

    def __init__(self, agen):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.create_task(self._pump(agen))

    async def _pump(self, agen) -> None:
        try:
            async for item in agen:
                self.queue.put_nowait(("item", item))
            self.queue.put_nowait(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller as Ray would
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


class Handle:
    def __init__(self, server: ModelServer):
        self.server, self.calls = server, []

    def options(self, **_: Any) -> "Handle":
        return self

    @property
    def generate(self) -> "Handle":
        return self

    def remote(self, *args: Any) -> Call:
        call = Call(self.server.generate(*args))
        self.calls.append(call)
        return call


def remote_calls(remote: RemoteEngine) -> list[Call]:
    return remote._generate.calls  # Handle.generate is the Handle itself


class Server(ModelServer):
    def __del__(self) -> None:  # Ray Serve awaits ModelServer's async __del__; plain Python cannot
        pass


async def model_server(engine: Any) -> ModelServer:
    server = Server.__new__(Server)
    await server.__init__({"name": "tiny", "source": "/models/tiny"}, "fake", {})
    server.engine = engine
    return server


def chat(n: int, stream: bool = True, words: str = "one two three") -> bytes:
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": words}], "max_tokens": n,
                       "stream": stream}).encode()


async def collect(engine: Any, body: bytes, request_id: str) -> list:
    """The answer: its first item (a Reply) and the SSE text of the rest joined (the gateway may join
    chunks that arrived together), `created` timestamps blanked (two runs may straddle a second)."""
    items = [item async for item in engine.generate("chat", body, request_id)]
    assert items and isinstance(items[0], Reply) and all(isinstance(item, str) for item in items[1:])
    text = re.sub(r'"created": ?\d+', '"created":0', "".join(items[1:]))
    return [items[0], text] if text else [items[0]]


async def connected(client: ChannelClient, server: ModelServer, remote: RemoteEngine) -> None:
    """The first call goes through Ray and tells the gateway where to connect; wait until it has."""
    await collect(remote, chat(2), "warm-up")
    assert await wait_for(lambda: any(o.connected for o in server._channel._outboxes.values()), timeout=5)


@contextlib.asynccontextmanager
async def harness():
    fake = FakeEngine("tiny", itl_s=0.002)
    server = await model_server(fake)
    client = ChannelClient()
    remote = RemoteEngine(Handle(server), channel=client)
    try:
        yield fake, server, client, remote
    finally:
        await client.close()
        await server._channel.stop()


async def test_answers_over_the_channel_equal_the_engines_own() -> None:
    async with harness() as (fake, server, client, remote):
        first = await collect(remote, chat(5), "r0")  # through the Ray call: no connection yet
        await connected(client, server, remote)
        outbox = next(iter(server._channel._outboxes.values()))
        frames_before = outbox.frames
        direct = await collect(FakeEngine("tiny"), chat(5), "r0")
        via_channel = await collect(remote, chat(5), "r0")
        assert outbox.frames > frames_before  # this one came over the connection
        assert first == direct and via_channel == direct  # same items: Reply, then the SSE events
        assert isinstance(via_channel[0], Reply) and via_channel[-1].endswith("data: [DONE]\n\n")
        whole = await collect(remote, chat(4, stream=False), "r1")
        assert len(whole) == 1 and whole[0].status == 200
        assert json.loads(whole[0].body)["usage"]["completion_tokens"] == 4


async def test_concurrent_streams_share_frames() -> None:
    async with harness() as (fake, server, client, remote):
        await connected(client, server, remote)
        outbox = next(iter(server._channel._outboxes.values()))
        frames, items = outbox.frames, outbox.items
        answers = await asyncio.gather(*(collect(remote, chat(30, words=f"prompt {i}"), f"c{i}") for i in range(20)))
        for i, answer in enumerate(answers):
            expected = await collect(FakeEngine("tiny"), chat(30, words=f"prompt {i}"), f"c{i}")
            assert answer == expected
        sent_items, sent_frames = outbox.items - items, outbox.frames - frames
        assert sent_items >= 20 * 30
        assert sent_frames < sent_items / 4, (sent_frames, sent_items)  # many chunks per frame, not one each
        # a call ends only after its answer was written out (a stopping replica waits for its calls)
        calls = remote_calls(remote)
        assert await wait_for(lambda: all(call.task.done() for call in calls), timeout=2)
        assert outbox.written == outbox.queued


async def test_a_caller_that_leaves_aborts_only_its_request() -> None:
    async with harness() as (fake, server, client, remote):
        fake.itl_s = 0.01
        await connected(client, server, remote)
        others = [asyncio.create_task(collect(remote, chat(20, words=f"other {i}"), f"o{i}")) for i in range(3)]
        stream = remote.generate("chat", chat(200), "leaver")
        assert isinstance(await anext(stream), Reply)
        await anext(stream)
        await stream.aclose()
        assert await wait_for(lambda: "leaver" in fake.aborted, timeout=3)
        done = await asyncio.gather(*others)
        assert all(answer[-1].endswith("data: [DONE]\n\n") for answer in done)
        assert not any(rid.startswith("o") for rid in fake.aborted)


class Exploding(FakeEngine):
    async def generate(self, route, body, request_id, timeout_s=None):
        yield Reply(200, None)
        yield "data: {}\n\n"
        raise ValueError("the engine broke")


async def test_an_engine_failure_reaches_the_caller() -> None:
    async with harness() as (fake, server, client, remote):
        await connected(client, server, remote)
        server.engine = Exploding("tiny")
        stream = remote.generate("chat", chat(5), "boom")
        assert isinstance(await anext(stream), Reply)
        assert await anext(stream) == "data: {}\n\n"
        with pytest.raises(RuntimeError, match="the engine broke"):
            await anext(stream)


async def test_a_lost_connection_fails_its_requests_and_the_next_ones_reconnect() -> None:
    async with harness() as (fake, server, client, remote):
        fake.itl_s = 0.01
        await connected(client, server, remote)
        stream = remote.generate("chat", chat(300), "cut")
        assert isinstance(await anext(stream), Reply)
        outbox = next(iter(server._channel._outboxes.values()))
        outbox.writer.transport.abort()  # the network drops the connection
        with pytest.raises(RuntimeError, match="direct stream"):
            async for _ in stream:
                pass
        assert await wait_for(lambda: "cut" in fake.aborted, timeout=3)  # the replica dropped the work too
        fake.itl_s = 0.0
        again = await collect(remote, chat(3), "after")  # through the Ray call meanwhile
        assert again[-1].endswith("data: [DONE]\n\n")
        for _ in range(100):  # the gateway connects again once RETRY_AFTER_S has passed
            await collect(remote, chat(1), "probe")
            if outbox.connected:
                break
            await asyncio.sleep(0.05)
        assert outbox.connected


async def test_only_the_gateway_with_the_token_gets_its_answers() -> None:
    async with harness() as (fake, server, client, remote):
        await connected(client, server, remote)
        host, port = server._channel.address
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(_frame(json.dumps({"gateway": client.gateway, "token": "guessed"}).encode()))
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed without a byte
        writer.close()
        outbox = server._channel._outboxes[client.gateway]
        assert outbox.connected  # the real gateway's connection is untouched
        answer = await collect(remote, chat(3), "still")
        assert answer[-1].endswith("data: [DONE]\n\n")
        assert END not in answer


async def test_chunks_that_arrived_together_leave_as_one_item() -> None:
    async with harness() as (fake, server, client, remote):
        await connected(client, server, remote)
        stream = remote.generate("chat", chat(40), "slow-reader")
        assert isinstance(await anext(stream), Reply)
        await asyncio.sleep(0.3)  # the client is slow: the rest of the answer arrives meanwhile
        joined = await anext(stream)
        rest = [item async for item in stream]
        expected = (await collect(FakeEngine("tiny"), chat(40), "slow-reader"))[1]
        assert joined.count("data: ") > 10  # one write to the client, not one per event
        assert re.sub(r'"created": ?\d+', '"created":0', joined + "".join(rest)) == expected


async def test_the_engine_starts_before_accepted_is_read_and_a_call_cancelled_there_aborts_it() -> None:
    fake = FakeEngine("tiny", ttft_s=0.5)
    server = await model_server(fake)
    try:
        call = server.generate("chat", chat(50), "early", None, None)
        accepted = await anext(call)
        assert accepted.via_channel is False
        await asyncio.sleep(0.05)
        assert fake.started == ["early"] and fake.in_flight == 1  # at work while Accepted was on its way
        await call.aclose()  # Ray cancelled the call right after its first item
        assert fake.aborted == ["early"] and fake.in_flight == 0
        # and an answer read to its end is whole
        items = [item async for item in server.generate("chat", chat(3, stream=False), "whole", None, None)]
        assert isinstance(items[1], Reply) and items[1].status == 200 and len(items) == 2
    finally:
        if server._channel is not None:
            await server._channel.stop()
