"""The OpenAI POST routes: read -> authenticate -> route -> limit -> cache -> engine -> account."""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Mapping

from fastapi import Request
from fastapi.responses import Response

from serving.config import GatewayConfig
from serving.engine.protocol import ROUTE_KINDS, Route
from serving.gateway.auth import Principal
from serving.gateway.cache import StreamAssembler, replay
from serving.gateway.errors import APIError
from serving.gateway.metrics import UNKNOWN_MODEL, GatewayMetrics
from serving.gateway.relay import EventStream, answer
from serving.gateway.schemas import known_fields
from serving.gateway.services import Services, model_not_found
from serving.gateway.store import StoreUnavailable


def openai_route(route: Route):
    async def handler(request: Request) -> Response:
        svc: Services = request.app.state.services
        watch = Watch(svc.metrics, route)
        try:
            response = await _serve(route, request, svc, watch)
        except APIError as exc:
            watch.refused(exc)
            raise
        except Exception:
            watch.finish(500)
            raise
        if not isinstance(response, EventStream):  # a stream is finished by its tap when it ends
            watch.finish(response.status_code)
        return response

    handler.__name__ = f"create_{route}"
    return handler


async def _serve(route: Route, request: Request, svc: Services, watch: "Watch") -> Response:
    body = await read_body(request, svc.config.gateway.max_body_bytes)
    payload = parse_object(body)
    name = payload.get("model")
    if not isinstance(name, str) or not name:
        raise APIError(400, "You must provide a model parameter (a string).", param="model")
    principal = await svc.auth.authenticate(request.headers.get("authorization"))
    if not principal.may_use(name):
        raise model_not_found(name)
    model, engine = svc.registry.lookup(name)
    watch.begin(name)
    if ROUTE_KINDS[route] != model.kind:
        right = "/v1/embeddings" if model.kind == "embed" else "/v1/chat/completions or /v1/completions"
        raise APIError(400, f"The model `{name}` is a {model.kind} model: use {right}.", param="model",
                       code="wrong_route")
    check_shape(route, payload, svc.config.gateway)
    headers = await svc.limiter.check(principal)
    key, read, write = svc.cache.plan(route, name, model, svc.config.cache_mode(model), principal.subject,
                                      payload, request.headers.get("cache-control"))
    stream = payload.get("stream") is True
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError(400, "`stream_options` must be an object.", param="stream_options")
    include_usage = stream and bool((options or {}).get("include_usage"))
    headers["x-cache"] = "bypass" if key is None or not read else "miss"
    if key is not None and read:
        try:
            entry = await svc.cache.get(key)
        except StoreUnavailable:  # the cache could not be consulted: the request bypasses it
            entry, headers["x-cache"] = None, "bypass"
        if entry is not None:
            headers["x-cache"] = "hit"
            watch.cache_result("hit")
            svc.spawn(svc.limiter.record(principal, name, json.loads(entry).get("usage"), cached=True))
            if stream:
                return EventStream(watch.replayed(replay(entry, route, include_usage)), headers=headers)
            return Response(entry, media_type="application/json", headers=headers)
    watch.cache_result(headers["x-cache"])
    shows = Shown()
    if stream:
        # usage is needed for token limits and accounting, also of a stream the client cuts short: vLLM's
        # running usage gives its prompt tokens from the first chunk on. What the client did not ask for
        # is taken out again.
        shows = Shown(usage=include_usage, running=include_usage and bool(options.get("continuous_usage_stats")),
                      per_prompt=None if route == "chat" else _choices_per_prompt(payload))
        payload["stream_options"] = {**(options or {}), "include_usage": True, "continuous_usage_stats": True}
        body = json.dumps(payload).encode()
    tap = Accounting(svc, principal, name, route, watch, shows=shows, cache_key=key if write else None)
    timeout_s = svc.config.gateway.request_timeout_s
    if not stream:
        timeout_s = min(timeout_s, client_timeout_s(request.headers) or timeout_s)
    deadline = asyncio.get_running_loop().time() + timeout_s
    work = answer(engine.generate(route, body, request.state.request_id, timeout_s), deadline, tap)
    # a stream notices a client that hangs up on its own (the next send fails or Starlette's listener
    # fires); a non-streamed request would wait for the whole answer, so it listens for the hang-up
    response = await (work if stream else until_disconnect(request, work))
    response.headers.update(headers)
    return response


# The official SDKs tell the server how long they will wait for an answer (openai: the read timeout;
# anthropic: the timeout). Behind HAProxy the gateway cannot see a non-streamed request's client hang up
# (docs/security.md), so a request is not worked on past the moment its SDK gives up on it (and retries).
CLIENT_TIMEOUT_HEADERS = ("x-stainless-read-timeout", "x-stainless-timeout")


def client_timeout_s(headers: Mapping[str, str]) -> float | None:
    """Seconds the client says it will wait (the first of CLIENT_TIMEOUT_HEADERS that is a positive
    finite number), else None. It can only shorten the request's own deadline, never lengthen it."""
    for name in CLIENT_TIMEOUT_HEADERS:
        try:
            value = float(headers.get(name, ""))
        except ValueError:
            continue
        if 0 < value < float("inf"):
            return value
    return None


CLIENT_CLOSED = 499  # nginx's "client closed request", as Ray Serve's proxy records it


async def until_disconnect(request: Request, work) -> Response:
    """Await `work`; a client that hangs up meanwhile cancels it, and so aborts the engine request."""
    answer_task = asyncio.ensure_future(work)

    async def hung_up() -> bool:
        try:
            while (await request.receive())["type"] != "http.disconnect":
                pass
        except Exception:  # noqa: BLE001 - a server that cannot tell: wait for the answer as before
            await asyncio.Event().wait()
        return True

    listener = asyncio.ensure_future(hung_up())
    try:
        await asyncio.wait({answer_task, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (answer_task, listener):
            if not task.done():
                task.cancel()
        await asyncio.gather(answer_task, listener, return_exceptions=True)
    if answer_task.cancelled():  # the client left first: nobody reads this, the metrics count it
        return Response(status_code=CLIENT_CLOSED)
    return answer_task.result()


class Watch:
    """Metrics of one request: counted once when it ends, however it ends."""

    def __init__(self, metrics: GatewayMetrics, route: Route):
        self.metrics, self.route = metrics, route
        self.model = UNKNOWN_MODEL
        self.started = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.counted_in_flight = False
        self.done = False

    def begin(self, model: str) -> None:
        self.model = model
        self.started = self.metrics.started(model)
        self.counted_in_flight = True

    def cache_result(self, result: str) -> None:
        self.metrics.cache.inc(1, {"model": self.model, "result": result})

    def chunk(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.metrics.ttft.observe(now - self.started, {"model": self.model, "route": self.route})
        self.last = now

    def replayed(self, events: list[str]):
        try:
            for event in events:
                self.chunk()
                yield event
        finally:
            self.finish(200)

    def refused(self, exc: APIError) -> None:
        if exc.status == 401 or exc.code == "auth_unavailable":
            self.metrics.auth_failures.inc(1, {"reason": exc.code or "unknown"})
        elif exc.status == 429:
            self.metrics.rate_limited.inc(1, {"model": self.model})
        self.finish(exc.status)

    def finish(self, status: int, usage: dict[str, Any] | None = None) -> None:
        if self.done:
            return
        self.done = True
        if self.counted_in_flight:
            self.metrics.finished(self.model, self.route, status, self.started)
        else:
            self.metrics.requests.inc(1, {"model": self.model, "route": self.route, "status": str(status)})
        self.metrics.tokens(self.model, usage)
        tokens = (usage or {}).get("completion_tokens") or 0
        if self.first is not None and self.last is not None and tokens > 1:
            self.metrics.itl.observe((self.last - self.first) / (tokens - 1), {"model": self.model, "route": self.route})


@dataclass(frozen=True)
class Shown:
    """What of a stream's usage the client asked for: vLLM's closing usage chunk (`include_usage`), its
    running usage on every chunk (`continuous_usage_stats`). per_prompt: choices per prompt of a
    completions request (`n`; their index is prompt * n + choice), None for chat (one prompt)."""

    usage: bool = True
    running: bool = True
    per_prompt: int | None = None


_USAGE = ',"usage":{'
_INDEX = re.compile(r'"choices":\[\{"index":(\d+)')
_DECODER = json.JSONDecoder()


class Accounting:
    """The relay's tap: takes usage from the answer, fills the cache, records usage and metrics at the end."""

    def __init__(self, svc: Services, principal: Principal, model: str, route: Route, watch: Watch, *,
                 shows: Shown, cache_key: str | None):
        self.svc, self.principal, self.model, self.watch = svc, principal, model, watch
        self.shows = shows
        self.cache_key = cache_key
        self.assembler = StreamAssembler(route) if cache_key else None
        self.usage: dict[str, Any] | None = None
        self.events = 0  # streamed events with output, to count tokens of a stream cut before its usage chunk
        self.prompts: dict[int, int] = {}  # prompt -> its tokens, from a stream's running usage
        self.completions: dict[int, int] = {}  # choice index -> tokens so far, from the running usage

    def body(self, status: int, body: bytes) -> None:
        if status != 200:
            return
        self.usage = json.loads(body).get("usage")
        self.svc.metrics.tokens(self.model, self.usage)
        self.svc.spawn(self.svc.limiter.record(self.principal, self.model, self.usage, cached=False))
        if self.cache_key:
            self.svc.spawn(self.svc.cache.put(self.cache_key, body))

    def chunk(self, chunk: str) -> str:
        self.watch.chunk()
        self.events += chunk.count('"choices":[{')
        if self.assembler is not None:
            self.assembler.feed(chunk)
        if _USAGE not in chunk:  # cheap test on every chunk
            return chunk
        return "\n\n".join(event for event in map(self._take_usage, chunk.split("\n\n")) if event is not None)

    def _take_usage(self, event: str) -> str | None:
        """Notes the usage an event carries; returns the event as the client asked for it (None: not at all)."""
        at = event.find(_USAGE)
        if at < 0 or not event.startswith("data: {"):
            return event
        try:
            usage, end = _DECODER.raw_decode(event, at + len(_USAGE) - 1)
        except ValueError:
            return event
        if event.find('"choices":[]', 0, at) >= 0:  # vLLM's usage chunk, after the last choice chunk
            self.usage = usage
            return event if self.shows.usage else None
        found = _INDEX.search(event, 0, at)
        index = int(found.group(1)) if found else 0
        prompt = 0 if self.shows.per_prompt is None else index // self.shows.per_prompt
        self.prompts.setdefault(prompt, int(usage.get("prompt_tokens") or 0))
        self.completions[index] = int(usage.get("completion_tokens") or 0)
        return event if self.shows.running else event[:at] + event[end:]

    def end(self) -> None:
        if self.usage is None and (self.events or self.prompts):
            # the stream ended before vLLM's usage chunk (client gone, engine failure): count what the running
            # usage said so far, or one token per event sent, so that hanging up early escapes no token limit
            completion = sum(self.completions.values()) if self.completions else self.events
            prompt = sum(self.prompts.values())
            self.usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        self.watch.finish(200, self.usage)
        self.svc.spawn(self.svc.limiter.record(self.principal, self.model, self.usage, cached=False))
        result = self.assembler.result() if self.assembler is not None else None
        if result is not None and self.cache_key:
            self.svc.spawn(self.svc.cache.put(self.cache_key, json.dumps(result, separators=(",", ":")).encode()))


def _choices_per_prompt(payload: dict[str, Any]) -> int:
    n = payload.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1


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


def check_shape(route: Route, payload: dict[str, Any], gateway: GatewayConfig) -> None:
    """What vLLM would not refuse but a serving layer must: unknown fields, too many messages or tools."""
    if gateway.reject_unknown_fields:
        unknown = sorted(set(payload) - known_fields(route))
        if unknown:
            raise APIError(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
                           code="unknown_parameter")
    for field, limit in (("messages", gateway.max_messages), ("tools", gateway.max_tools)):
        value = payload.get(field)
        if isinstance(value, list) and len(value) > limit:
            raise APIError(400, f"`{field}` has {len(value)} items; at most {limit} are allowed.", param=field,
                           code="too_many_items")


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
