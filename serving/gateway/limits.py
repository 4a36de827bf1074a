"""Per-key rate limits (requests and tokens per minute, sliding window) and usage accounting."""

from __future__ import annotations

import logging
import math
import time

from serving.config import LimitsConfig
from serving.gateway.auth import Principal
from serving.gateway.errors import APIError
from serving.gateway.store import Resilient, StoreUnavailable

logger = logging.getLogger("serving.gateway")


class Limiter:
    def __init__(self, config: LimitsConfig, store: Resilient, on_limited=None):
        self.config = config
        self._store = store
        self._on_limited = on_limited

    async def check(self, principal: Principal) -> dict[str, str]:
        """Admit one request or raise 429; returns the x-ratelimit-* headers for the response."""
        if not principal.limited:
            return {}
        rpm, tpm = principal.rpm or 0, principal.tpm or 0
        try:
            admitted, requests, tokens, reset = await self._store.call(
                "rate_check", principal.subject, rpm, tpm, self.config.window_s)
        except StoreUnavailable:
            if self.config.failure_policy == "closed":
                raise APIError(503, "Rate limits cannot be checked right now; retry shortly.",
                               code="limits_unavailable", headers={"retry-after": "2"}) from None
            return {}
        headers = _headers(rpm, tpm, requests, tokens, reset)
        if admitted:
            return headers
        if self._on_limited is not None:
            self._on_limited()
        which = ("requests per min (RPM)", rpm, requests) if rpm and requests >= rpm else \
                ("tokens per min (TPM)", tpm, tokens)
        headers["retry-after"] = str(max(1, math.ceil(reset)))
        raise APIError(429, f"Rate limit reached for key {principal.name!r} on {which[0]}: Limit {which[1]}, "
                            f"Used {which[2]}. Retry after {headers['retry-after']}s.",
                       code="rate_limit_exceeded", headers=headers)

    async def record(self, principal: Principal, model: str, usage: dict | None, *, cached: bool) -> None:
        """Count a finished request: tokens into the TPM window (engine work only), usage by model and day."""
        prompt = int((usage or {}).get("prompt_tokens") or 0)
        completion = int((usage or {}).get("completion_tokens") or 0)
        counts = {"requests": 1, "prompt_tokens": prompt, "completion_tokens": completion, "cached_requests": int(cached)}
        try:
            if principal.tpm and not cached and prompt + completion:
                await self._store.call("tokens_add", principal.subject, prompt + completion, self.config.window_s)
            await self._store.call("usage_add", principal.subject, time.strftime("%Y-%m-%d", time.gmtime()),
                                   model, counts)
        except StoreUnavailable:
            logger.warning("usage of %s on %s not recorded: store unavailable", principal.name, model)


def _headers(rpm: int, tpm: int, requests: int, tokens: int, reset: float) -> dict[str, str]:
    headers = {}
    reset_s = f"{max(0.0, reset):.0f}s"
    if rpm:
        headers.update({"x-ratelimit-limit-requests": str(rpm),
                        "x-ratelimit-remaining-requests": str(max(0, rpm - requests)),
                        "x-ratelimit-reset-requests": reset_s})
    if tpm:
        headers.update({"x-ratelimit-limit-tokens": str(tpm),
                        "x-ratelimit-remaining-tokens": str(max(0, tpm - tokens)),
                        "x-ratelimit-reset-tokens": reset_s})
    return headers
