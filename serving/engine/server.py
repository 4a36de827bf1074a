"""ModelServer: the Ray Serve deployment that owns one engine (one model and its LoRA adapters)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from serving.config import ModelConfig
from serving.engine.channel import Accepted, ChannelServer
from serving.engine.protocol import Reply, Route, Usage

logger = logging.getLogger(__name__)


class ModelServer:
    """Holds a vLLM engine (or the fake one, for gateway tests and benchmarks) in a replica.

    Deployed once per model by serving.app; vllm is imported only inside the replica.
    """

    # Ray Serve awaits an async __init__ (the vLLM engine starts in it); mypy knows only plain classes
    async def __init__(  # type: ignore[misc]
            self, model: dict[str, Any], engine: str = "vllm", fake_options: dict[str, Any] | None = None):
        self.model = ModelConfig.model_validate(model)
        self._channel: ChannelServer | None = None  # started on the first call of a direct-streams gateway
        self._channel_lock = asyncio.Lock()
        self._channel_unavailable = False  # it could not listen: answers go through the calls
        if engine == "fake":
            from serving.engine.fake import FakeEngine

            self.engine: Any = FakeEngine(self.model.name, **(fake_options or {}))
        else:
            from serving.engine.vllm import VLLMEngine

            self.engine = VLLMEngine(self.model, ray_metrics=True)
            await self.engine.start()

    async def generate(self, route: Route, body: bytes, request_id: str, timeout_s: float | None = None,
                       gateway: tuple[str, str] | None = None, *, affinity: str | None = None,
                       adapter: str | None = None, adapter_source: str | None = None,
                       ) -> AsyncIterator[Reply | str | Usage | Accepted]:
        """One request's answer, after an `Accepted` sent at once: Ray delivers a caller's cancellation
        only to a call that has yielded something, so without it a non-streamed request whose client
        left would hold its engine slot until its timeout. `gateway` (id, secret) comes from a gateway
        with direct streams: the answer then goes over that gateway's connection if it is up. The
        secret reaches the replica only here, inside Ray's call; the connection proves it without
        sending it (serving.engine.channel). `affinity` and `adapter` were for the router (serving.engine
        .routing) that chose this replica."""
        items = self.engine.generate(route, body, request_id, timeout_s, adapter=adapter,
                                     adapter_source=adapter_source)
        # the engine starts on the request now (vLLM parses it, applies the chat template, tokenizes),
        # while Accepted travels to the gateway; engines never yield None
        first = asyncio.ensure_future(anext(items, None))
        try:
            channel = await self._channel_server() if gateway is not None else None
            outbox = channel.outbox(*gateway) if channel is not None and gateway is not None else None
            via_channel = outbox is not None and outbox.connected
            yield Accepted(channel.address if channel is not None else None, via_channel)
            if via_channel and channel is not None and outbox is not None:
                await channel.serve(outbox, request_id, _after(first, items))
                return
            async for item in _after(first, items):
                yield item
        finally:
            if not first.done():
                first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            await items.aclose()  # the call ended or was cancelled: the engine request ends too

    async def _channel_server(self) -> ChannelServer | None:
        """The direct-stream listener, started by the first call that asks for it; None when it cannot
        listen (then every answer goes through its Ray call, as with direct streams off)."""
        async with self._channel_lock:
            if self._channel is None and not self._channel_unavailable:
                channel = ChannelServer()  # on this node's address as Ray knows it, not every interface
                try:
                    await channel.start()
                except OSError as exc:  # e.g. Ray's node address is not one of this host's (NAT)
                    logger.warning("direct streams off for %s: cannot listen: %r", self.model.name, exc)
                    self._channel_unavailable = True
                    return None
                self._channel = channel
        return self._channel

    async def ready(self) -> bool:
        return await self.engine.ready()

    async def load_adapter(self, name: str, source: str, *, adapter: str | None = None) -> None:
        """Load a LoRA adapter into this replica's engine (`adapter`: for the router). Raises ValueError."""
        await self.engine.load_adapter(name, source)

    async def record_routing_stats(self) -> dict[str, Any]:
        """What the gateways' routers know of this replica (Ray Serve asks every
        request_routing_stats_period_s): `adapters`, the LoRA adapters its engine holds loaded now."""
        loaded = getattr(self.engine, "loaded_adapters", None)
        return {"adapters": sorted(await loaded()) if loaded is not None else []}

    async def stats(self) -> dict[str, float]:
        """Requests the engine holds now (`unfinished`), finished (stop/length), aborted, tokens generated."""
        return await self.engine.stats()

    async def check_health(self) -> None:
        check = getattr(self.engine, "check_health", None)
        if check is not None:
            await check()

    async def __del__(self) -> None:
        if self._channel is not None:
            await self._channel.stop()
        stop = getattr(self.engine, "stop", None)
        if stop is not None:
            try:
                await stop()
            except Exception:  # shutting down: logged, nothing left to tell
                logger.exception("stopping the engine of %s", self.model.name)


async def _after(first: asyncio.Future, items: AsyncIterator[Any]) -> AsyncGenerator[Any, None]:
    """`items`, the first of which `first` already asked for."""
    item = await first
    if item is None:
        return
    yield item
    async for item in items:
        yield item


class ModelIngress:
    """The ingress of a model's application, in front of its ModelServer deployment, which the gateways call
    directly (by deployment name). It exists because Ray Serve refuses a custom request router on an
    application's ingress deployment when HAProxy serves HTTP (the router would be bypassed for HTTP
    traffic), and the model's deployment routes by affinity (serving.engine.routing). The application has
    no HTTP route, so nothing reaches this deployment; it reserves no CPU and holds only the handle
    that makes the ModelServer deployment part of its application."""

    def __init__(self, server: Any):
        self.server = server

