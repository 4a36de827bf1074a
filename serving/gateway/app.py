"""The gateway: an OpenAI-compatible FastAPI app that routes each request to its model's engine.

`create_app(config, engines, store=...)` wires everything; nothing here is module-global. It imports
neither torch nor vllm, so gateway replicas start in seconds.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any, Mapping

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from serving.config import ServingConfig
from serving.engine.protocol import Engine
from serving.gateway import schemas as request_schemas
from serving.gateway.adapters import router as adapters_router
from serving.gateway.auth import Authenticator, Principal, api_key, client_address
from serving.gateway.batch_runner import BatchRunner
from serving.gateway.batches import router as batches_router
from serving.gateway.cache import ResponseCache
from serving.gateway.cors import install_cors
from serving.gateway.errors import APIError, install_error_handlers
from serving.gateway.files import FileStorage
from serving.gateway.files import router as files_router
from serving.gateway.limits import LEASE_SLACK_S, Limiter
from serving.gateway.metrics import GatewayMetrics, PrometheusBackend
from serving.gateway.middleware import RequestIdMiddleware
from serving.gateway.responses import router as responses_router
from serving.gateway.routes import router as engine_router
from serving.gateway.services import Registry, Services, Svc
from serving.gateway.store import Resilient, Store, build_store


def _install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(request_schemas.load()["components"])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]



def build_services(config: ServingConfig, engines: Mapping[str, Engine], store: Store | None = None,
                   metrics: GatewayMetrics | None = None) -> Services:
    metrics = metrics if metrics is not None else GatewayMetrics(PrometheusBackend())
    resilient = Resilient(store if store is not None else build_store(config.redis),
                          timeout_s=config.redis.timeout_s, retry_interval_s=config.redis.retry_interval_s,
                          on_error=lambda op: metrics.redis_errors.inc(1, {"operation": op}),
                          max_concurrency=config.redis.max_connections, wait_s=config.redis.pool_timeout_s)
    services = Services(config=config, registry=Registry(config, engines), store=resilient,
                        auth=Authenticator(config.auth, resilient, limits=config.limits),
                        limiter=Limiter(config.limits, resilient,
                                        lease_s=config.gateway.request_timeout_s + LEASE_SLACK_S),
                        cache=ResponseCache(config.cache, resilient), metrics=metrics,
                        files=FileStorage(config.files.storage_url))
    services.batches = BatchRunner(services)
    return services


def create_app(config: ServingConfig, engines: Mapping[str, Engine], *, store: Store | None = None,
               metrics: GatewayMetrics | None = None, echo_request_id: bool = True) -> FastAPI:
    """The gateway app. `store`: where cache, keys, limits and usage live (default: from config.redis).
    `metrics`: default a private prometheus_client registry (Ray deployments pass the Ray backend).
    `echo_request_id=False` behind Ray Serve's proxy, which sends x-request-id itself."""
    services = build_services(config, engines, store, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        services.batches.start()  # resumes batches no replica runs (serving.gateway.batch_runner)
        yield
        await services.batches.stop()
        await services.drain()
        await services.store.close()

    # redirect_slashes off: Starlette would answer `POST /v1/chat/completions/` with a 307 whose Location
    # it builds from the Host header (an open redirect); a path with a trailing slash is a 404 instead
    app = FastAPI(title="serving", version="0.1.0", description="OpenAI-compatible API for many LLMs.",
                  lifespan=lifespan, redirect_slashes=False)
    app.state.services = services
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware, echo=echo_request_id)
    install_cors(app, config.gateway)  # after the other middleware: the outermost

    @app.get("/health", summary="Liveness: the gateway answers.")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: every model has a loaded replica (names only to keys that may use them).")
    async def ready(request: Request, svc: Svc) -> JSONResponse:
        names = list(svc.registry.engines)
        states = await asyncio.gather(*(_is_ready(svc.registry.engines[n]) for n in names))
        return readiness(dict(zip(names, states, strict=True)), await _viewer(request, svc))

    @app.get("/v1/models", summary="Models and LoRA adapters served (those the API key may use).")
    async def list_models(request: Request, svc: Svc) -> dict[str, Any]:
        principal = await svc.auth.authenticate(api_key(request), client_address(request))
        await svc.registry.fresh(svc.store)  # adapters loaded at runtime, from any gateway
        return {"object": "list", "data": [c for c in svc.registry.cards() if _visible(principal, c, svc.registry)]}

    @app.get("/v1/models/{model:path}", summary="One served model.")
    async def get_model(model: str, request: Request, svc: Svc) -> dict[str, Any]:
        principal = await svc.auth.authenticate(api_key(request), client_address(request))
        await svc.registry.fresh(svc.store)
        for card in svc.registry.cards():
            if card["id"] == model and _visible(principal, card, svc.registry):
                return card
        raise APIError(404, f"The model `{model}` does not exist or you do not have access to it.",
                       param="model", code="model_not_found")

    app.include_router(engine_router)
    app.include_router(responses_router)
    app.include_router(files_router)
    app.include_router(adapters_router)
    app.include_router(batches_router)
    _install_openapi(app)
    return app


def _visible(principal: Principal, card: dict[str, Any], registry: Registry) -> bool:
    """A model card the key may see: a model it may use, or an adapter loaded at runtime on such a model."""
    return principal.may_use(card["id"]) or (card["id"] in registry.runtime and principal.may_use(card["parent"]))


async def _viewer(request: Request, svc: Services) -> Principal | None:
    """Whose key asks /ready: the principal (ANONYMOUS with auth off), None without a valid key.
    Readiness is probed without keys; an absent, wrong or uncheckable key only hides the names."""
    if svc.auth.enabled and not api_key(request):
        return None
    try:
        return await svc.auth.authenticate(api_key(request), client_address(request))
    except APIError:
        return None


def readiness(models: dict[str, bool], viewer: Principal | None) -> JSONResponse:
    """/ready's answer: 200 when every model is ready, else 503 with Retry-After, in both cases with
    `ready` and `total` (model counts). `models` (name -> ready) lists only the models `viewer` may use,
    and is absent for None (no valid key): a model's name is not told to who may not use it."""
    ready = sum(models.values())
    body: dict[str, Any] = {"ready": ready, "total": len(models)}
    shown = None if viewer is None else {n: ok for n, ok in models.items() if viewer.may_use(n)}
    if shown is not None:
        body["models"] = shown
    if ready == len(models):
        return JSONResponse({"status": "ready", **body})
    waiting = [n for n, ok in (shown or {}).items() if not ok]
    message = f"models not ready: {', '.join(waiting)}" if waiting else \
        f"{len(models) - ready} of {len(models)} models not ready"
    error = {"message": message, "type": "service_unavailable_error", "param": None, "code": "not_ready"}
    return JSONResponse({"error": error, **body}, status_code=503, headers={"retry-after": "5"})


async def _is_ready(engine: Engine) -> bool:
    try:
        return await asyncio.wait_for(engine.ready(), timeout=5)
    except Exception:  # noqa: BLE001 - not ready is the answer, whatever the reason
        return False
