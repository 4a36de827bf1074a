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

Protocol (length-prefixed frames, 4-byte big-endian size):
- gateway -> replica, once: JSON `{"gateway": id, "token": secret}`. The secret is the one the
  gateway sends in its Ray calls, so only the gateway itself can subscribe to its answers.
- replica -> gateway: pickled lists of `(request_id, item)`, item a `Reply`, a `str` of SSE events,
  `END` or a `Failed`. The gateway only connects to addresses a replica announced through Ray.

A request uses the connection only if it was up when the request reached the replica (the replica
says so in its first item, `Accepted`); until then, and whenever a connection fails, answers travel
through the Ray call as before, and the gateway (re)connects in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import secrets
import struct
from dataclasses import dataclass
from typing import Any, AsyncIterator

logger = logging.getLogger(__name__)

_SIZE = struct.Struct(">I")
MAX_HELLO_BYTES = 4096
RETRY_AFTER_S = 2.0  # a gateway waits this long before connecting again to a replica that failed it
END = "\x00end"  # an item no engine yields (SSE text starts with "data: ")


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


def _frame(payload: bytes) -> bytes:
    return _SIZE.pack(len(payload)) + payload


async def _read_frame(reader: asyncio.StreamReader, limit: int | None = None) -> bytes:
    (size,) = _SIZE.unpack(await reader.readexactly(_SIZE.size))
    if limit is not None and size > limit:
        raise ValueError(f"frame of {size} bytes over the limit of {limit}")
    return await reader.readexactly(size)


# --------------------------------------------------------------------------------- replica side


class _Outbox:
    """What one gateway's requests produced on this replica and not yet written to its connection."""

    def __init__(self, token: str):
        self.token = token
        self.writer: asyncio.StreamWriter | None = None
        self.pending: list[tuple[str, Any]] = []
        self.wake = asyncio.Event()
        self.flusher: asyncio.Task | None = None
        self.producers: set[asyncio.Task] = set()
        self.frames = 0  # frames written, and the items they carried (tests and benchmarks read them)
        self.items = 0
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
                # add their chunks first: no timer, one pass of the event loop
                await asyncio.sleep(0)
                if self.writer is not writer:
                    return  # replaced by a newer connection of the same gateway
                self.wake.clear()
                batch, self.pending = self.pending, []
                through = self.queued
                self.frames += 1
                self.items += len(batch)
                writer.write(_frame(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)))
                await writer.drain()  # a slow gateway makes the next frame bigger, not more frames
                self.written = through
                self._wake_waiters()
        except (ConnectionError, OSError) as exc:
            logger.info("direct stream to a gateway closed: %r", exc)
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
    """Listens in a model replica for gateway replicas; each request's answer goes to its gateway."""

    def __init__(self, host: str | None = None, advertise: str | None = None):
        self._host = host or "0.0.0.0"
        self._advertise = advertise
        self._server: asyncio.base_events.Server | None = None
        self._outboxes: dict[str, _Outbox] = {}
        self._handlers: set[asyncio.Task] = set()
        self.address: tuple[str, int] | None = None

    async def start(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._accept, self._host, 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = (self._advertise or _node_ip(), port)
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
        """The gateway's outbox (made on its first call); None if the token does not match."""
        outbox = self._outboxes.get(gateway)
        if outbox is None:
            outbox = self._outboxes[gateway] = _Outbox(token)
        return outbox if secrets.compare_digest(outbox.token, token) else None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            await self._session(reader, writer)
        except asyncio.CancelledError:
            writer.close()
        finally:
            self._handlers.discard(task)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = json.loads(await asyncio.wait_for(_read_frame(reader, MAX_HELLO_BYTES), 10))
            gateway, token = str(hello["gateway"]), str(hello["token"])
        except Exception:  # noqa: BLE001 - not one of our gateways
            writer.close()
            return
        outbox = self._outboxes.get(gateway)
        if outbox is None or not secrets.compare_digest(outbox.token, token):
            writer.close()  # only a gateway that called this replica (through Ray) with that token
            return
        if outbox.writer is not None:
            outbox.detach(outbox.writer)
        outbox.writer = writer
        outbox.flusher = asyncio.create_task(outbox.flush_forever(writer))
        if outbox.pending:
            outbox.wake.set()
        # the gateway never writes again; reading tells us when it goes away
        with contextlib.suppress(Exception):
            await reader.read()
        outbox.detach(writer)

    async def serve(self, outbox: _Outbox, request_id: str, items: AsyncIterator[Any]) -> None:
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


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray (tests)
        return "127.0.0.1"


# --------------------------------------------------------------------------------- gateway side


class ChannelClient:
    """A gateway replica's connections to model replicas, and the requests waiting on them."""

    def __init__(self) -> None:
        self.gateway = f"{os.getpid()}-{secrets.token_hex(8)}"
        self.token = secrets.token_urlsafe(24)
        self._queues: dict[str, asyncio.Queue] = {}
        self._routes: dict[str, tuple[str, int]] = {}  # request id -> the connection it waits on
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

    def bind(self, request_id: str, address: tuple[str, int]) -> None:
        """The request's answer comes over `address`; if that connection is already gone, it failed."""
        self._routes[request_id] = address
        if address not in self._live and request_id in self._queues:
            self._queues[request_id].put_nowait(Failed("the direct stream to the model replica closed"))

    def unregister(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        self._routes.pop(request_id, None)

    def connect(self, address: tuple[str, int]) -> None:
        """Connect in the background (once per address); requests use it once the replica sees it."""
        address = tuple(address)
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
            self._live.add(address)  # before the hello: the replica may route a request here at once
            writer.write(_frame(json.dumps({"gateway": self.gateway, "token": self.token}).encode()))
            await writer.drain()
            queues = self._queues
            while True:
                for request_id, item in pickle.loads(await _read_frame(reader)):
                    queue = queues.get(request_id)
                    if queue is not None:  # else its caller left already
                        queue.put_nowait(item)
        except asyncio.CancelledError:
            raise
        except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
            logger.info("direct stream from %s:%s closed: %r", *address, exc)
            self._failed_at[address] = asyncio.get_running_loop().time()
        finally:
            self._live.discard(address)
            if writer is not None:
                writer.close()
            for request_id, bound in list(self._routes.items()):
                if bound == address and request_id in self._queues:
                    self._queues[request_id].put_nowait(Failed("the direct stream to the model replica closed"))
