"""CORS for browser apps on other origins (gateway.cors_allowed_origins), by Starlette's CORSMiddleware.

Off unless origins are configured: then an OPTIONS preflight is answered by the API's own routing (405),
and browsers refuse cross-origin calls. With origins set, a preflight from one of them gets 200 with
Access-Control-Allow-Origin/-Methods/-Headers; from any other origin it gets 400 and no
Access-Control-Allow-Origin, so the browser refuses the call. No credentials (cookies) are allowed: the
API's keys are bearer tokens in headers, which CORS lets through by name (cors_allowed_headers).
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from serving.config import GatewayConfig

# Every route of the API is a GET (models, readiness, stored responses) or a POST; the Responses API's
# DELETE /v1/responses/{id} is the one other method.
ALLOWED_METHODS = ("GET", "POST", "DELETE")
# Response headers a page's script may read: the request id (to report a problem), the rate limits and
# Retry-After (the SDKs' retry logic reads them), whether the answer came from the response cache.
EXPOSED_HEADERS = ("x-request-id", "retry-after", "x-cache",
                   "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
                   "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")
MAX_AGE_S = 600  # how long a browser may reuse a preflight's answer (Chromium caps it at 7200)


def install_cors(app: FastAPI, gateway: GatewayConfig) -> None:
    """Adds Starlette's CORSMiddleware to `app` when gateway.cors_allowed_origins is not empty (else
    nothing). Call it after the other middleware, so that it is the outermost: a preflight is answered
    before anything else runs, and every response, errors included, carries the CORS headers."""
    if not gateway.cors_allowed_origins:
        return
    app.add_middleware(CORSMiddleware, allow_origins=gateway.cors_allowed_origins,
                       allow_methods=ALLOWED_METHODS, allow_headers=gateway.cors_allowed_headers,
                       expose_headers=EXPOSED_HEADERS, allow_credentials=False, max_age=MAX_AGE_S)
