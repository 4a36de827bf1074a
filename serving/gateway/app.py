"""The gateway: an OpenAI-compatible FastAPI app that routes each request to its model's engine.

`create_app(config, engines)` wires everything; nothing here is module-global. It imports neither
torch nor vllm, so gateway replicas start in seconds.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Any, AsyncIterator, Mapping

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving.config import ModelConfig, ServingConfig
from serving.engine.protocol import ROUTE_KINDS, Engine, Reply, Route
from serving.gateway.errors import APIError, error_event, error_response, install_error_handlers, logger
from serving.gateway.middleware import RequestIdMiddleware

DONE = "data: [DONE]\n\n"
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_ROUTES: dict[Route, str] = {"chat": "/v1/chat/completions", "completion": "/v1/completions", "embedding": "/v1/embeddings"}
_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["model"],
    "properties": {"model": {"type": "string", "description": "A name from GET /v1/models."}},
    "additionalProperties": True,
}


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
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
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
                })
        return cards


def get_registry(request: Request) -> Registry:
    return request.app.state.registry


Reg = Annotated[Registry, Depends(get_registry)]


def create_app(config: ServingConfig, engines: Mapping[str, Engine], *, echo_request_id: bool = True) -> FastAPI:
    """The gateway app. `echo_request_id=False` behind Ray Serve's proxy, which sends x-request-id itself."""
    registry = Registry(config, engines)
    app = FastAPI(title="serving", version="0.1.0", description="OpenAI-compatible API for many LLMs.")
    app.state.registry = registry
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware, echo=echo_request_id)

    @app.get("/health", summary="Liveness: the gateway answers.")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: every model has a loaded replica.")
    async def ready(registry: Reg) -> JSONResponse:
        names = list(registry.engines)
        states = await asyncio.gather(*(_is_ready(registry.engines[n]) for n in names))
        models = dict(zip(names, states))
        if all(states):
            return JSONResponse({"status": "ready", "models": models})
        waiting = ", ".join(n for n, ok in models.items() if not ok)
        body = {"error": {"message": f"models not ready: {waiting}", "type": "service_unavailable_error",
                          "param": None, "code": "not_ready"}, "models": models}
        return JSONResponse(body, status_code=503, headers={"retry-after": "5"})

    @app.get("/v1/models", summary="Models and LoRA adapters served.")
    async def list_models(registry: Reg) -> dict[str, Any]:
        return {"object": "list", "data": registry.cards()}

    @app.get("/v1/models/{model:path}", summary="One served model.")
    async def get_model(model: str, registry: Reg) -> dict[str, Any]:
        for card in registry.cards():
            if card["id"] == model:
                return card
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    for route, path in _ROUTES.items():
        app.add_api_route(path, _route_handler(route), methods=["POST"], response_model=None,
                          openapi_extra={"requestBody": {"required": True, "content": {
                              "application/json": {"schema": _REQUEST_SCHEMA}}}})
    return app


async def _is_ready(engine: Engine) -> bool:
    try:
        return await asyncio.wait_for(engine.ready(), timeout=5)
    except Exception:  # noqa: BLE001 - not ready is the answer, whatever the reason
        return False


def _route_handler(route: Route):
    async def handler(request: Request) -> Response:
        registry: Registry = request.app.state.registry
        gateway = registry.config.gateway
        body = await _read_body(request, gateway.max_body_bytes)
        name = _model_name(body)
        model, engine = registry.lookup(name)
        if ROUTE_KINDS[route] != model.kind:
            right = "/v1/embeddings" if model.kind == "embed" else "/v1/chat/completions or /v1/completions"
            raise APIError(400, f"The model `{name}` is a {model.kind} model: use {right}.", param="model",
                           code="wrong_route")
        deadline = asyncio.get_running_loop().time() + gateway.request_timeout_s
        return await _answer(engine.generate(route, body, request.state.request_id), deadline)

    handler.__name__ = f"create_{route}"
    return handler


async def _read_body(request: Request, limit: int) -> bytes:
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type not in ("application/json", ""):
        raise APIError(415, f"Content-Type must be application/json, not {content_type}.")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"Request body is larger than {limit} bytes.")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise APIError(413, f"Request body is larger than {limit} bytes.")
        parts.append(part)
    return b"".join(parts)


def _model_name(body: bytes) -> str:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"The request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise APIError(400, "The request body is nested too deeply.") from exc
    if not isinstance(payload, dict):
        raise APIError(400, "The request body must be a JSON object.")
    name = payload.get("model")
    if not isinstance(name, str) or not name:
        raise APIError(400, "You must provide a model parameter (a string).", param="model")
    return name


async def _next(stream: AsyncIterator[Reply | str], deadline: float) -> Reply | str:
    async with asyncio.timeout_at(deadline):
        return await anext(stream)


async def _answer(stream: AsyncIterator[Reply | str], deadline: float) -> Response:
    """Wait for the engine's first item (and first event of a stream) before sending headers."""
    try:
        reply = await _next(stream, deadline)
        if not isinstance(reply, Reply):
            raise RuntimeError(f"engine protocol violation: first item is {type(reply).__name__}")
        if not reply.streaming:
            await anext(stream, None)  # let the engine's generator finish rather than cancel it
            if reply.status >= 500:
                return _masked(json.loads(reply.body or b"{}"), reply.status)
            return Response(reply.body, status_code=reply.status, media_type="application/json")
        first = await _next(stream, deadline)
    except TimeoutError:
        await _close(stream)
        raise APIError(504, "The request timed out before the model answered.", code="timeout") from None
    except (APIError, asyncio.CancelledError):
        await _close(stream)
        raise
    except StopAsyncIteration:
        raise APIError(503, "The model ended the request without an answer.", code="engine_error") from None
    except Exception as exc:
        await _close(stream)
        logger.warning("engine call failed: %r", exc)
        raise APIError(503, "The model is temporarily unavailable; retry shortly.", code="engine_unavailable",
                       headers={"retry-after": "1"}) from exc
    early_error = _leading_error(first)
    if early_error is not None:
        await _close(stream)
        return _masked(early_error, _status_of(early_error))
    return _EventStream(_relay(first, stream, deadline), status_code=reply.status,
                        media_type="text/event-stream", headers=_SSE_HEADERS)


class _EventStream(StreamingResponse):
    """Closes the relay (and so aborts the engine request) however the response ends: under ASGI
    2.4 a client that hangs up makes `send` raise, and Starlette would leave the generator open."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _masked(payload: dict[str, Any], status: int) -> Response:
    """An engine's error as our envelope: 4xx as the engine said it, 5xx messages masked."""
    error = payload.get("error") if isinstance(payload.get("error"), dict) else {}
    if status < 500:
        return JSONResponse(payload, status_code=status)
    return error_response(status, str(error.get("message", "")), param=error.get("param"), code=error.get("code"))


async def _relay(first: str, stream: AsyncIterator[Reply | str], deadline: float) -> AsyncIterator[str]:
    """Chunks go out the moment they arrive; failures after the first event go in-band."""
    try:
        yield first
        while True:
            try:
                chunk = await _next(stream, deadline)
            except StopAsyncIteration:
                return
            yield chunk
    except TimeoutError:
        yield error_event(504, "The request timed out.", code="timeout") + DONE
    except Exception as exc:  # noqa: BLE001 - the stream already started: report in-band
        logger.warning("stream failed: %r", exc)
        yield error_event(503, "The model failed while streaming; retry the request.", code="engine_error") + DONE
    finally:
        await _close(stream)


def _leading_error(chunk: str) -> dict[str, Any] | None:
    if not chunk.startswith('data: {"error"'):
        return None
    try:
        payload = json.loads(chunk.split("\n\n", 1)[0][len("data: "):])
    except json.JSONDecodeError:
        return None
    return payload if isinstance(payload.get("error"), dict) else None


def _status_of(payload: dict[str, Any]) -> int:
    code = payload["error"].get("code")
    return code if isinstance(code, int) and 400 <= code < 600 else 500


async def _close(stream: AsyncIterator[Any]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # noqa: BLE001 - closing is best effort; the engine aborts on its side
            pass
