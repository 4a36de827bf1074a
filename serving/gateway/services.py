"""What the gateway's routes work with, built once per gateway replica by create_app."""

from __future__ import annotations

import asyncio
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
from serving.gateway.store import Resilient

if TYPE_CHECKING:  # both modules work with Services themselves
    from serving.gateway.batch_runner import BatchRunner
    from serving.gateway.files import FileStorage

logger = logging.getLogger("serving.gateway")


def model_not_found(name: str) -> APIError:
    # the same answer for a model that does not exist and one the key may not use: no names leak
    return APIError(404, f"The model `{name}` does not exist or you do not have access to it.", param="model",
                    code="model_not_found")


class Registry:
    """Which engine and model configuration answers each served model name (models and adapters)."""

    def __init__(self, config: ServingConfig, engines: Mapping[str, Engine]):
        missing = [m.name for m in config.models if m.name not in engines]
        if missing:
            raise ValueError(f"no engine for model(s): {', '.join(missing)}")
        self.config = config
        self.engines = dict(engines)
        self.created = int(time.time())

    def lookup(self, name: str) -> tuple[ModelConfig, Engine]:
        model = self.config.model(name)
        if model is None:
            raise model_not_found(name)
        return model, self.engines[model.name]

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
