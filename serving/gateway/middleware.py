"""ASGI middleware of the gateway (plain ASGI: no per-chunk overhead on streams)."""

from __future__ import annotations

import json
import logging
import re
import uuid

from serving.gateway.errors import error_body

logger = logging.getLogger("serving.gateway")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def new_request_id() -> str:
    """A fresh internal request id: 32 hex digits from uuid4 (122 random bits), unique among all
    requests in flight on every replica."""
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Gives every request two ids, on `scope["state"]` (so `request.state`):

    - `request_id`: internal, always made here (new_request_id). Everything inside the platform
      keys on it: the engine's request id (vLLM's), the routing of its answer over a direct stream,
      logs. Nothing a client sends decides it: two requests carrying the same `x-request-id` (one
      client's retry, or two tenants) would otherwise share an id, and direct streams would hand
      one of them the other's answer.
    - `client_request_id`: the client's `x-request-id` when it sent a sane one (else the internal
      id). It is only echoed on the response and written to logs, next to the internal one.

    Behind Ray Serve's HTTP proxy, which already puts an `x-request-id` (the client's or its own) on
    the request and the response, `echo=False` only reads it, so the header is not sent twice.

    Also the last line of defence: an exception before the response started becomes a masked 500
    in the OpenAI envelope instead of Starlette's plain-text page.
    """

    def __init__(self, app, echo: bool = True):
        self.app = app
        self.echo = echo

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        request_id = new_request_id()
        client_id = given if _SAFE_ID.match(given) else request_id
        state = scope.setdefault("state", {})
        state["request_id"], state["client_request_id"] = request_id, client_id
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not self.echo:
                    return await send(message)
                headers = [h for h in message.get("headers", []) if h[0] != b"x-request-id"]
                message["headers"] = [*headers, (b"x-request-id", client_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("request %s (x-request-id %s) failed", request_id, client_id)
            if started:
                raise
            body = json.dumps(error_body(500, "internal error")).encode()
            await send_with_id({"type": "http.response.start", "status": 500,
                                "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
