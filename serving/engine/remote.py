"""The gateway's view of a ModelServer deployment: an Engine reached through a Ray Serve handle."""

from __future__ import annotations

from typing import Any, AsyncIterator

from serving.engine.protocol import Reply, Route


class RemoteEngine:
    """Implements serving.engine.protocol.Engine over a DeploymentHandle to a ModelServer."""

    def __init__(self, handle: Any):
        self._generate = handle.options(stream=True).generate
        self._ready = handle.ready

    async def generate(self, route: Route, body: bytes, request_id: str) -> AsyncIterator[Reply | str]:
        stream = self._generate.remote(route, body, request_id)
        finished = False
        try:
            async for item in stream:
                yield item
            finished = True
        finally:
            if not finished:
                # the caller left early: cancelling the call aborts the engine request in the replica
                stream.cancel()

    async def ready(self) -> bool:
        return bool(await self._ready.remote())
