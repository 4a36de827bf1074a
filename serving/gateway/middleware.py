"""ASGI middleware of the gateway (plain ASGI: no per-chunk overhead on streams)."""

from __future__ import annotations

import json
import logging
import re
import uuid

from serving.gateway.errors import error_body

logger = logging.getLogger("serving.gateway")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestIdMiddleware:
    """Every response carries `x-request-id`: the client's when it sent a sane one, else a new one.

    Behind Ray Serve's HTTP proxy, which already puts the request's id (the client's or its own) on
    the request and the response, `echo=False` only reads it, so the header is not sent twice.

    Also the last line of defence: an exception before the response started becomes a masked 500
    in the OpenAI envelope, with the request id, instead of Starlette's plain-text page.
    """

    def __init__(self, app, echo: bool = True):
        self.app = app
        self.echo = echo

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        request_id = given if _SAFE_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not self.echo:
                    return await send(message)
                headers = [h for h in message.get("headers", []) if h[0] != b"x-request-id"]
                message["headers"] = [*headers, (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("request %s failed", request_id)
            if started:
                raise
            body = json.dumps(error_body(500, "internal error")).encode()
            await send_with_id({"type": "http.response.start", "status": 500,
                                "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
