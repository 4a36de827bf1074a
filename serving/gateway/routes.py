"""The OpenAI POST routes: read -> authenticate -> route -> limit -> cache -> engine -> account."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from serving.engine.protocol import ROUTE_KINDS, Route
from serving.gateway.auth import Principal
from serving.gateway.cache import StreamAssembler, replay
from serving.gateway.errors import APIError
from serving.gateway.relay import EventStream, answer
from serving.gateway.services import Services, model_not_found


def openai_route(route: Route):
    async def handler(request: Request) -> Response:
        svc: Services = request.app.state.services
        body = await read_body(request, svc.config.gateway.max_body_bytes)
        payload = parse_object(body)
        name = payload.get("model")
        if not isinstance(name, str) or not name:
            raise APIError(400, "You must provide a model parameter (a string).", param="model")
        principal = await svc.auth.authenticate(request.headers.get("authorization"))
        if not principal.may_use(name):
            raise model_not_found(name)
        model, engine = svc.registry.lookup(name)
        if ROUTE_KINDS[route] != model.kind:
            right = "/v1/embeddings" if model.kind == "embed" else "/v1/chat/completions or /v1/completions"
            raise APIError(400, f"The model `{name}` is a {model.kind} model: use {right}.", param="model",
                           code="wrong_route")
        headers = await svc.limiter.check(principal)
        key, read, write = svc.cache.plan(route, name, model, svc.config.cache_mode(model), principal.subject,
                                          payload, request.headers.get("cache-control"))
        stream = payload.get("stream") is True
        include_usage = stream and bool((payload.get("stream_options") or {}).get("include_usage"))
        headers["x-cache"] = "bypass" if key is None or not read else "miss"
        if key is not None and read:
            entry = await svc.cache.get(key)
            if entry is not None:
                headers["x-cache"] = "hit"
                svc.spawn(svc.limiter.record(principal, name, json.loads(entry).get("usage"), cached=True))
                if stream:
                    return EventStream(iter(replay(entry, route, include_usage)), headers=headers)
                return Response(entry, media_type="application/json", headers=headers)
        if stream and not include_usage:
            # usage is needed for token limits and accounting; the extra chunk is taken out again
            payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
            body = json.dumps(payload).encode()
        tap = Accounting(svc, principal, name, route, strip_usage=stream and not include_usage,
                         cache_key=key if write else None)
        deadline = asyncio.get_running_loop().time() + svc.config.gateway.request_timeout_s
        response = await answer(engine.generate(route, body, request.state.request_id), deadline, tap)
        response.headers.update(headers)
        return response

    handler.__name__ = f"create_{route}"
    return handler


class Accounting:
    """The relay's tap: takes usage from the answer, fills the cache, records usage when it ends."""

    def __init__(self, svc: Services, principal: Principal, model: str, route: Route, *, strip_usage: bool,
                 cache_key: str | None):
        self.svc, self.principal, self.model = svc, principal, model
        self.strip_usage = strip_usage
        self.cache_key = cache_key
        self.assembler = StreamAssembler(route) if cache_key else None
        self.usage: dict[str, Any] | None = None

    def body(self, status: int, body: bytes) -> None:
        if status != 200:
            return
        self.usage = json.loads(body).get("usage")
        self.svc.spawn(self.svc.limiter.record(self.principal, self.model, self.usage, cached=False))
        if self.cache_key:
            self.svc.spawn(self.svc.cache.put(self.cache_key, body))

    def chunk(self, chunk: str) -> str:
        if self.assembler is not None:
            self.assembler.feed(chunk)
        if '"usage"' not in chunk:  # cheap test on every chunk; only the usage chunk has the field
            return chunk
        kept = []
        for event in chunk.split("\n\n"):
            if event.startswith("data: {") and '"usage"' in event:
                data = json.loads(event[6:])
                if not data.get("choices") and data.get("usage"):
                    self.usage = data["usage"]
                    if self.strip_usage:
                        continue
            kept.append(event)
        return "\n\n".join(kept)

    def end(self) -> None:
        self.svc.spawn(self.svc.limiter.record(self.principal, self.model, self.usage, cached=False))
        result = self.assembler.result() if self.assembler is not None else None
        if result is not None and self.cache_key:
            self.svc.spawn(self.svc.cache.put(self.cache_key, json.dumps(result, separators=(",", ":")).encode()))


async def read_body(request: Request, limit: int) -> bytes:
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


def parse_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"The request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise APIError(400, "The request body is nested too deeply.") from exc
    if not isinstance(payload, dict):
        raise APIError(400, "The request body must be a JSON object.")
    return payload
