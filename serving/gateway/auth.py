"""API keys: stored as SHA-256 digests (never in clear), each with a name, models, RPM/TPM, caps and expiry.

A flood of wrong keys costs little: a key found unknown is remembered as such for a few seconds (no
second Redis lookup), concurrent lookups of one key share one call, and each client address may try
only `limits.failed_auth_per_source` unknown keys per window on a replica (429 beyond, without asking
Redis). Keys this replica verified before are never held back by that limit.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any, NoReturn

from cachetools import TTLCache
from starlette.requests import HTTPConnection

from serving.config import AuthConfig, LimitsConfig
from serving.gateway.errors import APIError
from serving.gateway.store import Resilient, Store, StoreUnavailable

KEY_PREFIX = "sk-srv-"
# A key verified in Redis is trusted this long without asking again: it takes load off Redis on
# the hot path and keeps active clients working through a short Redis outage. Revocation takes
# effect within this time.
VERIFIED_TTL_S = 10.0
# A key found unknown (or revoked, or expired) is answered 401 this long without asking Redis again; a key
# created meanwhile works once this has passed.
UNKNOWN_TTL_S = 10.0
# Bounds on what a flood of distinct keys and addresses can make this replica remember.
MAX_UNKNOWN = 100_000
MAX_SOURCES = 100_000
# Lookups of unknown keys one address may have in progress at once: a burst of distinct keys waits for
# none of Redis's connections (429 at once beyond), and leaves them to the keys already verified.
MAX_LOOKUPS_PER_SOURCE = 8
# The fields of a key record beyond its name, models and expiry (limits and caps).
LIMIT_FIELDS = ("rpm", "tpm", "max_concurrent", "max_n", "max_tokens")


def digest(key: str) -> str:
    # keys are 256-bit random tokens, so a plain SHA-256 is safe (no dictionary to attack), and a
    # lookup by digest leaks nothing through timing about the stored keys
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key (by name and subject = its digest) or anonymous (auth off)."""

    name: str
    subject: str
    models: frozenset[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None  # the key's own caps; None: the platform's (limits.*)
    max_n: int | None = None
    max_tokens: int | None = None
    admin: bool = False  # may change what the platform serves (LoRA adapters at runtime)

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    @property
    def limited(self) -> bool:
        return bool(self.rpm or self.tpm)


ANONYMOUS = Principal(name="anonymous", subject="anonymous", admin=True)  # auth off: everything is open


def _principal(digest_: str, record: dict[str, Any]) -> Principal:
    models = record.get("models")
    return Principal(name=record["name"], subject=digest_, models=frozenset(models) if models is not None else None,
                     admin=bool(record.get("admin")), **{name: record.get(name) for name in LIMIT_FIELDS})


def client_address(connection: HTTPConnection) -> str:
    """The address the request came from, as this server sees it (behind a proxy: the proxy's)."""
    return connection.client.host if connection.client else "-"


class FailedAttempts:
    """Unknown keys tried per client address: a fixed window of `window_s` seconds from the first failure;
    lookups in progress count too, so a burst cannot start more lookups than the limit, and at most
    MAX_LOOKUPS_PER_SOURCE run at once. With limit 0 it holds nothing back (the default: behind Ray
    Serve's HAProxy every client has the proxy's address, and a budget shared by all would let a flood
    of bad keys lock every new key out)."""

    def __init__(self, limit: int, window_s: float, clock=time.monotonic):
        self.limit, self.window_s = limit, window_s
        self._failures: TTLCache = TTLCache(MAX_SOURCES, ttl=window_s, timer=clock)  # source -> [count, since]
        self._pending: dict[str, int] = {}
        self._clock = clock

    def retry_after_s(self, source: str) -> int | None:
        """None if `source` may try one more key, else the seconds until it may."""
        count, since = self._failures.get(source, (0, self._clock()))
        pending = self._pending.get(source, 0)
        if self.limit and count + pending >= self.limit:
            return max(1, math.ceil(since + self.window_s - self._clock()))
        return 1 if self.limit and pending >= MAX_LOOKUPS_PER_SOURCE else None

    def failed(self, source: str) -> None:
        entry = self._failures.get(source)
        if entry is None:
            self._failures[source] = [1, self._clock()]
        else:
            entry[0] += 1  # in place: the window keeps its start (and its expiry)

    def begin(self, source: str) -> None:
        self._pending[source] = self._pending.get(source, 0) + 1

    def end(self, source: str) -> None:
        left = self._pending.pop(source) - 1
        if left:
            self._pending[source] = left


class Authenticator:
    """Who is calling, from the `Authorization` header. `limits`: failed_auth_per_source and its window."""

    def __init__(self, config: AuthConfig, store: Resilient, clock=time.time, limits: LimitsConfig | None = None):
        self.enabled = config.enabled
        self._store = store
        self._clock = clock
        self._static = {
            digest(k.key.get_secret_value()): {"name": k.name, "models": k.models, "admin": k.admin,
                                               **{name: getattr(k, name) for name in LIMIT_FIELDS}}
            for k in config.keys
        }
        self._verified: dict[str, tuple[float, Principal, float]] = {}  # digest -> (trust until, who, expiry)
        self._unknown: TTLCache = TTLCache(MAX_UNKNOWN, ttl=UNKNOWN_TTL_S, timer=clock)  # digest -> True
        self._lookups: dict[str, asyncio.Future] = {}  # digest -> its lookup in progress
        limits = limits or LimitsConfig()
        self.failures = FailedAttempts(limits.failed_auth_per_source, limits.window_s)

    async def authenticate(self, authorization: str | None, source: str = "-") -> Principal:
        """The caller of a request with this `Authorization` header from address `source` (client_address).

        Raises APIError 401 (missing_api_key, invalid_api_key), 429 too_many_failed_attempts (with
        Retry-After: `source` tried too many unknown keys), 503 auth_unavailable (Redis cannot answer, for a
        key this replica has not verified before)."""
        if not self.enabled:
            return ANONYMOUS
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
                           code="missing_api_key")
        d = digest(key.strip())
        if d in self._static:
            return _principal(d, self._static[d])
        cached = self._verified.get(d)
        now = self._clock()
        if cached and cached[0] > now:
            return cached[1]
        if cached is None and d not in self._lookups:  # a key not seen here: the address's attempts decide
            self._hold_back(source)
            if d in self._unknown:
                self._refuse(d, source)
        try:
            record = await self._lookup(d, source)
        except StoreUnavailable:
            if cached and cached[2] > now:  # known a moment ago and not expired: serve it through the outage
                return cached[1]
            raise APIError(503, "API keys cannot be checked right now; retry shortly.", code="auth_unavailable",
                           headers={"retry-after": "2"}) from None
        if record is None or (record.get("expires_at") and record["expires_at"] < now):
            self._refuse(d, source)
        principal = _principal(d, record)
        expires = record.get("expires_at") or float("inf")
        # trusted without asking Redis for a few seconds, but never past the key's expiry
        self._verified[d] = (min(now + VERIFIED_TTL_S, expires), principal, expires)
        return principal

    async def principal_of(self, subject: str) -> Principal | None:
        """The principal whose subject (key digest) this is, as its key stands now: None for a key revoked,
        expired or unknown (work a key left behind, such as a batch, stops with it). ANONYMOUS's own subject
        with auth off. Raises StoreUnavailable."""
        if not self.enabled:
            return ANONYMOUS if subject == ANONYMOUS.subject else None
        if subject in self._static:
            return _principal(subject, self._static[subject])
        record = await self._store.call("key_get", subject)
        if record is None or (record.get("expires_at") and record["expires_at"] < self._clock()):
            return None
        return _principal(subject, record)

    def _hold_back(self, source: str) -> None:
        wait = self.failures.retry_after_s(source)
        if wait is not None:
            raise APIError(429, f"Too many requests with unknown API keys from this address; retry after {wait}s.",
                           code="too_many_failed_attempts", headers={"retry-after": str(wait)})

    def _refuse(self, d: str, source: str) -> NoReturn:
        self._verified.pop(d, None)
        self._unknown[d] = True
        self.failures.failed(source)
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def _lookup(self, d: str, source: str) -> dict[str, Any] | None:
        """The key's record from the store; concurrent lookups of one digest share one call."""
        pending = self._lookups.get(d)
        if pending is not None:
            return await asyncio.shield(pending)
        future = asyncio.get_running_loop().create_future()
        self._lookups[d] = future
        self.failures.begin(source)
        try:
            record = await self._store.call("key_get", d)
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, Exception) else StoreUnavailable("cancelled"))
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        else:
            future.set_result(record)
            return record
        finally:
            self.failures.end(source)
            del self._lookups[d]


# ---- key management (the `serving keys` command) -------------------------------------------------


async def create_key(store: Store, name: str, *, models: list[str] | None = None, rpm: int | None = None,
                     tpm: int | None = None, expires_in_days: float | None = None, admin: bool = False,
                     **caps: int | None) -> tuple[str, dict[str, Any]]:
    """A new key; the clear key is returned once and never stored. `caps`: max_concurrent, max_n,
    max_tokens (None: the platform's limits.*). `admin`: may load and unload LoRA adapters."""
    unknown = set(caps) - set(LIMIT_FIELDS)
    if unknown:
        raise TypeError(f"unknown key fields: {', '.join(sorted(unknown))}")
    if any(r["name"] == name for r in (await store.key_list()).values()):
        raise ValueError(f"a key named {name!r} exists already")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    now = time.time()
    record = {"name": name, "models": models, "rpm": rpm, "tpm": tpm, **caps, "admin": admin, "created_at": now,
              "expires_at": now + expires_in_days * 86400 if expires_in_days else None,
              "hint": f"{key[:len(KEY_PREFIX) + 2]}...{key[-4:]}"}
    await store.key_put(digest(key), record)
    return key, record


async def update_key(store: Store, name: str, **fields: Any) -> dict[str, Any]:
    """Change a key's models, limits or caps (LIMIT_FIELDS; a value of None clears it); returns the record.
    Gateways apply it within VERIFIED_TTL_S."""
    unknown = set(fields) - {"models", *LIMIT_FIELDS}
    if unknown:
        raise TypeError(f"unknown key fields: {', '.join(sorted(unknown))}")
    d, record = await find_key(store, name)
    record = {**record, **fields}
    await store.key_put(d, record)
    return record


async def find_key(store: Store, name: str) -> tuple[str, dict[str, Any]]:
    for d, record in (await store.key_list()).items():
        if record["name"] == name:
            return d, record
    raise ValueError(f"no key named {name!r}")


async def revoke_key(store: Store, name: str) -> None:
    d, _ = await find_key(store, name)
    await store.key_delete(d)


def api_key(request: HTTPConnection) -> str | None:
    """The caller's key as an Authorization value: `Authorization: Bearer` (OpenAI's SDKs), else
    `x-api-key` (Anthropic's SDKs), which the platform's keys are also accepted in."""
    authorization = request.headers.get("authorization")
    if authorization is None and request.headers.get("x-api-key"):
        return f"Bearer {request.headers['x-api-key']}"
    return authorization
