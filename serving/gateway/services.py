"""What the gateway's routes work with, built once per gateway replica by create_app."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Coroutine, Mapping

from fastapi import Depends, Request

from serving.config import ModelConfig, ServingConfig
from serving.engine.protocol import PATHS, ROUTE_KINDS, Engine
from serving.gateway.auth import Authenticator, Principal, api_key, client_address
from serving.gateway.cache import ResponseCache
from serving.gateway.errors import APIError
from serving.gateway.limits import Limiter
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.store import Resilient, StoreUnavailable

if TYPE_CHECKING:  # both modules work with Services themselves
    from serving.gateway.batch_runner import BatchRunner
    from serving.gateway.files import FileStorage

logger = logging.getLogger("serving.gateway")


def model_not_found(name: str) -> APIError:
    # the same answer for a model that does not exist and one the key may not use: no names leak
    return APIError(404, f"The model `{name}` does not exist or you do not have access to it.", param="model",
                    code="model_not_found")


# The store's record kind and index of LoRA adapters loaded at runtime (serving.gateway.adapters): one
# platform-wide registry, not a key's (owner PLATFORM).
ADAPTERS, PLATFORM = "adapters", "_platform"
ADAPTERS_TTL_S = 2.0  # a gateway's view of the runtime adapters is at most this old when a request needs it


class Registry:
    """Which engine and model configuration answers each served model name: the configured models and
    their adapters, and the LoRA adapters loaded at runtime (kept in the store, `refresh`)."""

    def __init__(self, config: ServingConfig, engines: Mapping[str, Engine]):
        missing = [m.name for m in config.models if m.name not in engines]
        if missing:
            raise ValueError(f"no engine for model(s): {', '.join(missing)}")
        self.config = config
        self.engines = dict(engines)
        self.created = int(time.time())
        self.runtime: dict[str, dict[str, Any]] = {}  # adapter name -> {"name", "model", "path", "created_at"}
        self._fetched = 0.0
        self._refreshing: asyncio.Future | None = None

    def lookup(self, name: str) -> tuple[ModelConfig, Engine]:
        model = self.config.model(name)
        if model is None and name in self.runtime:
            model = self.config.model(self.runtime[name]["model"])
        if model is None:
            raise model_not_found(name)
        return model, self.engines[model.name]

    def adapter_source(self, name: str) -> str | None:
        """Where a runtime adapter's weights are (None: not one)."""
        found = self.runtime.get(name)
        return found["path"] if found else None

    async def fresh(self, store: Resilient) -> None:
        """Refresh the runtime adapters when the view is older than ADAPTERS_TTL_S (concurrent callers share
        one read; a store that cannot answer leaves the view as it was)."""
        if time.monotonic() - self._fetched < ADAPTERS_TTL_S:
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self.refresh(store))
        await asyncio.shield(self._refreshing)

    async def refresh(self, store: Resilient) -> None:
        try:
            names = await store.call("index_range", ADAPTERS, newest_first=False)
            raw = await store.call("record_get", ADAPTERS, PLATFORM, names)
        except StoreUnavailable:
            return
        self.runtime = {n: json.loads(r) for n, r in zip(names, raw, strict=True) if r}
        self._fetched = time.monotonic()

    def cards(self) -> list[dict[str, Any]]:
        cards = []
        for model in self.config.models:
            for name in model.served_names:
                adapter = name != model.name
                cards.append({
                    "id": name, "object": "model", "created": self.created, "owned_by": "serving",
                    "root": name if adapter else model.source, "parent": model.name if adapter else None,
                    "kind": model.kind,
                    # the POST routes that serve this model (a route of another kind answers 400 wrong_route)
                    "routes": [PATHS[route] for route, kinds in ROUTE_KINDS.items() if model.kind in kinds],
                })
        # adapters loaded at runtime, as the configured ones are shown (their weights' path is not told)
        cards += [{"id": name, "object": "model", "created": int(found["created_at"]), "owned_by": "serving",
                   "root": name, "parent": found["model"], "kind": "generate",
                   "routes": [PATHS[route] for route, kinds in ROUTE_KINDS.items() if "generate" in kinds]}
                  for name, found in self.runtime.items() if self.config.model(found["model"]) is not None]
        return cards


@dataclass
class Services:
    config: ServingConfig
    registry: Registry
    store: Resilient
    auth: Authenticator
    limiter: Limiter
    cache: ResponseCache
    metrics: GatewayMetrics
    files: FileStorage
    # the batches this replica runs (serving.gateway.batch_runner); build_services sets it
    batches: BatchRunner = field(init=False)
    _tasks: set[asyncio.Task] = field(default_factory=set)

    def spawn(self, work: Coroutine) -> asyncio.Task:
        """Bookkeeping after a response (usage, cache writes): off the request's critical path."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("background work failed: %r", task.exception())

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def get_services(request: Request) -> Services:
    """The app's Services (create_app puts them on app.state), as a FastAPI dependency."""
    return request.app.state.services


Svc = Annotated[Services, Depends(get_services)]


async def principal_of(request: Request) -> AsyncIterator[Principal]:
    """The caller, admitted by its key's RPM and concurrency limits for the request's duration (requests
    that run no model: stored responses, files, batches; no tokens are reserved)."""
    svc: Services = request.app.state.services
    principal = await svc.auth.authenticate(api_key(request), client_address(request))
    admission = await svc.limiter.admit(principal, None, {}, b"", svc.spawn)
    try:
        yield principal
    finally:
        admission.release()


Caller = Annotated[Principal, Depends(principal_of)]
