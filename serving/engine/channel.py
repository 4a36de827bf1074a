"""Direct streams: model replica -> gateway replica chunks over one TCP connection per pair.

Through a Ray Serve handle every SSE chunk of every request is one Ray message (serialized, sent and
received by Ray's machinery on both sides); at 64 concurrent streams that is thousands of messages a
second, and on a machine whose cores the engine needs that work is taken from the engine
(docs/benchmarks.md). Here the Ray call of a request still does everything Ray Serve is good at
(routing, back-pressure, max ongoing requests, autoscaling, cancellation), but once a gateway
replica has a connection to a model replica, the request's answer travels over that connection:
the model replica writes, in one frame, every chunk that all of that gateway's requests produced
since the last write. Frames follow engine steps (and the gateway's reading speed), not tokens, and
nothing waits on a timer: a frame leaves as soon as the connection can take it.

Protocol: frames of a 4-byte big-endian size and a msgpack payload (data only: nothing a peer sends
is ever executed or unpickled).
- Handshake, a challenge-response under a per-gateway secret. The secret travels only inside the
  gateway's Ray calls (ModelServer.generate's `gateway` argument, (id, secret)), never over this
  connection, and every connection proves it afresh, so captured bytes cannot be replayed:
    replica -> gateway: `[PROTOCOL, server_nonce]`
    gateway -> replica: `[gateway_id, client_nonce, HMAC(secret, "gateway" server_nonce client_nonce id)]`
    replica -> gateway: `HMAC(secret, "replica" server_nonce client_nonce id)` (the gateway checks it too)
  A replica holds at most MAX_PENDING_HANDSHAKES unfinished handshakes (a new connector pushes out
  the oldest) and drops one unfinished after HANDSHAKE_TIMEOUT_S. A proven handshake replaces that
  gateway's previous connection (a reconnect); an unproven one is closed and touches nothing.
- replica -> gateway: lists of `[request_id, item]`, item a str of SSE events (or `END`), or a msgpack
  extension holding a `Reply`, a `Failed`, a `Usage`, or a part of one item too big for a frame.
  No frame is larger than `max_frame_bytes` (the replica splits; the gateway closes a connection
  that sends a larger one). The gateway never writes after its handshake.

The replica listens on its node's address as Ray knows it (loopback outside Ray), not on every
interface, and the gateway only connects to addresses a replica announced through Ray.

A request uses the connection only if it was up when the request reached the replica (the replica
says so in its first item, `Accepted`); until then, and whenever a connection fails, answers travel
through the Ray call as before, and the gateway (re)connects in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import struct
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from serving.engine.protocol import Reply, Usage

logger = logging.getLogger(__name__)

_SIZE = struct.Struct(">I")
PROTOCOL = 1
NONCE_BYTES = 32
MAX_HELLO_BYTES = 4096  # the largest handshake frame either side reads
MAX_FRAME_BYTES = 64 << 20  # the largest frame of items; a bigger item travels in parts
HANDSHAKE_TIMEOUT_S = 3.0  # a gateway answers within one round trip; a silent connector is dropped
MAX_PENDING_HANDSHAKES = 32  # unproven connections a replica holds at once
RETRY_AFTER_S = 2.0  # a gateway waits this long before connecting again to a replica that failed it
MAX_GATHER_PASSES = 4  # event loop passes a replica waits for more items before it writes a frame
END = "\x00end"  # an item no engine yields (SSE text starts with "data: ")

_EXT_REPLY, _EXT_FAILED, _EXT_PART, _EXT_LAST_PART, _EXT_USAGE = 1, 2, 3, 4, 5
_PART_OVERHEAD = 64  # an entry's bytes besides its piece and request id: array, ext and str headers


@dataclass(frozen=True, slots=True)
class Accepted:
    """First item of every ModelServer call, sent at once (so a cancellation can reach the call):
    where the replica listens for direct streams (None when the gateway has them off), and whether
    this request's answer comes over the gateway's connection (True) or through the call itself."""

    address: tuple[str, int] | None
    via_channel: bool


@dataclass(frozen=True, slots=True)
class Failed:
    """The engine raised: the gateway raises it in the request (so it is reported as before)."""

    message: str


@dataclass(frozen=True, slots=True)
class _Part:
    """A piece of one item's msgpack encoding, for an item larger than a frame; `last` ends it."""

    data: bytes
    last: bool


class ProtocolError(ValueError):
    """The peer broke the protocol (or failed to prove the secret): its connection is closed."""


# --------------------------------------------------------------------------------- wire format


def _frame(payload: bytes) -> bytes:
    return _SIZE.pack(len(payload)) + payload


async def _read_frame(reader: asyncio.StreamReader, limit: int) -> bytes:
    """One frame's payload; ProtocolError (before reading it) if its size is over `limit` bytes."""
    (size,) = _SIZE.unpack(await reader.readexactly(_SIZE.size))
    if size > limit:
        raise ProtocolError(f"frame of {size} bytes over the limit of {limit}")
    return await reader.readexactly(size)


def _to_ext(obj: Any) -> msgpack.ExtType:
    if isinstance(obj, Reply):
        return msgpack.ExtType(_EXT_REPLY, msgpack.packb((obj.status, obj.body)))
    if isinstance(obj, Failed):
        return msgpack.ExtType(_EXT_FAILED, obj.message.encode())
    if isinstance(obj, _Part):
        return msgpack.ExtType(_EXT_LAST_PART if obj.last else _EXT_PART, obj.data)
    if isinstance(obj, Usage):
        return msgpack.ExtType(_EXT_USAGE, msgpack.packb((obj.prompt_tokens, obj.completion_tokens, obj.final)))
    raise TypeError(f"a direct stream cannot carry a {type(obj).__name__}")


def _from_ext(code: int, data: bytes) -> Reply | Failed | _Part | Usage:
    """The only objects a frame can make: plain data, checked field by field."""
    if code == _EXT_REPLY:
        status, body = msgpack.unpackb(data)
        if type(status) is not int or not (body is None or type(body) is bytes):
            raise ProtocolError("malformed Reply")
        return Reply(status, body)
    if code == _EXT_FAILED:
        return Failed(data.decode())
    if code in (_EXT_PART, _EXT_LAST_PART):
        return _Part(data, code == _EXT_LAST_PART)
    if code == _EXT_USAGE:
        prompt, completion, final = msgpack.unpackb(data)
        if type(prompt) is not int or type(completion) is not int or type(final) is not bool:
            raise ProtocolError("malformed Usage")
        return Usage(prompt, completion, final)
    raise ProtocolError(f"unknown item type {code}")


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_to_ext)


def _unpack(payload: bytes) -> Any:
    return msgpack.unpackb(payload, ext_hook=_from_ext)


def encode_frames(batch: list[tuple[str, Any]], limit: int = MAX_FRAME_BYTES,
                  pack: Callable[[Any], bytes] = _pack) -> list[bytes]:
    """`batch` ([(request_id, item)]) as frames of at most `limit` bytes each: one frame unless it
    does not fit (then items are grouped greedily, and an item that alone is too big is sent in
    parts). `pack`: a msgpack.Packer's (default=_to_ext) pack, reused by a caller that sends often."""
    payload = pack(batch)
    if _SIZE.size + len(payload) <= limit:
        return [_frame(payload)]
    frames: list[bytes] = []
    group: list[bytes] = []
    room = limit - _SIZE.size - 5  # 5: the largest msgpack array header
    used = 0
    for request_id, item in batch:
        for entry in _entries(request_id, item, room):
            if group and used + len(entry) > room:
                frames.append(_group_frame(group))
                group, used = [], 0
            group.append(entry)
            used += len(entry)
    if group:
        frames.append(_group_frame(group))
    return frames


def _entries(request_id: str, item: Any, room: int) -> Iterable[bytes]:
    entry = _pack((request_id, item))
    if len(entry) <= room:
        return [entry]
    whole = _pack(item)
    step = room - _PART_OVERHEAD - len(request_id.encode())
    if step <= 0:
        raise ValueError(f"request id of {len(request_id)} characters does not fit a frame")
    starts = range(0, len(whole), step)
    return [_pack((request_id, _Part(whole[i:i + step], i + step >= len(whole)))) for i in starts]


def _group_frame(entries: list[bytes]) -> bytes:
    payload = msgpack.Packer().pack_array_header(len(entries)) + b"".join(entries)
    return _frame(payload)


def _check_frame_limit(max_frame_bytes: int) -> None:
    if max_frame_bytes < MAX_HELLO_BYTES:  # room for an item's part and its request id
        raise ValueError(f"max_frame_bytes must be at least {MAX_HELLO_BYTES}, not {max_frame_bytes}")


def _proof(secret: str, role: bytes, server_nonce: bytes, client_nonce: bytes, gateway: str) -> bytes:
    """HMAC-SHA256 binding the secret to this connection's two nonces, the gateway and who speaks
    (so one side's answer is never valid as the other's)."""
    message = role + server_nonce + client_nonce + gateway.encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).digest()


# --------------------------------------------------------------------------------- replica side


class _Outbox:
    """What one gateway's requests produced on this replica and not yet written to its connection."""

    def __init__(self, token: str, max_frame_bytes: int = MAX_FRAME_BYTES):
        self.token = token
        self.max_frame_bytes = max_frame_bytes
        self._pack = msgpack.Packer(default=_to_ext).pack  # one per outbox: reusing it saves 0.3 µs a frame
        self.writer: asyncio.StreamWriter | None = None
        self.pending: list[tuple[str, Any]] = []
        self.wake = asyncio.Event()
        self.flusher: asyncio.Task | None = None
        self.producers: set[asyncio.Task] = set()
        self.frames = 0  # frames written, and the items they carried (tests and benchmarks read them)
        self.items = 0
        self.largest_frame = 0  # bytes, size prefix included
        self.queued = 0  # items put so far; `written` of them are in the kernel's socket buffer
        self.written = 0
        self._waiters: list[asyncio.Future] = []

    @property
    def connected(self) -> bool:
        return self.writer is not None and not self.writer.is_closing()

    def put(self, request_id: str, item: Any) -> int:
        """Queue an item for the next frame; returns its number (for `until_written`)."""
        self.pending.append((request_id, item))
        self.queued += 1
        self.wake.set()
        return self.queued

    async def until_written(self, number: int) -> None:
        """Wait until item `number` was written to the connection (or the connection is gone)."""
        while self.written < number and self.writer is not None:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter

    def _wake_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def flush_forever(self, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self.wake.wait()
                # let the tasks that are ready now (other requests' handlers of the same engine step)
                # add their chunks first: no timer, passes of the event loop while they keep adding
                # (an engine step's chunks reach the outbox over a few passes: vLLM's output handler,
                # then each request's handler); one frame, one write, instead of one per pass
                seen = -1
                for _ in range(MAX_GATHER_PASSES):
                    if self.queued == seen:
                        break
                    seen = self.queued
                    await asyncio.sleep(0)
                if self.writer is not writer:
                    return  # replaced by a newer connection of the same gateway
                self.wake.clear()
                batch, self.pending = self.pending, []
                through = self.queued
                frames = encode_frames(batch, self.max_frame_bytes, self._pack)
                self.frames += len(frames)
                self.items += len(batch)
                self.largest_frame = max(self.largest_frame, *map(len, frames))
                writer.writelines(frames)
                await writer.drain()  # a slow gateway makes the next frame bigger, not more frames
                self.written = through
                self._wake_waiters()
        except (ConnectionError, OSError) as exc:
            logger.info("direct stream to a gateway closed: %r", exc)
        except (TypeError, ValueError):  # an item the wire format cannot carry: a bug, not the network
            logger.exception("direct stream to a gateway cannot send its items")
        finally:
            self.detach(writer)

    def detach(self, writer: asyncio.StreamWriter) -> None:
        if self.writer is writer:
            self.writer = None
            if self.flusher is not None and self.flusher is not asyncio.current_task():
                self.flusher.cancel()
            self.flusher = None
            # whatever was pending cannot be delivered: those requests fail on the gateway's side
            # (it loses the connection too) and their calls are cancelled, which aborts them
            for task in list(self.producers):
                task.cancel()
            self.pending = []
            self._wake_waiters()
        writer.close()


class ChannelServer:
    """Listens in a model replica for gateway replicas; each request's answer goes to its gateway.

    host: the address to bind; default the node's address as Ray knows it (loopback outside Ray).
    advertise: the address gateways are told; default `host`. The limits are those of the module."""

    def __init__(self, host: str | None = None, advertise: str | None = None, *,
                 handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
                 max_pending: int = MAX_PENDING_HANDSHAKES, max_frame_bytes: int = MAX_FRAME_BYTES):
        _check_frame_limit(max_frame_bytes)
        self._host = host or _node_ip()
        self._advertise = advertise or (self._host if self._host not in ("0.0.0.0", "::") else _node_ip())
        self._handshake_timeout_s = handshake_timeout_s
        self._max_pending = max_pending
        self._max_frame_bytes = max_frame_bytes
        self._server: asyncio.base_events.Server | None = None
        self._outboxes: dict[str, _Outbox] = {}
        self._handlers: set[asyncio.Task] = set()
        self._pending: dict[asyncio.Task, None] = {}  # unfinished handshakes, oldest first
        self.refused = 0  # connections closed unproven: bad proof, malformed, late or pushed out
        self.address: tuple[str, int] | None = None

    async def start(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._accept, self._host, 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = (self._advertise, port)
        return self.address

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for outbox in self._outboxes.values():
                if outbox.writer is not None:
                    outbox.detach(outbox.writer)
            for task in self._handlers:
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def outbox(self, gateway: str, token: str) -> _Outbox | None:
        """The gateway's outbox (made on its first call, which registers its secret); None if the
        identity is malformed or the secret is not the one registered: answers then go through the call."""
        if type(gateway) is not str or type(token) is not str or not token:
            return None
        outbox = self._outboxes.get(gateway)
        if outbox is None:
            outbox = self._outboxes[gateway] = _Outbox(token, self._max_frame_bytes)
        return outbox if hmac.compare_digest(outbox.token.encode(), token.encode()) else None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = _current_task()
        self._handlers.add(task)
        try:
            await self._session(reader, writer)
        except asyncio.CancelledError:
            writer.close()
        finally:
            self._handlers.discard(task)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        outbox = await self._admit(reader, writer)
        if outbox is None:
            self.refused += 1
            writer.close()
            return
        if outbox.writer is not None:
            outbox.detach(outbox.writer)  # the gateway proved the secret: this is its reconnect
        outbox.writer = writer
        outbox.flusher = asyncio.create_task(outbox.flush_forever(writer))
        if outbox.pending:
            outbox.wake.set()
        # the gateway never writes again: its first byte (a protocol breach) or its leaving ends this
        with contextlib.suppress(Exception):
            await reader.read(1)
        outbox.detach(writer)

    async def _admit(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Outbox | None:
        """The handshake, within the deadline and the bound on unfinished ones: the outbox of the
        gateway that proved its secret, or None."""
        task = _current_task()
        self._pending[task] = None
        if len(self._pending) > self._max_pending:
            oldest = next(iter(self._pending))  # a flood pushes out its own connections, not new ones
            del self._pending[oldest]
            oldest.cancel()
            self.refused += 1
        try:
            async with asyncio.timeout(self._handshake_timeout_s):
                return await self._handshake(reader, writer)
        except (ProtocolError, ValueError, TypeError, OSError, EOFError, TimeoutError) as exc:
            logger.debug("direct stream handshake refused: %r", exc)
            return None
        finally:
            self._pending.pop(task, None)

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Outbox:
        server_nonce = secrets.token_bytes(NONCE_BYTES)
        writer.write(_frame(msgpack.packb([PROTOCOL, server_nonce])))
        gateway, client_nonce, proof = msgpack.unpackb(await _read_frame(reader, MAX_HELLO_BYTES))
        if type(gateway) is not str or type(client_nonce) is not bytes or type(proof) is not bytes:
            raise ProtocolError("malformed handshake")
        if len(client_nonce) != NONCE_BYTES:
            raise ProtocolError("malformed handshake")
        outbox = self._outboxes.get(gateway)  # only a gateway that called this replica through Ray
        if outbox is None:
            raise ProtocolError("unknown gateway")
        if not hmac.compare_digest(proof, _proof(outbox.token, b"gateway", server_nonce, client_nonce, gateway)):
            raise ProtocolError("wrong proof")
        writer.write(_frame(msgpack.packb(_proof(outbox.token, b"replica", server_nonce, client_nonce, gateway))))
        await writer.drain()
        return outbox

    async def serve(self, outbox: _Outbox, request_id: str, items: AsyncGenerator[Any, None]) -> None:
        """Feed `items` (one request's answer) to the gateway's connection; returns when the answer
        has been handed over. Cancelling it (the gateway cancelled the call) aborts the request."""

        async def produce() -> None:
            try:
                async for item in items:
                    outbox.put(request_id, item)
                # the call ends only once the answer left: a replica that is being stopped waits for
                # its ongoing calls, so the end of an answer is never left behind in the outbox
                await outbox.until_written(outbox.put(request_id, END))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported to the gateway like a failed call
                logger.warning("engine failed for %s: %r", request_id, exc)
                await outbox.until_written(outbox.put(request_id, Failed(repr(exc))))
            finally:
                with contextlib.suppress(Exception):
                    await items.aclose()

        task = asyncio.create_task(produce())
        outbox.producers.add(task)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise
        finally:
            outbox.producers.discard(task)


def _current_task() -> asyncio.Task:
    """The task running the caller: asyncio runs every connection handler as one."""
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("not called from an asyncio task")
    return task


def _node_ip() -> str:
    """This node's address as Ray knows it (gateways on other nodes reach it there); loopback
    outside Ray (tests, local tools), where every peer is on this machine."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - Ray missing or half started: nobody else can reach us anyway
        pass
    return "127.0.0.1"


# --------------------------------------------------------------------------------- gateway side


class ChannelClient:
    """A gateway replica's connections to model replicas, and the requests waiting on them.

    `identity` (id, secret) goes with each of its Ray calls; connections prove the secret without
    sending it. max_frame_bytes: a replica that sends a larger frame is disconnected."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        _check_frame_limit(max_frame_bytes)
        self.gateway = f"{os.getpid()}-{secrets.token_hex(8)}"
        self.token = secrets.token_urlsafe(32)
        self._max_frame_bytes = max_frame_bytes
        self._queues: dict[str, asyncio.Queue] = {}
        self._routes: dict[str, tuple[str, int]] = {}  # request id -> the connection it waits on
        self._parts: dict[str, list[bytes]] = {}  # request id -> pieces of an item too big for a frame
        self._connections: dict[tuple[str, int], asyncio.Task] = {}
        self._live: set[tuple[str, int]] = set()
        self._failed_at: dict[tuple[str, int], float] = {}

    @property
    def identity(self) -> tuple[str, str]:
        return self.gateway, self.token

    def register(self, request_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    def bind(self, request_id: str, address: tuple[str, int] | None) -> None:
        """The request's answer comes over `address`; if that connection is already gone (or the replica
        named none), it failed."""
        if address is not None:
            self._routes[request_id] = address
        if (address is None or address not in self._live) and request_id in self._queues:
            self._queues[request_id].put_nowait(Failed("the direct stream to the model replica closed"))

    def unregister(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        self._routes.pop(request_id, None)
        self._parts.pop(request_id, None)

    def connect(self, address: tuple[str, int]) -> None:
        """Connect in the background (once per address); requests use it once the replica sees it."""
        host, port = address  # the dicts below need a tuple, whatever sequence the caller passed
        address = (host, port)
        task = self._connections.get(address)
        if task is not None and not task.done():
            return
        loop = asyncio.get_running_loop()
        failed = self._failed_at.get(address)
        if failed is not None and loop.time() - failed < RETRY_AFTER_S:
            return  # it failed a moment ago: the calls carry the answers meanwhile
        self._connections[address] = loop.create_task(self._run(address))

    async def close(self) -> None:
        for task in self._connections.values():
            task.cancel()
        await asyncio.gather(*self._connections.values(), return_exceptions=True)

    async def _run(self, address: tuple[str, int]) -> None:
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*address), 5)
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                await self._handshake(reader, writer, address)
            while True:
                self.deliver(_unpack(await _read_frame(reader, self._max_frame_bytes)))
        except asyncio.CancelledError:
            raise
        except (OSError, EOFError, TimeoutError, ValueError, TypeError) as exc:
            logger.info("direct stream from %s:%s closed: %r", *address, exc)
            self._failed_at[address] = asyncio.get_running_loop().time()
        finally:
            self._live.discard(address)
            if writer is not None:
                writer.close()
            for request_id, bound in list(self._routes.items()):
                if bound == address and request_id in self._queues:
                    self._parts.pop(request_id, None)
                    self._queues[request_id].put_nowait(Failed("the direct stream to the model replica closed"))

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         address: tuple[str, int]) -> None:
        """Answer the replica's challenge and check its answer to ours (ProtocolError if wrong)."""
        hello = msgpack.unpackb(await _read_frame(reader, MAX_HELLO_BYTES))
        if not (isinstance(hello, list) and len(hello) == 2 and hello[0] == PROTOCOL
                and type(hello[1]) is bytes and len(hello[1]) == NONCE_BYTES):
            raise ProtocolError(f"unknown handshake {hello!r:.100}")
        server_nonce, client_nonce = hello[1], secrets.token_bytes(NONCE_BYTES)
        # live before the proof: once the replica checked it, it may route a request here at once
        self._live.add(address)
        proof = _proof(self.token, b"gateway", server_nonce, client_nonce, self.gateway)
        writer.write(_frame(msgpack.packb([self.gateway, client_nonce, proof])))
        await writer.drain()
        answer = msgpack.unpackb(await _read_frame(reader, MAX_HELLO_BYTES))
        expected = _proof(self.token, b"replica", server_nonce, client_nonce, self.gateway)
        if type(answer) is not bytes or not hmac.compare_digest(answer, expected):
            raise ProtocolError("the replica did not prove the secret")

    def deliver(self, entries: Any) -> None:
        """Hand one decoded frame's items to their requests; ProtocolError (or ValueError, TypeError)
        for anything but a list of [request_id, item]."""
        if type(entries) is not list:
            raise ProtocolError("a frame is not a list")
        queues = self._queues
        for request_id, item in entries:
            if type(item) is not str:  # SSE text is nearly every item: checked first
                item = self._whole(request_id, item)
                if item is None:
                    continue
            queue = queues.get(request_id)
            if queue is not None:  # else its caller left already
                queue.put_nowait(item)

    def _whole(self, request_id: str, item: Any) -> Reply | Failed | Usage | str | None:
        """A non-text item as the request gets it; None while an item in parts is incomplete."""
        if isinstance(item, (Reply, Failed, Usage)):
            return item
        if not isinstance(item, _Part):
            raise ProtocolError(f"unexpected item {type(item).__name__}")
        if request_id not in self._queues:
            self._parts.pop(request_id, None)  # its caller left: keep nothing for it
            return None
        parts = self._parts.setdefault(request_id, [])
        parts.append(item.data)
        if not item.last:
            return None
        whole = _unpack(b"".join(self._parts.pop(request_id)))
        if not isinstance(whole, (str, Reply, Failed)):
            raise ProtocolError(f"unexpected item {type(whole).__name__}")
        return whole
