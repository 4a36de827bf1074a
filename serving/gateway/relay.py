"""Engine answer -> HTTP response: status before headers, SSE relayed as it arrives, errors in-band."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Protocol

from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving.engine.protocol import EngineOverloaded, EngineUnavailable, Reply
from serving.gateway.errors import APIError, error_event, error_response, logger

DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class Tap(Protocol):
    """Sees what goes to the client (to count usage, fill the cache); may rewrite stream chunks."""

    def body(self, status: int, body: bytes) -> None: ...
    def chunk(self, chunk: str) -> str: ...
    def end(self) -> None: ...


async def _next(stream: AsyncIterator[Reply | str], deadline: float) -> Reply | str:
    async with asyncio.timeout_at(deadline):
        return await anext(stream)


async def _next_chunk(stream: AsyncIterator[Reply | str], deadline: float) -> str:
    """The next SSE chunk of a stream: after its `Reply` an engine yields only strings."""
    chunk = await _next(stream, deadline)
    if not isinstance(chunk, str):
        raise RuntimeError(f"engine protocol violation: stream item is {type(chunk).__name__}")
    return chunk


async def answer(stream: AsyncIterator[Reply | str], deadline: float, tap: Tap) -> Response:
    """Wait for the engine's first item (and first event of a stream) before sending headers."""
    try:
        reply = await _next(stream, deadline)
        if not isinstance(reply, Reply):
            raise RuntimeError(f"engine protocol violation: first item is {type(reply).__name__}")
        if not reply.streaming:
            await anext(stream, None)  # let the engine's generator finish rather than cancel it
            if reply.status >= 500:
                return _masked(json.loads(reply.body or b"{}"), reply.status)
            tap.body(reply.status, reply.body or b"")
            return Response(reply.body, status_code=reply.status, media_type="application/json")
        first = await _next_chunk(stream, deadline)
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
    early_error = _leading_error(first)
    if early_error is not None:
        await close(stream)
        return _masked(early_error, _status_of(early_error))
    return EventStream(_relay(first, stream, deadline, tap), status_code=reply.status)


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


async def _relay(first: str, stream: AsyncIterator[Reply | str], deadline: float, tap: Tap) -> AsyncIterator[str]:
    """Chunks go out the moment they arrive; failures after the first event go in-band."""
    try:
        chunk = tap.chunk(_mask_errors(first))
        while True:
            if chunk:
                yield chunk
            try:
                chunk = tap.chunk(_mask_errors(await _next_chunk(stream, deadline)))
            except StopAsyncIteration:
                return
    except TimeoutError:
        yield error_event(504, "The request timed out.", code="timeout") + DONE
    except Exception as exc:  # noqa: BLE001 - the stream already started: report in-band
        logger.warning("stream failed: %r", exc)
        yield error_event(503, "The model failed while streaming; retry the request.", code="engine_error") + DONE
    finally:
        await close(stream)
        tap.end()


def _masked(payload: dict[str, Any], status: int) -> Response:
    """An engine's error as our envelope: 4xx as the engine said it, 5xx messages masked."""
    error = payload.get("error")
    if not isinstance(error, dict):
        error = {}
    if status < 500:
        return JSONResponse(payload, status_code=status)
    return error_response(status, str(error.get("message", "")), param=error.get("param"), code=error.get("code"))


def _mask_errors(chunk: str) -> str:
    """An engine's in-band error event (vLLM sends one when it fails mid-stream) in our envelope:
    4xx as the engine said it, 5xx with the message masked, as for a non-streamed answer."""
    if '{"error"' not in chunk:  # the common case: one substring search per chunk
        return chunk
    events = chunk.split("\n\n")
    for i, event in enumerate(events):
        payload = _leading_error(event)
        if payload is not None and _status_of(payload) >= 500:
            error = payload["error"]
            events[i] = error_event(_status_of(payload), str(error.get("message", "")),
                                    code=error.get("code")).removesuffix("\n\n")
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
