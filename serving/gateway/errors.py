"""One error envelope everywhere: OpenAI's {"error": {"message", "type", "param", "code"}} (Anthropic's
{"type": "error", "error": {"type", "message"}} on its Messages routes), built by `error_body` alone.

Errors the engine (vLLM) answers are put into the same envelope by `engine_error_body`: vLLM's own
(`{"error": {"message", "type": "BadRequestError", "param", "code": 400}}`, vllm.entrypoints.serve
.exception_handling.error_response.create_error_response) carry a Python exception name as `type` and the
HTTP status as an integer `code`, where OpenAI's clients expect an OpenAI error type and a string code.
"""

from __future__ import annotations

import json
import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("serving.gateway")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors), for its Messages routes.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


class APIError(Exception):
    """Raised anywhere in the gateway; rendered as the OpenAI envelope by the handler below."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, *, param: str | None = None, code: str | int | None = None,
               dialect: str = "openai") -> dict:
    """The error envelope of an HTTP `status`: OpenAI's {"error": {"message", "type", "param", "code"}}
    (`dialect` "openai" or "responses"), Anthropic's {"type": "error", "error": {"type", "message"}}
    ("anthropic"). `type` follows from the status (_TYPES, _ANTHROPIC_TYPES). A 5xx other than 503 and
    504 gets a fixed message: what failed inside is logged, never told to the client."""
    if status >= 500 and status not in (503, 504):
        message = "The server had an error while processing your request."  # never leak internals
    if dialect == "anthropic":
        kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    err_type = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


# OpenAI's string `code` for an engine error, from vLLM's message (vLLM's `code` is the HTTP status). First
# match wins. The messages are vLLM 0.32's (vllm/renderers/params.py, vllm/v1/engine/input_processor.py,
# vllm/entrypoints/serve/utils/api_utils.py, vllm/entrypoints/openai/models/serving.py) and the gateway's
# engine layer's (serving.engine.vllm); OpenAI answers a prompt longer than the context with
# `context_length_exceeded` and a model it does not serve with `model_not_found`.
ENGINE_CODES: tuple[tuple[re.Pattern[str], str], ...] = (
    # "This model's maximum context length is N tokens. However, your prompt contains ..." (renderer),
    # "The decoder prompt (length N) is longer than the maximum model length of M." (input processor),
    # "Input length (N) exceeds model's maximum context length (M)." (api_utils),
    # "max_tokens=N cannot be greater than max_model_len=M. ..." (renderer: OpenAI's code for a prompt plus
    # requested output longer than the context is context_length_exceeded too)
    (re.compile(r"maximum context length|maximum model length|max_model_len", re.IGNORECASE),
     "context_length_exceeded"),
    # "The model `x` does not exist.", "LoRA adapter x does not exist"
    (re.compile(r"^The model `[^`]*` does not exist|^LoRA adapter \S+ does not exist"), "model_not_found"),
    # serving.engine.vllm: a replica whose engine is still starting
    (re.compile(r"is still loading"), "model_not_ready"),
)
# The code of an engine error no ENGINE_CODES entry matched: the gateway's own codes for these statuses
# (serving.gateway.relay), null otherwise, as OpenAI's own errors mostly have.
_STATUS_CODES = {503: "engine_unavailable", 504: "timeout"}


def engine_code(status: int, message: str, code: Any) -> str | None:
    """OpenAI's string `code` for an engine error: a string code the engine gave is kept (the gateway's
    engine layer already speaks OpenAI's codes, e.g. "timeout"), else the first ENGINE_CODES pattern that
    matches `message`, else the status's default (_STATUS_CODES) or None. vLLM's integer codes (the HTTP
    status again) are dropped: OpenAI's clients read `code` as a string. A masked 5xx (error_body) gets
    None: its code would tell what its message hides."""
    if status >= 500 and status not in (503, 504):
        return None
    if isinstance(code, str) and code:
        return code
    for pattern, mapped in ENGINE_CODES:
        if pattern.search(message):
            return mapped
    return _STATUS_CODES.get(status)


def engine_error_body(status: int, payload: Any, *, dialect: str = "openai") -> dict:
    """An engine's error answer (HTTP `status`, its parsed JSON body `payload`) in the gateway's envelope
    (error_body): vLLM's `message` (masked for a 5xx other than 503/504) and `param` are kept, `type`
    follows from the status, `code` from engine_code. Takes vLLM's OpenAI shape {"error": {...}}, its
    Anthropic shape {"type": "error", "error": {"type", "message"}} and FastAPI's {"detail": "..."}; any
    other body (not JSON, not an object) gives the status's reason phrase as message."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        detail = payload.get("detail") if isinstance(payload, dict) else None
        error = {"message": detail} if isinstance(detail, str) else {}
    message = error.get("message")
    if not isinstance(message, str) or not message:
        message = _phrase(status)
    param = error.get("param")
    return error_body(status, message, param=param if isinstance(param, str) else None,
                      code=engine_code(status, message, error.get("code")), dialect=dialect)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


def error_response(status: int, message: str, *, param: str | None = None, code: str | int | None = None,
                   headers: dict[str, str] | None = None, dialect: str = "openai") -> JSONResponse:
    return JSONResponse(error_body(status, message, param=param, code=code, dialect=dialect), status_code=status,
                        headers=headers)


def dialect_of(request: Request) -> str:
    """The error envelope of a request's route: Anthropic's on its Messages API (/v1/messages and
    /v1/messages/count_tokens, where Anthropic's SDKs read {"type": "error", ...}), OpenAI's elsewhere."""
    path = request.url.path
    return "anthropic" if path == "/v1/messages" or path.startswith("/v1/messages/") else "openai"


def error_event(status: int, message: str, *, param: str | None = None, code: str | int | None = None) -> str:
    """An error inside an OpenAI stream that already started: one SSE event (the caller sends [DONE])."""
    return f"data: {json.dumps(error_body(status, message, param=param, code=code))}\n\n"


def stream_error(dialect: str, status: int, message: str, code: str | int | None = None) -> str:
    """The in-band end of a stream that fails after it started, in its dialect (serving.gateway.specs):
    OpenAI's error event and `data: [DONE]`; the Responses API's `error` event (OpenAI's
    ResponseErrorEvent: type, code, message, param); Anthropic's `error` event with its envelope. 5xx
    messages masked as in error_body."""
    if dialect == "openai":
        return error_event(status, message, code=code) + "data: [DONE]\n\n"
    body = error_body(status, message, code=code, dialect=dialect)
    if dialect == "responses":
        body = {"type": "error", **{k: body["error"][k] for k in ("code", "message", "param")}}
    return f"event: error\ndata: {json.dumps(body, separators=(',', ':'))}\n\n"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers,
                              dialect=dialect_of(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404 and message == "Not Found":
            message = f"Unknown route {request.method} {request.url.path}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None),
                              dialect=dialect_of(request))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path")) or None
        return error_response(400, f"{param or 'request'}: {first['msg']}", param=param, dialect=dialect_of(request))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        state = request.state
        logger.exception("request %s (x-request-id %s) failed", getattr(state, "request_id", "-"),
                         getattr(state, "client_request_id", "-"))
        return error_response(500, "internal error", dialect=dialect_of(request))
