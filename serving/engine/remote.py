"""The gateway's view of a ModelServer deployment: an Engine reached through a Ray Serve handle."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

from serving.engine.channel import END, Accepted, ChannelClient, Failed
from serving.engine.protocol import EngineOverloaded, EngineUnavailable, Reply, Route, Usage
from serving.raycompat import router_view

AFFINITY_KWARG, ADAPTER_KWARG = "affinity", "adapter"  # serving.engine.routing reads them (it imports Ray Serve)

logger = logging.getLogger(__name__)

READINESS_TTL_S = 2.0
# A call that a replica took answers within milliseconds (its first item is Accepted); one
# still unanswered after this long waits in Ray's router for a replica, and is refused if none runs.
ADMISSION_CHECK_S = 1.0


class ReplicaCounter:
    """Running replicas per deployment of every application, from Ray Serve's controller (deployment
    names are unique across the platform's applications, serving.app).

    Asking the replicas themselves would queue the question behind their busy requests. A view older
    than its TTL is refreshed in the background while requests go on with it (asking the controller
    takes milliseconds, and every request would wait for it); a request waits for the controller only
    when there is no view yet, the view was dropped after a failed call, it would be refused (0
    running: only fresh evidence refuses), or it asks to (`wait`)."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._fetched = 0.0
        self._refreshing: asyncio.Future | None = None
        self._dropped = 0  # how often the view was dropped: an answer asked for before a drop is not fresh

    async def running(self, deployment: str, max_age_s: float = READINESS_TTL_S, wait: bool = False) -> int:
        if time.monotonic() - self._fetched > max_age_s:
            refresh = self._refresh()
            if wait or self._fetched == 0.0 or self._counts.get(deployment, 0) == 0:
                await asyncio.shield(refresh)
        return self._counts.get(deployment, 0)

    def invalidate(self) -> None:
        """A replica failed a call: the next readiness question asks the controller again."""
        self._fetched = 0.0
        self._dropped += 1

    def _refresh(self) -> asyncio.Future:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._fetch_now())
            self._refreshing.add_done_callback(_log_failure)
        return self._refreshing

    async def _fetch_now(self) -> None:
        dropped, asked = self._dropped, time.monotonic()
        self._counts = await asyncio.to_thread(self._fetch)
        self._fetched = asked if dropped == self._dropped else 0.0

    def _fetch(self) -> dict[str, int]:
        from ray import serve

        counts: dict[str, int] = {}
        for app in serve.status().applications.values():
            for name, deployment in app.deployments.items():
                counts[name] = counts.get(name, 0) + deployment.replica_states.get("RUNNING", 0)
        return counts


class Readiness:
    """When a model's requests may go ahead (the readiness policy of a RemoteEngine): refused at once when
    no replica runs (503 model_not_ready rather than a wait in Ray's router until one loads), except for a
    model that scales to zero, whose first request is what starts a replica."""

    def __init__(self, handle: Any, deployment: str | None = None, replicas: ReplicaCounter | None = None,
                 scales_to_zero: bool = False):
        self._handle, self._deployment, self._replicas = handle, deployment, replicas
        self._scales_to_zero = scales_to_zero

    async def ready(self) -> bool:
        running = await self._running()
        return running is None or running > 0

    def failed(self) -> None:
        """A call failed (a replica died or is unreachable): stop trusting the cached view."""
        if self._replicas is not None:
            self._replicas.invalidate()

    async def admitted(self, items: AsyncIterator[Any]) -> Any:
        """The call's first item. While it is late, ask (at most every ADMISSION_CHECK_S) whether any
        replica runs: a gateway's cached view may be up to 2 s old, and a request it let through
        after the last replica died would otherwise wait in Ray's router until a replacement loads."""
        first = asyncio.ensure_future(anext(items))
        try:
            while True:
                done, _ = await asyncio.wait({first}, timeout=ADMISSION_CHECK_S)
                if done:
                    return first.result()
                if await self._running(max_age_s=ADMISSION_CHECK_S, wait=True) == 0:
                    raise EngineUnavailable("no running replica took the request")
        finally:
            if not first.done():
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)

    async def _running(self, max_age_s: float = READINESS_TTL_S, wait: bool = False) -> int | None:
        """Running replicas: what the handle's own router knows (no question asked: Ray Serve's
        controller pushes every change to it, and it drops a replica whose call found it dead), else
        the controller's answer through the ReplicaCounter. None when no count decides: neither is at
        hand, or the model scales to zero — it takes requests at zero (the first one starts a replica
        and waits for it, within the gateway's request timeout)."""
        if self._scales_to_zero:
            return None
        seen = router_view(self._handle)
        if seen is not None:
            return seen
        if self._replicas is None or self._deployment is None:
            return None
        return await self._replicas.running(self._deployment, max_age_s, wait)


class RemoteEngine:
    """Implements serving.engine.protocol.Engine over a DeploymentHandle to a ModelServer: Ray Serve
    routes each call (serving.engine.routing: to the replica that holds the request's prefix or
    adapter), `Readiness` decides whether it may go, and the answer comes back over one of two
    transports: the call itself, or the gateway's direct stream to the replica that took it
    (serving.engine.channel), once that connection is up."""

    def __init__(self, handle: Any, deployment: str | None = None, replicas: ReplicaCounter | None = None,
                 channel: ChannelClient | None = None, scales_to_zero: bool = False):
        """scales_to_zero: the model's autoscaling may leave it no replica; a request then waits in Ray
        Serve's router, which is what makes the autoscaler start one, instead of being refused."""
        self.readiness = Readiness(handle, deployment, replicas, scales_to_zero)
        self._handle = handle
        self._generate = handle.options(stream=True).generate
        self._channel = channel

    async def ready(self) -> bool:
        return await self.readiness.ready()

    async def load_adapter(self, name: str, source: str) -> None:
        """Load it on the replica its requests will prefer (routed by the adapter's name, as they are); the
        other replicas load it on their first request for it. Raises ValueError (the engine's reason)."""
        if not await self.readiness.ready():
            raise EngineUnavailable("no ready replica")
        await self._handle.load_adapter.remote(name, source, **{ADAPTER_KWARG: name})

    async def generate(self, route: Route, body: bytes, request_id: str, timeout_s: float | None = None, *,
                       affinity: str | None = None, adapter: str | None = None,
                       adapter_source: str | None = None) -> AsyncIterator[Reply | str | Usage]:
        """`request_id` must be unique among this gateway's requests in flight: the direct stream hands
        each answer to the request registered under its id, and the replica's engine (vLLM) takes it as
        its request id. The gateway passes its internal id (serving.gateway.middleware), never a
        client's x-request-id. `affinity` and `adapter` go to the router (serving.engine.routing) as the
        call's keyword arguments."""
        from ray.serve.exceptions import BackPressureError

        if not await self.readiness.ready():
            raise EngineUnavailable("no ready replica")
        channel = self._channel
        queue = channel.register(request_id) if channel is not None else None
        args = (route, body, request_id, timeout_s) + ((channel.identity,) if channel is not None else ())
        hints = {k: v for k, v in ((AFFINITY_KWARG, affinity), (ADAPTER_KWARG, adapter),
                                   ("adapter_source", adapter_source)) if v}
        stream = self._generate.remote(*args, **hints)
        items = aiter(stream)
        finished = False
        watcher: list[asyncio.Task] = []
        try:
            item = await self.readiness.admitted(items)
            if isinstance(item, Accepted) and item.via_channel and channel is not None and queue is not None:
                answer = _via_channel(channel, request_id, item, items, queue, watcher)
            else:
                answer = _via_call(channel, item, items)
            async for got in answer:
                yield got
            finished = True
        except StopAsyncIteration:
            finished = True
        except BackPressureError as exc:
            raise EngineOverloaded(str(exc)) from exc
        except Exception:
            self.readiness.failed()
            raise
        finally:
            if channel is not None:
                channel.unregister(request_id)
            if not finished:
                # the caller left early: cancelling the call aborts the engine request in the replica
                stream.cancel()
                for task in watcher:
                    task.cancel()


async def _via_call(channel: ChannelClient | None, first: Any, items: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The answer as the call's own items. A replica that offers a direct stream is connected to in the
    background: the next requests to it take it."""
    if not isinstance(first, Accepted):
        yield first  # a ModelServer always sends Accepted first; stand-ins in tests may not
    elif first.address is not None and channel is not None:
        channel.connect(first.address)
    async for item in items:
        yield item


async def _via_channel(channel: ChannelClient, request_id: str, accepted: Accepted, items: AsyncIterator[Any],
                       queue: asyncio.Queue, watcher: list[asyncio.Task]) -> AsyncIterator[Reply | str | Usage]:
    """The answer over the direct stream, up to END, while the call is followed to its end (a replica that
    dies fails the request: _watch). Chunks that arrived together leave as one item (one write to the
    client); token counts that arrived among them go first."""
    channel.bind(request_id, accepted.address)
    task = asyncio.create_task(_watch(items, queue))
    watcher.append(task)
    held = None
    while True:
        got = held if held is not None else await queue.get()
        held = None
        if isinstance(got, Failed):
            raise RuntimeError(got.message)
        if isinstance(got, str):
            if got == END:
                break
            parts = [got]
            while not queue.empty():
                nxt = queue.get_nowait()
                if isinstance(nxt, Usage):
                    yield nxt
                    continue
                if not isinstance(nxt, str) or nxt == END:
                    held = nxt
                    break
                parts.append(nxt)
            got = "".join(parts) if len(parts) > 1 else got
        yield got
    _WATCHERS.add(task)  # the call ends by itself right after; no need to wait for it
    task.add_done_callback(_WATCHERS.discard)


_WATCHERS: set[asyncio.Task] = set()


def _log_failure(refresh: asyncio.Future) -> None:
    if not refresh.cancelled() and refresh.exception() is not None:  # waiters see it; a background one is logged
        logger.warning("asking Ray Serve's controller for running replicas failed: %r", refresh.exception())


async def _watch(items: AsyncIterator[Any], queue: asyncio.Queue) -> None:
    """Follow a direct-stream call to its end: if it fails (the replica died), the request fails."""
    try:
        async for _ in items:
            pass
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - handed to the request's reader
        queue.put_nowait(Failed(f"the model replica failed: {exc!r}"))
