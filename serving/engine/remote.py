"""The gateway's view of a ModelServer deployment: an Engine reached through a Ray Serve handle."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

from serving.engine.protocol import EngineOverloaded, EngineUnavailable, Reply, Route

READINESS_TTL_S = 2.0


class ReplicaCounter:
    """Running replicas per deployment, from Ray Serve's controller, refreshed at most every 2 s.

    Asking the replicas themselves would queue the question behind their busy requests."""

    def __init__(self, app_name: str):
        self.app_name = app_name
        self._counts: dict[str, int] = {}
        self._fetched = 0.0
        self._lock = asyncio.Lock()

    async def running(self, deployment: str) -> int:
        async with self._lock:
            if time.monotonic() - self._fetched > READINESS_TTL_S:
                self._counts = await asyncio.to_thread(self._fetch)
                self._fetched = time.monotonic()
        return self._counts.get(deployment, 0)

    def invalidate(self) -> None:
        """A replica failed a call: the next readiness question asks the controller again."""
        self._fetched = 0.0

    def _fetch(self) -> dict[str, int]:
        from ray import serve

        app = serve.status().applications.get(self.app_name)
        if app is None:
            return {}
        return {name: d.replica_states.get("RUNNING", 0) for name, d in app.deployments.items()}


class RemoteEngine:
    """Implements serving.engine.protocol.Engine over a DeploymentHandle to a ModelServer."""

    def __init__(self, handle: Any, deployment: str | None = None, replicas: ReplicaCounter | None = None):
        self._generate = handle.options(stream=True).generate
        self._deployment = deployment
        self._replicas = replicas

    async def generate(self, route: Route, body: bytes, request_id: str,
                       timeout_s: float | None = None) -> AsyncIterator[Reply | str]:
        from ray.serve.exceptions import BackPressureError

        if not await self.ready():
            raise EngineUnavailable("no ready replica")
        stream = self._generate.remote(route, body, request_id, timeout_s)
        finished = False
        try:
            async for item in stream:
                yield item
            finished = True
        except BackPressureError as exc:
            raise EngineOverloaded(str(exc)) from exc
        except Exception:
            if self._replicas is not None:  # a replica died or is unreachable: stop trusting the cached view
                self._replicas.invalidate()
            raise
        finally:
            if not finished:
                # the caller left early: cancelling the call aborts the engine request in the replica
                stream.cancel()

    async def ready(self) -> bool:
        if self._replicas is None or self._deployment is None:
            return True
        return await self._replicas.running(self._deployment) > 0
