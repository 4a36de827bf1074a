"""Per-key limits: caps on a request (`n`, `max_tokens`), on a key's requests in flight, RPM and TPM
(sliding window), and usage accounting.

`Limiter.admit` checks a request's shape against its key's caps (400), then admits it in one atomic
store call (one Lua script in Redis, so limits hold across gateway replicas) or refuses it (429): a
concurrency lease of the key, one request of its RPM, and a reservation of the most tokens the
request can use: its prompt, estimated from the body (`BYTES_PER_TOKEN` bytes a token), plus its
`max_tokens` for each choice. Every admitted request's worst case is counted before it runs, so
concurrent requests cannot overshoot TPM.

The returned `Admission` lives as long as the request. `settle(model, usage)` records what the answer
used; `release()`, called once however the request ends (answered, failed, client gone, timed out),
gives the lease back and replaces the reservation by the settled usage (a request that ends without
a known usage is refunded). Both are synchronous: the store work runs in the background.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Coroutine

from serving.config import LimitsConfig
from serving.engine.protocol import Route
from serving.gateway.auth import ANONYMOUS, Principal
from serving.gateway.errors import APIError
from serving.gateway.specs import SPECS
from serving.gateway.store import Admitted, Resilient, StoreUnavailable

logger = logging.getLogger("serving.gateway")

# The prompt's token estimate: the request body's bytes / 4. English text averages about 4 characters
# a token; the JSON around the prompt makes it an overestimate, which the settled usage corrects.
BYTES_PER_TOKEN = 4
# A lease outlives the longest request (request_timeout_s) by this much; it frees the slot of a request
# whose gateway died before releasing it.
LEASE_SLACK_S = 60.0
# A release that fails (Redis away) is tried again after these waits, so that a short outage does not
# keep the key's slots taken until their leases expire.
RELEASE_RETRIES_S = (0.5, 1.0, 2.0, 4.0, 8.0)
# Bigger counts cannot be reserved in Redis (64-bit counters); no key's TPM is anywhere near.
_HUGE = 1 << 53

Spawn = Callable[[Coroutine], Any]  # runs a coroutine in the background; may return its task


@dataclass(frozen=True)
class Caps:
    """A key's caps in effect (its own, else the platform's); 0 = no cap."""

    max_concurrent: int
    max_n: int
    max_tokens: int


class Admission:
    """One admitted request's hold on its key's limits. headers: the x-ratelimit-* of the response."""

    def __init__(self, limiter: "Limiter", principal: Principal, *, headers: dict[str, str], spawn: Spawn,
                 lease: str | None = None, bucket: int = 0, reserved: int = 0, batch: bool = False):
        """batch: a line of a batch (serving.gateway.batches), which holds no lease and no reservation and is
        not charged to TPM; its usage is recorded as batch_requests, batch_prompt_tokens and
        batch_completion_tokens, apart from the key's interactive usage."""
        self.batch = batch
        self.headers = headers
        self.principal = principal
        self._limiter, self._spawn = limiter, spawn
        self._loop = asyncio.get_running_loop()
        self._lease, self._bucket, self.reserved = lease, bucket, reserved
        self.used = 0  # engine tokens (prompt + completion) settled; cached answers use none
        self.released = False
        # the release's background task (when the request ended on the event loop): a non-streamed answer
        # waits for it briefly, so the key's next request finds its concurrency slot free
        self.releasing: Any = None

    def settle(self, model: str, usage: dict[str, Any] | None, *, cached: bool) -> None:
        """What the request used (the answer's `usage`): recorded by model and day, and charged to TPM
        at release. `cached`: answered from the cache (no engine tokens)."""
        prompt = int((usage or {}).get("prompt_tokens") or 0)
        completion = int((usage or {}).get("completion_tokens") or 0)
        if self.batch:
            counts = {"batch_requests": 1, "batch_prompt_tokens": prompt, "batch_completion_tokens": completion}
            self._later(self._limiter.record, self.principal, model, counts)
            return
        if not cached:
            self.used = prompt + completion
        counts = {"requests": 1, "prompt_tokens": prompt, "completion_tokens": completion,
                  "cached_requests": int(cached)}
        self._later(self._limiter.record, self.principal, model, counts)

    def release(self) -> Any:
        """The request ended: its lease is given back and its reservation replaced by what it used. Once.
        Returns the background task doing it (None when there is nothing to give back, or it was queued
        from another thread)."""
        if self.released:
            return None
        self.released = True
        used = self.used if self.principal.tpm else 0
        if self._lease is not None or self.reserved or used:
            self.releasing = self._later(self._limiter.release, self.principal, self._lease or "", self._bucket,
                                         self.reserved, used)
        return self.releasing

    def _later(self, work: Callable[..., Coroutine], *args: Any) -> Any:
        """Run `work(*args)` in the background on the request's event loop, also when called from another
        thread (Starlette iterates a replayed stream, and so ends its request, in a worker thread)."""
        try:
            here = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            here = False
        if here:
            return self._spawn(work(*args))
        self._loop.call_soon_threadsafe(lambda: self._spawn(work(*args)))
        return None


class Limiter:
    """Per-key caps, RPM, TPM and concurrency, on `store`. `lease_s`: longest a request may hold its
    concurrency slot when its gateway never releases it (set it above the request timeout)."""

    def __init__(self, config: LimitsConfig, store: Resilient, on_limited=None, lease_s: float = 600 + LEASE_SLACK_S):
        self.config = config
        self._store = store
        self._on_limited = on_limited
        self.lease_s = lease_s

    def caps(self, principal: Principal) -> Caps:
        """The key's caps, else the platform's; the concurrency cap only for keys (not with auth off)."""
        concurrent = principal.max_concurrent or self.config.max_concurrent
        return Caps(max_concurrent=0 if principal is ANONYMOUS else concurrent or 0,
                    max_n=principal.max_n or self.config.max_n or 0,
                    max_tokens=principal.max_tokens or self.config.max_tokens or 0)

    async def admit(self, principal: Principal, route: Route | None, payload: dict[str, Any], body: bytes,
                    spawn: Spawn) -> Admission:
        """Admit one request of `principal` (payload: its parsed `body`) or raise. A request without
        max_tokens gets the key's cap in `payload` when the engine's default would exceed it. `route`
        None: a request that runs no model (reading a stored response): RPM and concurrency only.

        Raises APIError 400 (code above_limit: `n` or `max_tokens` above the key's cap), 429 with
        Retry-After (rate_limit_exceeded: RPM or TPM; concurrency_limit_exceeded; request_too_large: its
        reservation alone exceeds TPM), 503 limits_unavailable (Redis down and failure_policy closed).
        Release the returned Admission when the request ends."""
        caps = self.caps(principal)
        if route is not None:
            _apply_caps(route, payload, caps)
        reserve = self.reservation(route, payload, body) if principal.tpm and route is not None else 0
        if principal.tpm and reserve > principal.tpm:
            raise APIError(429, f"Request too large for key {principal.name!r} on tokens per min (TPM): Limit "
                                f"{principal.tpm}, Requested {reserve} (prompt estimate + max_tokens for each "
                                "choice). Lower max_tokens or n, or shorten the prompt.", code="request_too_large")
        if not (principal.rpm or principal.tpm or caps.max_concurrent):
            return Admission(self, principal, headers={}, spawn=spawn)
        lease = uuid.uuid4().hex
        try:
            result: Admitted = await self._store.call(
                "admit", principal.subject, lease, rpm=principal.rpm or 0, tpm=principal.tpm or 0, reserve=reserve,
                max_concurrent=caps.max_concurrent, window_s=self.config.window_s, lease_s=self.lease_s)
        except StoreUnavailable:
            if self.config.failure_policy == "closed" and principal.limited:
                raise APIError(503, "Rate limits cannot be checked right now; retry shortly.",
                               code="limits_unavailable", headers={"retry-after": "2"}) from None
            return Admission(self, principal, headers={}, spawn=spawn)
        headers = _headers(principal.rpm or 0, principal.tpm or 0, result.requests, result.tokens, result.reset_s)
        if result.refused is not None:
            self._refuse(principal, caps, result, reserve, headers)
        return Admission(self, principal, headers=headers, spawn=spawn,
                         lease=lease if caps.max_concurrent else None, bucket=result.bucket, reserved=reserve)

    def check_caps(self, principal: Principal, route: Route, payload: dict[str, Any]) -> None:
        """The key's caps on one request (`n`, max_tokens; see admit) without admitting it: a batch line."""
        _apply_caps(route, payload, self.caps(principal))

    def reservation(self, route: Route, payload: dict[str, Any], body: bytes) -> int:
        """Tokens a request may use at most: prompt estimate (body bytes / BYTES_PER_TOKEN) + its
        max_tokens (or the default it gets) for each choice of each prompt."""
        spec = SPECS[route]
        if not spec.billed:  # counting or converting tokens runs no model: nothing to reserve
            return 0
        prompt = prompt_estimate(body)
        if not spec.generates:
            return prompt
        limit = _largest(payload, spec.token_fields)
        if limit is None:  # what vLLM does without one: 16 for completions, the rest of the context otherwise
            limit = spec.default_tokens or self.config.reserve_max_tokens
        choices = _count(payload.get("n")) * (_prompts(payload) if route == "completion" else 1) if spec.choices else 1
        return min(_HUGE, prompt + limit * choices)

    def _refuse(self, principal: Principal, caps: Caps, result: Admitted, reserve: int, headers: dict[str, str]):
        if self._on_limited is not None:
            self._on_limited()
        headers["retry-after"] = str(max(1, math.ceil(result.reset_s)))
        if result.refused == "concurrent":
            raise APIError(429, f"Too many concurrent requests for key {principal.name!r}: Limit "
                                f"{caps.max_concurrent}. Retry when one of them has finished.",
                           code="concurrency_limit_exceeded", headers=headers)
        if result.refused == "requests":
            which = f"requests per min (RPM): Limit {principal.rpm}, Used {result.requests}"
        else:
            which = f"tokens per min (TPM): Limit {principal.tpm}, Used {result.tokens}, Requested {reserve}"
        raise APIError(429, f"Rate limit reached for key {principal.name!r} on {which}. "
                            f"Retry after {headers['retry-after']}s.", code="rate_limit_exceeded", headers=headers)

    async def record(self, principal: Principal, model: str, counts: dict[str, int]) -> None:
        """Usage by key, model and day (what `serving keys usage` shows)."""
        try:
            await self._store.call("usage_add", principal.subject, time.strftime("%Y-%m-%d", time.gmtime()),
                                   model, counts)
        except StoreUnavailable:
            logger.warning("usage of %s on %s not recorded: store unavailable", principal.name, model)

    async def release(self, principal: Principal, lease: str, bucket: int, reserved: int, used: int) -> None:
        """Give a lease back and settle a reservation, tried again through a short Redis outage."""
        for wait in (0.0, *RELEASE_RETRIES_S):
            await asyncio.sleep(wait)
            try:
                await self._store.call("release", principal.subject, lease, bucket=bucket, reserved=reserved,
                                       used=used, window_s=self.config.window_s)
                return
            except StoreUnavailable:
                continue
        logger.warning("limits of %s not settled (store unavailable): its slot frees when its lease expires",
                       principal.name)


def prompt_estimate(body: bytes) -> int:
    """A request's prompt tokens as estimated from its body: body bytes / BYTES_PER_TOKEN, at least 1."""
    return max(1, len(body) // BYTES_PER_TOKEN)


def _apply_caps(route: Route, payload: dict[str, Any], caps: Caps) -> None:
    """400 for `n` or max_tokens above the caps; a request without max_tokens gets the cap when the
    engine's default would be larger."""
    spec = SPECS[route]
    if not spec.generates:
        return
    if spec.choices and caps.max_n and _number(payload.get("n")) and payload["n"] > caps.max_n:
        raise APIError(400, f"`n` is above this key's limit of {caps.max_n} choices per request.", param="n",
                       code="above_limit")
    fields = spec.token_fields
    for field in fields:
        if caps.max_tokens and _number(payload.get(field)) and payload[field] > caps.max_tokens:
            raise APIError(400, f"`{field}` is above this key's limit of {caps.max_tokens} tokens.", param=field,
                           code="above_limit")
    if not caps.max_tokens or _largest(payload, fields) is not None:
        return
    if spec.default_tokens is not None and caps.max_tokens >= spec.default_tokens:  # the default is within the cap
        return
    payload[fields[0]] = caps.max_tokens


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(value: Any) -> int:
    """A count from the request, for the reservation: 1 when absent or not a number (vLLM refuses those)."""
    if not _number(value) or not value >= 1:  # `not >=` also catches NaN
        return 1
    return _HUGE if value >= _HUGE else int(value)


def _largest(payload: dict[str, Any], fields: tuple[str, ...]) -> int | None:
    given = [_count(payload[f]) for f in fields if _number(payload.get(f))]
    return max(given) if given else None


def _prompts(payload: dict[str, Any]) -> int:
    """Prompts of a completions request: a list of strings or of token lists is several."""
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1


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
