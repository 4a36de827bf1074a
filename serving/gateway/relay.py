"""Engine answer -> HTTP response: status before headers, SSE relayed as it arrives, errors in-band.

Every error the engine answers reaches the client in the gateway's envelope (serving.gateway.errors
.engine_error_body): a non-streamed error body of any status, a stream whose first event is an error (then
an HTTP error status), an error event inside an OpenAI stream. 4xx keep vLLM's message and param, 5xx
are masked; `type` and `code` are OpenAI's, not vLLM's exception name and integer status.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Protocol

from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving.engine.protocol import EngineOverloaded, EngineUnavailable, Reply, Usage
from serving.gateway.errors import APIError, engine_error_body, logger, stream_error

DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class Tap(Protocol):
    """Sees what goes to the client (to count usage, fill the cache); may rewrite what is sent."""

    def body(self, status: int, body: bytes) -> bytes:
        """A non-streamed 2xx answer; returns the body the client gets."""
        ...

    def chunk(self, chunk: str) -> str:
        """A stream's chunk (one or more SSE events); returns what the client gets ("" for nothing)."""
        ...

    def failure(self, status: int, message: str, code: str | None) -> str:
        """The in-band end of a stream that fails after it started, in the route's dialect."""
        ...

    def reported(self, usage: Usage) -> None:
        """The engine's token counts of the stream so far (protocol.Usage); never sent to the client."""
        ...

    saving: asyncio.Future | None  # set: sent chunks wait for it (a stored response being written)

    def end(self) -> None: ...


Item = Reply | str | Usage


async def _next(stream: AsyncIterator[Item], deadline: float) -> Item:
    async with asyncio.timeout_at(deadline):
        return await anext(stream)


async def _first_chunk(stream: AsyncIterator[Item], deadline: float, tap: Tap) -> str:
    """The first SSE chunk of a stream (the engine's Usage items before it go to the tap)."""
    async with asyncio.timeout_at(deadline):
        return await _chunk(stream, tap)


async def _chunk(stream: AsyncIterator[Item], tap: Tap) -> str:
    """The next SSE chunk of a stream: after its `Reply` an engine yields only strings and Usage items,
    which go to the tap."""
    while True:
        item = await anext(stream)
        if type(item) is str:
            return item
        if not isinstance(item, Usage):
            raise RuntimeError(f"engine protocol violation: stream item is {type(item).__name__}")
        tap.reported(item)


class Deadline:
    """A stream's deadline, kept by one timer for the whole stream (asyncio.timeout per chunk would
    schedule and cancel a timer for every token). It cancels the task only while that task waits for the
    engine (`next`), which then raises TimeoutError, as asyncio.timeout would; once it has passed, the
    next wait raises at once."""

    def __init__(self, when: float):
        self.when = when
        self.expired = False
        self._waiting: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None

    def _fire(self) -> None:
        self.expired = True
        if self._waiting is not None:
            self._waiting.cancel()

    async def next(self, stream: AsyncIterator[Item], tap: Tap) -> str:
        if self.expired:
            raise TimeoutError
        task = asyncio.current_task()
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_at(self.when, self._fire)
        self._waiting = task
        try:
            return await _chunk(stream, tap)
        except asyncio.CancelledError:
            if self.expired and task is not None and task.uncancel() == 0:
                raise TimeoutError from None  # our cancellation, and no other pending: the deadline
            raise
        finally:
            self._waiting = None

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


async def answer(stream: AsyncIterator[Item], deadline: float, tap: Tap, dialect: str = "openai") -> Response:
    """Wait for the engine's first item (and first event of a stream) before sending headers.
    `dialect` (serving.gateway.specs): the envelope of the route's errors; only an "openai" stream has
    its error events in `data: {"error": ...}` form, which is looked for in its chunks."""
    try:
        reply = await _next(stream, deadline)
        if not isinstance(reply, Reply):
            raise RuntimeError(f"engine protocol violation: first item is {type(reply).__name__}")
        if not reply.streaming:
            await anext(stream, None)  # let the engine's generator finish rather than cancel it
            if reply.status >= 400:  # only answers reach the tap: it counts and caches them
                return _masked(_parsed(reply.body), reply.status, dialect)
            return Response(tap.body(reply.status, reply.body or b""), status_code=reply.status,
                            media_type="application/json")
        first = await _first_chunk(stream, deadline, tap)
    except TimeoutError:
        await close(stream)
        raise APIError(504, "The request timed out before the model answered.", code="timeout") from None
    except (APIError, asyncio.CancelledError):
        await close(stream)
        raise
    except StopAsyncIteration:
        raise APIError(503, "The model ended the request without an answer.", code="engine_error") from None
    except EngineOverloaded:
        raise APIError(503, "The model is overloaded: its request queue is full. Retry shortly.",
                       code="model_overloaded", headers={"retry-after": "1"}) from None
    except EngineUnavailable:
        raise APIError(503, "The model has no ready replica (loading or restarting). Retry shortly.",
                       code="model_not_ready", headers={"retry-after": "5"}) from None
    except Exception as exc:
        await close(stream)
        logger.warning("engine call failed: %r", exc)
        raise APIError(503, "The model is temporarily unavailable; retry shortly.", code="engine_unavailable",
                       headers={"retry-after": "1"}) from exc
    early_error = _leading_error(first) if dialect == "openai" else None
    if early_error is not None:
        await close(stream)
        return _masked(early_error, _status_of(early_error), dialect)
    return EventStream(_relay(first, stream, deadline, tap, dialect), status_code=reply.status)


class EventStream(StreamingResponse):
    """An SSE response that closes its source (and so aborts the engine request) however it ends:
    under ASGI 2.4 a client that hangs up makes `send` raise, and Starlette would leave it open."""

    def __init__(self, content, status_code: int = 200, headers: dict[str, str] | None = None):
        super().__init__(content, status_code=status_code, media_type="text/event-stream",
                         headers={**SSE_HEADERS, **(headers or {})})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


async def _relay(first: str, stream: AsyncIterator[Item], deadline: float, tap: Tap,
                 dialect: str = "openai") -> AsyncIterator[str]:
    """Chunks go out the moment they arrive; failures after the first event go in-band."""
    mapped = _mask_errors if dialect == "openai" else _named_masker(dialect)
    timer = Deadline(deadline)
    try:
        chunk = tap.chunk(mapped(first))
        while True:
            if tap.saving is not None:  # what the chunk tells the client is durable before it is sent
                await asyncio.shield(tap.saving)
                tap.saving = None
            if chunk:
                yield chunk
            try:
                chunk = tap.chunk(mapped(await timer.next(stream, tap)))
            except StopAsyncIteration:
                return
    except TimeoutError:
        yield tap.failure(504, "The request timed out.", "timeout")
    except Exception as exc:  # noqa: BLE001 - the stream already started: report in-band
        logger.warning("stream failed: %r", exc)
        yield tap.failure(503, "The model failed while streaming; retry the request.", "engine_error")
    finally:
        timer.cancel()
        await close(stream)
        tap.end()


def _parsed(body: bytes | None) -> Any:
    """An engine's error body as JSON; None when it is not JSON (engine_error_body copes with that)."""
    try:
        return json.loads(body or b"null")
    except ValueError:
        return None


def _masked(payload: Any, status: int, dialect: str = "openai") -> Response:
    """An engine's error answer (HTTP `status`, its parsed body) in the gateway's envelope
    (engine_error_body): 4xx with vLLM's message and param, 5xx masked, OpenAI's type and code."""
    # a 503 from the engine (still loading, shutting down) is worth retrying, as the gateway's own 503s say
    headers = {"retry-after": "1"} if status == 503 else None
    return JSONResponse(engine_error_body(status, payload, dialect=dialect), status_code=status, headers=headers)


def _named_masker(dialect: str):
    """The in-band errors of a named-event stream (the Responses API's and Anthropic's `event: error`;
    vLLM's Messages converter sends `internal_error` with the exception's text) rebuilt by stream_error:
    the status from a numeric code (else 500: masked), the dialect's types."""

    def masked(chunk: str) -> str:
        if "event: error" not in chunk:  # the common case: one substring search per chunk
            return chunk
        events = chunk.split("\n\n")
        for i, event in enumerate(events):
            kind, _, data = event.partition("\ndata: ")
            if kind != "event: error":
                continue
            try:
                payload = json.loads(data)
            except ValueError:
                payload = {}
            error = payload.get("error") if isinstance(payload.get("error"), dict) else payload
            code = error.get("code") if isinstance(error, dict) else None
            status = code if isinstance(code, int) and 400 <= code < 600 else 500
            message = str(error.get("message", "")) if isinstance(error, dict) else ""
            events[i] = stream_error(dialect, status, message, code if isinstance(code, str) else None).rstrip("\n")
        return "\n\n".join(events)

    return masked


def _mask_errors(chunk: str) -> str:
    """An OpenAI stream's in-band error events (vLLM sends one when it fails mid-stream: its error
    envelope, `code` the HTTP status) in the gateway's envelope, as for a non-streamed answer."""
    if '{"error"' not in chunk:  # the common case: one substring search per chunk
        return chunk
    events = chunk.split("\n\n")
    for i, event in enumerate(events):
        payload = _leading_error(event)
        if payload is not None:
            body = engine_error_body(_status_of(payload), payload)
            events[i] = f"data: {json.dumps(body)}"
    return "\n\n".join(events)


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


async def close(stream: AsyncIterator[Any]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # noqa: BLE001 - closing is best effort; the engine aborts on its side
            pass
