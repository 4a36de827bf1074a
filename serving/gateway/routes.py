"""The POST routes answered by an engine (serving.gateway.specs lists them): read -> authenticate -> route ->
limit -> cache -> engine -> account."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import re
from typing import Any, Mapping

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from serving.config import GatewayConfig, ModelConfig
from serving.engine.protocol import ROUTE_KINDS, Engine, Route
from serving.gateway import schemas as request_schemas
from serving.gateway.accounting import Accounting, EventAccounting
from serving.gateway.affinity import affinity_key
from serving.gateway.auth import Principal, api_key, client_address
from serving.gateway.cache import fresh, replay
from serving.gateway.errors import APIError, error_body
from serving.gateway.limits import Admission, prompt_estimate
from serving.gateway.metrics import Watch
from serving.gateway.relay import EventStream, answer
from serving.gateway.responses import prepare as prepare_turn
from serving.gateway.schemas import UNSUPPORTED, accepted_fields, drop_reference_only, known_fields, unsupported_field
from serving.gateway.services import Registry, Services, model_not_found
from serving.gateway.specs import SPECS
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
            await settled(watch, svc)
        return response

    handler.__name__ = f"create_{route}"
    return handler


async def settled(watch: Watch, svc: Services) -> None:
    """Wait (at most two Redis timeouts) for the release of a non-streamed request's concurrency slot:
    a client that sends its next request when this answer arrives finds the slot free. Through a Redis
    outage the release goes on in the background and the answer does not wait for it."""
    pending = [task for task in watch.pending if task is not None and not task.done()]
    if pending:
        await asyncio.wait(pending, timeout=2 * svc.config.redis.timeout_s)


async def _serve(route: Route, request: Request, svc: Services, watch: Watch) -> Response:
    spec = SPECS[route]
    # the key first: a caller without one costs no body read and no parsing (401 at once)
    principal = await svc.auth.authenticate(api_key(request), client_address(request))
    body = await read_body(request, svc.config.gateway.max_body_bytes, svc.config.gateway.body_timeout_s)
    payload = parse_object(body)
    name, model, engine = await lookup_model(payload, principal, svc)
    watch.begin(name)
    check_request(route, name, model, payload, svc.config.gateway)
    turn = await prepare_turn(payload, principal, svc, request.state.request_id) if route == "responses" else None
    if turn is not None:
        body = json.dumps(payload).encode()  # the history it carries now is prompt too
    admission = await svc.limiter.admit(principal, route, payload, body, svc.spawn)  # may cap payload max_tokens
    watch.on_end(admission.release)  # its concurrency slot and token reservation, however the request ends
    headers = admission.headers
    stream = payload.get("stream") is True
    key, read, write = None, False, False
    if spec.cacheable:
        key, read, write = svc.cache.plan(route, name, model, svc.config.cache_mode(model), principal.subject,
                                          payload, request.headers.get("cache-control"))
    options = payload.get("stream_options")
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
            admission.settle(name, json.loads(entry).get("usage"), cached=True)
            if stream:
                return EventStream(watch.replayed(replay(entry, route, include_usage)), headers=headers)
            return Response(fresh(entry, route), media_type="application/json", headers=headers)
    watch.cache_result(headers["x-cache"])
    # a stream's usage (token limits, accounting, also of a stream the client cuts short) comes from the
    # engine's token counts that travel with it (protocol.Usage): the client's stream_options stay its own
    salt(route, payload, principal, svc)  # after the response cache's key
    body = json.dumps(payload).encode()
    tap: Accounting
    if spec.dialect == "openai":
        tap = Accounting(svc, admission, name, route, watch, cache_key=key if write else None,
                         prompt_estimate=prompt_estimate(body) if stream else 0)
    else:
        tap = EventAccounting(svc, admission, name, route, watch, turn=turn, owner=principal.subject,
                              prompt_estimate=prompt_estimate(body))
    timeout_s = svc.config.gateway.request_timeout_s
    if not stream:
        timeout_s = min(timeout_s, client_timeout_s(request.headers) or timeout_s)
    deadline = asyncio.get_running_loop().time() + timeout_s
    # the internal id (serving.gateway.middleware), never the client's x-request-id
    work = answer(engine.generate(route, body, request.state.request_id, timeout_s, **routing(route, name, model,
                                                                                              payload, svc.registry)),
                  deadline, tap, dialect=spec.dialect)
    # a stream notices a client that hangs up on its own (the next send fails or Starlette's listener
    # fires); a non-streamed request would wait for the whole answer, so it listens for the hang-up
    response = await (work if stream else until_disconnect(request, work))
    if tap.saving is not None:  # a stored response: findable by the time its id reaches the client
        await asyncio.shield(tap.saving)
    response.headers.update(headers)
    return response


async def serve_line(route: Route, payload: dict[str, Any], principal: Principal, svc: Services, *,
                     priority: int, request_id: str) -> tuple[int, bytes]:
    """One request of a batch (serving.gateway.batches), answered as `_serve` answers the same request sent
    interactively without streaming: the same checks, the key's caps, the same engine path and taps (a
    Responses line with `store` is stored). What differs: no RPM, TPM or concurrency slot (a batch is bounded
    by its own lines in flight), no response cache, usage recorded as batch usage, vLLM `priority` set to
    `priority`, and a stream is refused (400). Returns (HTTP status, body in the route's error envelope when
    it is not 2xx); never raises for a bad request. `request_id`: the engine's id (internal, never a
    client's: serving.gateway.middleware)."""
    spec = SPECS[route]
    try:
        name, model, engine = await lookup_model(payload, principal, svc)
        check_request(route, name, model, payload, svc.config.gateway)
        if not model.batches:
            raise APIError(400, f"The model `{name}` does not take batch requests (its batches setting is off).",
                           param="model", code="model_not_batchable")
        if payload.get("stream") is True:
            raise APIError(400, "Requests of a batch cannot stream: leave `stream` out.", param="stream")
        svc.limiter.check_caps(principal, route, payload)
        turn = await prepare_turn(payload, principal, svc, request_id) if route == "responses" else None
        salt(route, payload, principal, svc)
        payload["priority"] = priority
        body = json.dumps(payload).encode()
        admission = Admission(svc.limiter, principal, headers={}, spawn=svc.spawn, batch=True)
        watch = Watch(svc.metrics, route)  # never begun: batch lines are not in the interactive request metrics
        tap: Accounting = Accounting(svc, admission, name, route, watch, cache_key=None) \
            if spec.dialect == "openai" else EventAccounting(svc, admission, name, route, watch, turn=turn,
                                                             owner=principal.subject)
        timeout_s = svc.config.gateway.request_timeout_s
        deadline = asyncio.get_running_loop().time() + timeout_s
        response = await answer(engine.generate(route, body, request_id, timeout_s,
                                                **routing(route, name, model, payload, svc.registry)),
                                deadline, tap, dialect=spec.dialect)
        if tap.saving is not None:
            await asyncio.shield(tap.saving)
        return response.status_code, bytes(response.body)
    except APIError as exc:
        error = error_body(exc.status, exc.message, param=exc.param, code=exc.code, dialect=spec.dialect)
        return exc.status, json.dumps(error).encode()


async def lookup_model(payload: dict[str, Any], principal: Principal,
                       svc: Services) -> tuple[str, ModelConfig, Engine]:
    """The request's model name, configuration and engine (a runtime LoRA adapter's: its base model's); the
    fields only the gateway sets are taken out of `payload`. Raises APIError 400 (no `model` string), 404
    model_not_found (unknown, or not this key's: a runtime adapter is the key's when its base model is)."""
    for field in ENGINE_OWNED:  # the gateway's to set, never the client's
        payload.pop(field, None)
    name = payload.get("model")
    if not isinstance(name, str) or not name:
        raise APIError(400, "You must provide a model parameter (a string).", param="model")
    if svc.config.model(name) is None:
        await svc.registry.fresh(svc.store)  # perhaps an adapter loaded at runtime
    model, engine = svc.registry.lookup(name)
    if not principal.may_use(name) and not (svc.registry.adapter_source(name) and principal.may_use(model.name)):
        raise model_not_found(name)
    return name, model, engine


def check_request(route: Route, name: str, model: ModelConfig, payload: dict[str, Any], gateway: GatewayConfig) -> None:
    """The model's kind serves the route (400 wrong_route) and the request has a shape the gateway accepts
    (check_shape); fields accepted only for OpenAI's sake are dropped from `payload`."""
    if model.kind not in ROUTE_KINDS[route]:
        right = ", ".join(SPECS[r].path for r in SPECS if model.kind in ROUTE_KINDS[r])
        raise APIError(400, f"The model `{name}` is a {model.kind} model: use {right}.", param="model",
                       code="wrong_route")
    check_shape(route, payload, gateway)
    drop_reference_only(route, payload)  # accepted, but vLLM does not know them (serving.gateway.schemas)


def routing(route: Route, name: str, model: ModelConfig, payload: dict[str, Any],
            registry: Registry) -> dict[str, str | None]:
    """What the model's router routes a request on (serving.engine.routing): the key of its prompt's
    prefix (with the key's prefix-cache salt, which the payload carries by now) and its LoRA adapter; for an
    adapter loaded at runtime, where its weights are (the replica loads it on first use)."""
    source = {"adapter_source": registry.adapter_source(name)} if name not in model.served_names else {}
    if model.routing != "affinity":
        return {"adapter": name, **source} if source else {}
    return {"affinity": affinity_key(route, payload, payload.get("cache_salt")),
            "adapter": name if name != model.name else None, **source}


def salt(route: Route, payload: dict[str, Any], principal: Principal, svc: Services) -> None:
    """The key's prefix-cache salt (prefix_salt), on every route whose vLLM request takes one (all that run
    the model), unless the platform shares cached prefixes across keys."""
    if svc.config.cache.prefix_salt == "per_key" and "cache_salt" in known_fields(route):
        payload["cache_salt"] = prefix_salt(principal.subject)


# Request fields only the gateway sets: `cache_salt` (below), vLLM's `request_id` (the engine's id is the
# gateway's internal one, serving.gateway.middleware; vLLM takes it from the x-request-id it is given) and
# vLLM's `priority` (interactive requests run at 0, batch lines below them: serving.gateway.batches).
ENGINE_OWNED = ("cache_salt", "request_id", "priority")
# vLLM's prefix cache is shared by every request on a replica: a cache hit answers measurably faster, so
# one tenant could learn whether another sent a prompt. vLLM mixes `cache_salt` into the hashes of a
# request's cached blocks: requests with different salts never share blocks.
_SALT_KEY = b"serving/prefix-cache-salt/v1"


def prefix_salt(subject: str) -> str:
    """A caller's prefix-cache salt: HMAC-SHA256 of its subject (the key's SHA-256 digest, never the
    key itself), as 64 hex digits (vLLM takes at most 128 characters, none of @ / \\ NUL). The same key
    gets the same salt on every gateway replica, so its own requests still share cached prefixes."""
    return hmac.new(_SALT_KEY, subject.encode(), hashlib.sha256).hexdigest()


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


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request's body, at most `limit` bytes (413 beyond), within `timeout_s` seconds (408 after: HAProxy
    bounds only the time between two pieces of a body, so a body sent a byte at a time has no end there);
    415 unless JSON is declared."""
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type not in ("application/json", ""):
        raise APIError(415, f"Content-Type must be application/json, not {content_type}.")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"Request body is larger than {limit} bytes.")
    parts, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for part in request.stream():
                size += len(part)
                if size > limit:
                    raise APIError(413, f"Request body is larger than {limit} bytes.")
                parts.append(part)
    except TimeoutError:
        raise APIError(408, f"The request body did not arrive within {timeout_s:g} s.", code="body_timeout") from None
    except ClientDisconnect:  # nobody reads the answer; the metrics count it as the client's doing
        raise APIError(CLIENT_CLOSED, "The client closed the connection while sending the request.") from None
    return b"".join(parts)


# Fields the gateway reads itself, with the JSON type it reads them as. vLLM's pydantic models coerce
# ("stream": "true" or 1 streams; "n": "2" gives two choices), so without this the gateway and the engine
# could disagree about a request: a stream the gateway did not ask usage for escapes token accounting.
STRICT_TYPES: dict[str, tuple[type, str]] = {"stream": (bool, "a boolean"), "stream_options": (dict, "an object"),
                                             "n": (int, "an integer")}
STRICT_OPTIONS = ("include_usage", "continuous_usage_stats")


def check_shape(route: Route, payload: dict[str, Any], gateway: GatewayConfig) -> None:
    """What vLLM would not refuse but a serving layer must: unknown fields, too many messages or tools,
    fields the gateway reads that are not of their JSON type (STRICT_TYPES; null is absent)."""
    for field, (kind, name) in STRICT_TYPES.items():
        value = payload.get(field)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise APIError(400, f"`{field}` must be {name}.", param=field)
    for option in STRICT_OPTIONS:
        value = (payload.get("stream_options") or {}).get(option)
        if value is not None and not isinstance(value, bool):
            raise APIError(400, f"`stream_options.{option}` must be a boolean.", param=f"stream_options.{option}")
    refused = unsupported_field(route, payload)
    if refused is not None:
        raise APIError(400, f"`{refused}` is not supported by this server: {UNSUPPORTED[refused]}.", param=refused,
                       code="unsupported_parameter")
    if gateway.reject_unknown_fields:
        unknown = sorted(set(payload) - accepted_fields(route))
        if unknown:
            raise APIError(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
                           code="unknown_parameter")
    for field, limit in (("messages", gateway.max_messages), ("tools", gateway.max_tools)):
        value = payload.get(field)
        if isinstance(value, list) and len(value) > limit:
            raise APIError(400, f"`{field}` has {len(value)} items; at most {limit} are allowed.", param=field,
                           code="too_many_items")


# JSON the gateway accepts. Python's json takes more than RFC 8259 (NaN, Infinity, numbers that overflow
# to inf, integers of any size up to the 4300-digit str conversion limit, lone UTF-16 surrogates) and
# nests as deep as its recursion limit; each of those broke something after parsing (a 500 from a
# later json.dumps, .encode() or int arithmetic), so they are refused here, once, with a 400.
MAX_NESTING = 128  # arrays/objects inside each other; JSON schemas of tools and response_format need far less
INT_RANGE = (-(1 << 63), (1 << 63) - 1)  # no OpenAI parameter is wider (vLLM bounds `seed` to this too)
_LONG_DIGITS = re.compile(r"\d{19}")  # an integer outside INT_RANGE has at least 19 digits
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object. Raises APIError 400 (invalid_request_error) for anything
    but strict UTF-8 JSON (RFC 8259) whose numbers are finite floats or integers in INT_RANGE, whose
    strings are valid Unicode (no lone surrogates), nested at most MAX_NESTING deep, with an object
    at the top."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"The request body is not valid UTF-8: {exc.reason} at byte {exc.start}.") from None
    hooks: dict[str, Any] = {"parse_constant": _no_constant, "parse_float": _finite_float}
    if _LONG_DIGITS.search(text):  # only then pay a Python call per integer
        hooks["parse_int"] = _bounded_int
    try:
        payload = json.loads(text, **hooks)
    except RecursionError:
        raise APIError(400, f"The request body nests deeper than {MAX_NESTING} levels.") from None
    except ValueError as exc:  # JSONDecodeError, and the int conversion limit raises a plain ValueError
        raise APIError(400, f"The request body is not valid JSON: {_short(exc)}") from None
    if not isinstance(payload, dict):
        raise APIError(400, "The request body must be a JSON object.")
    if text.count("[") + text.count("{") > MAX_NESTING and _nesting(payload) > MAX_NESTING:
        raise APIError(400, f"The request body nests deeper than {MAX_NESTING} levels.")
    if _SURROGATE_ESCAPE.search(text) and not _valid_unicode(payload):
        raise APIError(400, "The request body has a string with a lone UTF-16 surrogate (not Unicode text).")
    return payload


def _short(exc: ValueError) -> str:
    return str(exc)[:200]


def _no_constant(name: str) -> Any:
    raise APIError(400, f"The request body is not valid JSON: {name} is not a JSON number.")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise APIError(400, f"The request body has a number out of range: {text[:40]}")
    return value


def _bounded_int(text: str) -> int:
    # the length test first: int() of a huge digit string is itself the expensive part
    if len(text) > 20 or not INT_RANGE[0] <= (value := int(text)) <= INT_RANGE[1]:
        raise APIError(400, f"The request body has an integer out of range: {text[:40]}")
    return value


def _nesting(value: Any) -> int:
    """How deep arrays and objects nest in `value` (iterative: no recursion limit to hit)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item
        todo.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _valid_unicode(payload: dict[str, Any]) -> bool:
    try:
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_ERROR = {"description": "OpenAI error envelope", "content": {"application/json": {"schema": {
    "type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "integer", "null"]}}}}}}}}


_ANTHROPIC_ERROR = {"description": "Anthropic error envelope", "content": {"application/json": {"schema": {
    "type": "object", "required": ["type", "error"], "properties": {
        "type": {"const": "error"}, "error": {"type": "object", "required": ["type", "message"], "properties": {
            "type": {"type": "string"}, "message": {"type": "string"}}}}}}}}


def operation(route: Route) -> dict[str, Any]:
    """The OpenAPI operation of an engine route: vLLM's own request schema, the route's error envelope."""
    spec = SPECS[route]
    # vLLM lets `model` default to its one model; the gateway serves many, so it is required here
    schema = {"allOf": [request_schemas.load()["routes"][route],
                        {"type": "object", "required": ["model"], "properties": {"model": {"type": "string"}}}]}
    content = {"application/json": {}, "text/event-stream": {"description": "SSE stream when `stream` is true"}} \
        if spec.generates and route != "count_tokens" else {"application/json": {}}
    error = _ANTHROPIC_ERROR if spec.dialect == "anthropic" else _ERROR
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": {"200": {"description": "The answer", "content": content},
                          **{str(code): error for code in (400, 401, 404, 413, 415, 429, 503, 504)}}}


# The routes answered by an engine, one per entry of serving.gateway.specs
router = APIRouter(tags=["engine"])
for _route, _spec in SPECS.items():
    router.add_api_route(_spec.path, openai_route(_route), methods=["POST"], response_model=None,
                         summary=_spec.summary, openapi_extra=operation(_route))
