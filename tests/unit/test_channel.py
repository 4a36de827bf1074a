"""Direct streams (serving.engine.channel) between a ModelServer and a gateway's RemoteEngines.

Ray is simulated by `tests.support.ReplicaHandle`: each call runs ModelServer.generate in a task of its own, and
cancelling the call cancels that task where it waits, as Ray Serve does in a replica. Everything else
is the real code: the ModelServer with a FakeEngine, its ChannelServer on a loopback port, the
gateway's ChannelClient and RemoteEngine. The attacks at the end speak to that port over real TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pickle
import re
from typing import Any

import msgpack
import pytest

from serving.engine import channel as channel_module
from serving.engine.channel import (
    _SIZE,
    END,
    MAX_HELLO_BYTES,
    NONCE_BYTES,
    ChannelClient,
    ChannelServer,
    Failed,
    ProtocolError,
    _frame,
    _proof,
    _read_frame,
    _unpack,
    encode_frames,
)
from serving.engine.fake import FakeEngine
from serving.engine.protocol import Reply, Usage
from serving.engine.remote import RemoteEngine
from serving.engine.server import ModelServer
from tests.support import RayCall, ReplicaHandle, wait_for


def remote_calls(remote: RemoteEngine) -> list[RayCall]:
    return remote._generate.calls  # ReplicaHandle.generate is the handle itself


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


async def collect(engine: Any, body: bytes, request_id: str, usages: list | None = None) -> list:
    """The answer: its first item (a Reply) and the SSE text of the rest joined (the gateway may join
    chunks that arrived together), `created` timestamps blanked (two runs may straddle a second); the
    token counts (Usage items) that came with it go to `usages`. A whole stream ends with its final counts."""
    items = [item async for item in engine.generate("chat", body, request_id)]
    assert items and isinstance(items[0], Reply) and all(isinstance(item, (str, Usage)) for item in items[1:])
    text = re.sub(r'"created": ?\d+', '"created":0', "".join(i for i in items[1:] if isinstance(i, str)))
    counts = [item for item in items[1:] if isinstance(item, Usage)]
    if text.endswith("data: [DONE]\n\n"):
        assert counts and counts[-1].final and not any(c.final for c in counts[:-1])
    if usages is not None:
        usages.extend(counts)
    return [items[0], text] if text else [items[0]]


async def connected(client: ChannelClient, server: ModelServer, remote: RemoteEngine) -> None:
    """The first call goes through Ray and tells the gateway where to connect; wait until it has."""
    await collect(remote, chat(2), "warm-up")
    assert await wait_for(lambda: any(o.connected for o in server._channel._outboxes.values()), timeout=5)


@contextlib.asynccontextmanager
async def harness(server_options: dict | None = None, client_options: dict | None = None):
    """A model replica and a gateway; `server_options` (ChannelServer's limits) start the replica's
    channel at once with them, as the replica's first direct-streams call would with the defaults."""
    fake = FakeEngine("tiny", itl_s=0.002)
    server = await model_server(fake)
    if server_options is not None:
        server._channel = ChannelServer(**server_options)
        await server._channel.start()
    client = ChannelClient(**(client_options or {}))
    remote = RemoteEngine(ReplicaHandle(server), channel=client)
    try:
        yield fake, server, client, remote
    finally:
        await client.close()
        if server._channel is not None:
            await server._channel.stop()


async def test_answers_over_the_channel_equal_the_engines_own() -> None:
    async with harness() as (fake, server, client, remote):
        first = await collect(remote, chat(5), "r0")  # through the Ray call: no connection yet
        await connected(client, server, remote)
        outbox = next(iter(server._channel._outboxes.values()))
        frames_before = outbox.frames
        direct_usages: list = []
        channel_usages: list = []
        direct = await collect(FakeEngine("tiny"), chat(5), "r0", direct_usages)
        via_channel = await collect(remote, chat(5), "r0", channel_usages)
        assert channel_usages == direct_usages == [Usage(3, 0), Usage(3, 5, final=True)]  # they cross it too
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
    async def generate(self, route, body, request_id, timeout_s=None, **_routing):
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


async def test_chunks_that_arrived_together_leave_as_one_item() -> None:
    async with harness() as (fake, server, client, remote):
        await connected(client, server, remote)
        stream = remote.generate("chat", chat(40), "slow-reader")
        assert isinstance(await anext(stream), Reply)
        await asyncio.sleep(0.3)  # the client is slow: the rest of the answer arrives meanwhile
        items = [item async for item in stream]
        texts = [item for item in items if isinstance(item, str)]
        expected = (await collect(FakeEngine("tiny"), chat(40), "slow-reader"))[1]
        assert texts[0].count("data: ") > 10  # one write to the client, not one per event
        assert re.sub(r'"created": ?\d+', '"created":0', "".join(texts)) == expected
        # the token counts that arrived among the chunks do not split them
        assert [item for item in items if not isinstance(item, str)] == [Usage(3, 0), Usage(3, 40, final=True)]


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


def test_the_wire_format_carries_every_item_kind_within_the_frame_limit() -> None:
    client = ChannelClient(max_frame_bytes=4096)
    queues = {rid: client.register(rid) for rid in ("a", "b", "c")}
    batch = [("a", Reply(200, None)), ("a", "data: 1\n\n"), ("b", Reply(400, b'{"error": {}}')),
             ("c", Reply(200, bytes(range(256)) * 100)), ("a", "data: " + "é" * 9000 + "\n\n"),
             ("b", Failed("the engine broke")), ("a", END), ("gone", "data: late\n\n")]
    frames = encode_frames(batch, 4096)
    assert len(frames) > 1 and all(len(frame) <= 4096 for frame in frames)
    assert len(encode_frames(batch[:3], 4096)) == 1  # what fits goes in one frame
    for frame in frames:
        client.deliver(_unpack(frame[_SIZE.size:]))
    got = {rid: [queue.get_nowait() for _ in range(queue.qsize())] for rid, queue in queues.items()}
    assert got == {"a": [batch[0][1], batch[1][1], batch[4][1], END], "b": [batch[2][1], batch[5][1]],
                   "c": [batch[3][1]]}
    assert not client._parts
    with pytest.raises(TypeError):  # only the protocol's types leave a replica
        encode_frames([("a", object())])
    for bad in ([["a", 1]], {"a": "b"}, [["a", msgpack.ExtType(9, b"")]]):
        with pytest.raises((ProtocolError, ValueError, TypeError)):
            client.deliver(_unpack(msgpack.packb(bad)))


# --------------------------------------------------------------------------------- attacks
# Each speaks to the replica's real port: a refused connection is closed right after the replica's
# challenge, without its proof (and so without any answer), while the gateway's own connection and
# its streams go on.


async def challenge(address: tuple[str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Connect as a stranger would; returns the connection and the replica's nonce."""
    reader, writer = await asyncio.open_connection(*address)
    version, nonce = msgpack.unpackb(await asyncio.wait_for(_read_frame(reader, MAX_HELLO_BYTES), 5))
    assert version == channel_module.PROTOCOL and len(nonce) == NONCE_BYTES
    return reader, writer, nonce


def proof_frame(gateway: str, secret: str, server_nonce: bytes) -> bytes:
    client_nonce = os.urandom(NONCE_BYTES)
    proof = _proof(secret, b"gateway", server_nonce, client_nonce, gateway)
    return _frame(msgpack.packb([gateway, client_nonce, proof]))


async def closed_without_a_byte(reader: asyncio.StreamReader, timeout: float = 5) -> bool:
    """The replica closed the connection without sending anything more (no proof, no frame)."""
    return await asyncio.wait_for(reader.read(), timeout) == b""


async def still_streams(server: ModelServer, client: ChannelClient, remote: RemoteEngine, writer: Any) -> None:
    """The gateway's connection is the one it had, and answers still come over it."""
    outbox = server._channel._outboxes[client.gateway]
    assert outbox.writer is writer and outbox.connected
    frames = outbox.frames
    answer = await collect(remote, chat(3), "still")
    assert answer[-1].endswith("data: [DONE]\n\n") and END not in answer[-1]
    assert outbox.frames > frames  # over the connection, not the call


async def test_the_replica_listens_where_ray_says_the_node_is_not_everywhere(monkeypatch) -> None:
    ray = pytest.importorskip("ray")
    # outside Ray: loopback only (the integration tests' Ray may be up in this process: say it is not)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    outside = ChannelServer()
    host, _ = await outside.start()
    assert host == "127.0.0.1" and outside._server.sockets[0].getsockname()[0] == "127.0.0.1"
    await outside.stop()
    # in a replica: the node's address as Ray knows it (127.0.0.2 is this machine too, and not 0.0.0.0)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.2")
    inside = ChannelServer()
    host, port = await inside.start()
    try:
        assert host == "127.0.0.2" and inside._server.sockets[0].getsockname()[0] == "127.0.0.2"
        with pytest.raises(OSError):  # not reachable on the machine's other addresses
            await asyncio.open_connection("127.0.0.1", port)
    finally:
        await inside.stop()


async def test_a_replica_that_cannot_listen_there_answers_through_its_calls(monkeypatch) -> None:
    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "192.0.2.1")  # not this machine's
    async with harness() as (fake, server, client, remote):
        for request_id in ("first", "second"):
            answer = await collect(remote, chat(3), request_id)
            assert answer[-1].endswith("data: [DONE]\n\n")
        assert server._channel is None and server._channel_unavailable and not client._connections


async def test_a_connection_without_the_secret_is_refused() -> None:
    async with harness() as (fake, server, client, remote):
        await connected(client, server, remote)
        live = server._channel._outboxes[client.gateway].writer
        address = server._channel.address
        attempts = [
            proof_frame(client.gateway, "guessed", b"\0" * NONCE_BYTES),  # right gateway, wrong secret
            proof_frame("another-gateway", client.token, b"\0" * NONCE_BYTES),  # a gateway that never called
            _frame(json.dumps({"gateway": client.gateway, "token": client.token}).encode()),  # the old hello
            _frame(b"\xc1" * 64),  # not msgpack
        ]
        for attempt in attempts:
            reader, writer, nonce = await challenge(address)
            if attempt is attempts[0] or attempt is attempts[1]:  # a proof for this very challenge
                gateway = client.gateway if attempt is attempts[0] else "another-gateway"
                secret = "guessed" if attempt is attempts[0] else client.token
                attempt = proof_frame(gateway, secret, nonce)
            writer.write(attempt)
            await writer.drain()
            assert await closed_without_a_byte(reader)
            writer.close()
        assert server._channel.refused == len(attempts)
        # a whole gateway with the right id and a wrong secret gets no connection either
        imposter = ChannelClient()
        imposter.gateway = client.gateway
        imposter.connect(address)
        assert await wait_for(lambda: imposter._connections[address].done(), timeout=5)
        assert server._channel.refused == len(attempts) + 1 and address in imposter._failed_at
        await still_streams(server, client, remote, live)


class Relay:
    """A TCP relay in the middle that records what the gateway sent: the captured handshake."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.sent = target, bytearray()

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[:2]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def copy(src, dst, record: bytearray | None) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    if record is not None:
                        record += data
                    dst.write(data)
            dst.close()

        await asyncio.gather(copy(reader, up_writer, self.sent), copy(up_reader, writer, None))


async def test_a_replayed_handshake_is_refused() -> None:
    async with harness(server_options={}) as (fake, server, client, remote):
        channel = server._channel
        relay = Relay(channel.address)
        channel.outbox(*client.identity)  # the gateway's first call through Ray registered its secret
        client.connect(await relay.start())
        assert await wait_for(lambda: channel._outboxes[client.gateway].connected, timeout=5)
        captured = bytes(relay.sent)
        assert len(captured) > _SIZE.size  # the gateway's whole handshake, as it crossed the network
        reader, writer, _ = await challenge(channel.address)
        writer.write(captured)
        await writer.drain()
        assert await closed_without_a_byte(reader)
        writer.close()
        assert channel.refused == 1 and channel._outboxes[client.gateway].connected  # untouched
        relay.server.close()


async def test_a_second_handshake_takes_over_a_live_connection_only_with_the_secret() -> None:
    async with harness() as (fake, server, client, remote):
        await connected(client, server, remote)
        outbox = server._channel._outboxes[client.gateway]
        live = outbox.writer
        address = server._channel.address
        reader, writer, nonce = await challenge(address)  # the same identity, without the secret
        writer.write(proof_frame(client.gateway, client.token[:-1] + "x", nonce))
        await writer.drain()
        assert await closed_without_a_byte(reader)
        writer.close()
        await still_streams(server, client, remote, live)
        # with the secret (the gateway itself, reconnecting) it replaces the old one, which is closed
        reader, writer, nonce = await challenge(address)
        writer.write(proof_frame(client.gateway, client.token, nonce))
        await writer.drain()
        assert len(await asyncio.wait_for(_read_frame(reader, MAX_HELLO_BYTES), 5)) > 0  # the replica's proof
        assert await wait_for(lambda: outbox.writer is not live and live.is_closing())
        assert outbox.connected
        writer.close()


async def test_idle_and_slow_connectors_do_not_keep_the_gateway_out() -> None:
    limits = {"handshake_timeout_s": 2.0, "max_pending": 16}
    async with harness(server_options=limits) as (fake, server, client, remote):
        channel = server._channel
        idle = [await asyncio.open_connection(*channel.address) for _ in range(100)]
        # the bound: each newcomer beyond 16 pushes out the oldest unproven one at once, long before
        # the deadline (so a flood holds 16 sockets, not one per connect)
        for reader, _writer in idle[:100 - 16]:
            await asyncio.wait_for(reader.read(), 1)
            assert reader.at_eof()
        assert len(channel._pending) == 16 and channel.refused == 100 - 16
        slow_reader, slow_writer = await asyncio.open_connection(*channel.address)

        async def trickle() -> None:  # a handshake sent one byte every 0.1 s
            with contextlib.suppress(OSError):
                for byte in _SIZE.pack(64) + b"\0" * 64:
                    slow_writer.write(bytes([byte]))
                    await slow_writer.drain()
                    await asyncio.sleep(0.1)

        slow = asyncio.create_task(trickle())
        started = asyncio.get_running_loop().time()
        await connected(client, server, remote)  # the real gateway gets through at once
        assert asyncio.get_running_loop().time() - started < 1.0
        await still_streams(server, client, remote, channel._outboxes[client.gateway].writer)
        # the deadline: every other unproven connection is closed by it, the slow one mid-handshake
        for reader, writer in idle[100 - 16:] + [(slow_reader, slow_writer)]:
            await asyncio.wait_for(reader.read(), 3)
            assert reader.at_eof()
            writer.close()
        assert not slow.done()  # it was still sending when it was dropped
        slow.cancel()
        assert not channel._pending and channel._outboxes[client.gateway].connected
        for _, writer in idle:
            writer.close()


async def test_the_gateway_takes_nothing_from_a_replica_that_cannot_prove_the_secret() -> None:
    """Someone else listening at an announced address (a replica's port taken over after it died)
    learns nothing from the gateway's proof and cannot feed it answers."""
    client = ChannelClient()
    queue = client.register("r")  # a request of the gateway's, waiting for its answer
    seen: list[bytes] = []

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_frame(msgpack.packb([channel_module.PROTOCOL, os.urandom(NONCE_BYTES)])))
        seen.append(await _read_frame(reader, MAX_HELLO_BYTES))
        writer.write(_frame(msgpack.packb(os.urandom(32))))  # a proof it cannot make
        writer.write(_frame(msgpack.packb([["r", "data: forged\n\n"]])))
        await writer.drain()
        seen.append(await reader.read())  # until the gateway hangs up

    listener = await asyncio.start_server(impostor, "127.0.0.1", 0)
    address = listener.sockets[0].getsockname()[:2]
    try:
        client.connect(address)
        assert await wait_for(lambda: len(seen) == 2, timeout=5)  # the gateway closed the connection
        assert address in client._failed_at and not client._live
        assert queue.empty()  # nothing forged was delivered
        gateway, _, proof = msgpack.unpackb(seen[0])
        assert gateway == client.gateway and client.token.encode() not in seen[0]  # the secret never travels
    finally:
        await client.close()
        listener.close()


class CreatesAFile:
    """A pickle whose loading runs code: it creates `path`."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


async def test_a_pickled_frame_is_never_unpickled(tmp_path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps([("r", CreatesAFile(str(marker)))])
    for _, opened in pickle.loads(payload):  # the payload is live: loading it creates the file...
        opened.close()
    assert marker.exists()
    marker.unlink()  # ...so that its absence below means nobody loaded it
    async with harness() as (fake, server, client, remote):
        await connected(client, server, remote)
        # to the replica, as a handshake
        reader, writer, _ = await challenge(server._channel.address)
        writer.write(_frame(payload))
        await writer.drain()
        assert await closed_without_a_byte(reader)
        writer.close()
        # to the gateway, from a replica whose authenticated connection sends it (a compromised replica)
        outbox = server._channel._outboxes[client.gateway]
        fake.itl_s = 0.01
        stream = remote.generate("chat", chat(300), "victim")
        assert isinstance(await anext(stream), Reply)
        outbox.writer.write(_frame(payload))
        with pytest.raises(RuntimeError, match="direct stream"):
            async for _ in stream:
                pass  # the gateway dropped the connection that sent it
        assert not marker.exists()


async def test_an_oversized_frame_closes_the_connection() -> None:
    async with harness(client_options={"max_frame_bytes": 1 << 16}) as (fake, server, client, remote):
        await connected(client, server, remote)
        # to the replica: a handshake frame announcing 1 GiB is refused at once, nothing allocated
        reader, writer, _ = await challenge(server._channel.address)
        writer.write(_SIZE.pack(1 << 30))
        await writer.drain()
        started = asyncio.get_running_loop().time()
        assert await closed_without_a_byte(reader)
        assert asyncio.get_running_loop().time() - started < 1.0  # not the handshake's deadline
        writer.close()
        # to the gateway: a frame one byte over its limit
        outbox = server._channel._outboxes[client.gateway]
        outbox.writer.write(_SIZE.pack((1 << 16) + 1))
        assert await wait_for(lambda: not client._live and not outbox.connected, timeout=5)
        assert client._failed_at  # it connects again later (and is refused nothing: it has the secret)


class Big(FakeEngine):
    async def generate(self, route, body, request_id, timeout_s=None, **_routing):
        yield Reply(200, b'{"data": "' + b"x" * 50_000 + b'"}')


async def test_items_larger_than_a_frame_arrive_whole_in_frames_within_the_limit() -> None:
    limit = 4096
    async with harness(server_options={"max_frame_bytes": limit},
                       client_options={"max_frame_bytes": limit}) as (fake, server, client, remote):
        await connected(client, server, remote)
        outbox = server._channel._outboxes[client.gateway]
        streams = [asyncio.create_task(collect(remote, chat(200, words=f"p {i}"), f"s{i}")) for i in range(8)]
        assert await wait_for(lambda: all(f"s{i}" in fake.started for i in range(8)))
        server.engine = Big("tiny")  # a big answer amid streaming ones
        big = await collect(remote, chat(1, stream=False), "big")
        server.engine = fake
        assert big == [Reply(200, b'{"data": "' + b"x" * 50_000 + b'"}')]
        for i, answer in enumerate(await asyncio.gather(*streams)):
            assert answer == await collect(FakeEngine("tiny"), chat(200, words=f"p {i}"), f"s{i}")
        assert 0 < outbox.largest_frame <= limit
        assert outbox.connected  # the gateway never saw a frame over its limit
