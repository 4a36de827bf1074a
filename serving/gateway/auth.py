"""API keys: stored as SHA-256 digests (never in clear), each with a name, models, RPM/TPM and expiry."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

from serving.config import AuthConfig
from serving.gateway.errors import APIError
from serving.gateway.store import Resilient, Store, StoreUnavailable

KEY_PREFIX = "sk-srv-"
# A key verified in Redis is trusted this long without asking again: it takes load off Redis on
# the hot path and keeps active clients working through a short Redis outage. Revocation takes
# effect within this time.
VERIFIED_TTL_S = 10.0


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

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    @property
    def limited(self) -> bool:
        return bool(self.rpm or self.tpm)


ANONYMOUS = Principal(name="anonymous", subject="anonymous")


def _principal(digest_: str, record: dict[str, Any]) -> Principal:
    models = record.get("models")
    return Principal(name=record["name"], subject=digest_, models=frozenset(models) if models is not None else None,
                     rpm=record.get("rpm"), tpm=record.get("tpm"))


class Authenticator:
    def __init__(self, config: AuthConfig, store: Resilient, clock=time.time):
        self.enabled = config.enabled
        self._store = store
        self._clock = clock
        self._static = {
            digest(k.key.get_secret_value()): {"name": k.name, "models": k.models, "rpm": k.rpm, "tpm": k.tpm}
            for k in config.keys
        }
        self._verified: dict[str, tuple[float, Principal, float]] = {}  # digest -> (trust until, who, expiry)

    async def authenticate(self, authorization: str | None) -> Principal:
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
        try:
            record = await self._store.call("key_get", d)
        except StoreUnavailable:
            if cached and cached[2] > now:  # known a moment ago and not expired: serve it through the outage
                return cached[1]
            raise APIError(503, "API keys cannot be checked right now; retry shortly.", code="auth_unavailable",
                           headers={"retry-after": "2"}) from None
        if record is None or (record.get("expires_at") and record["expires_at"] < now):
            self._verified.pop(d, None)
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        principal = _principal(d, record)
        expires = record.get("expires_at") or float("inf")
        # trusted without asking Redis for a few seconds, but never past the key's expiry
        self._verified[d] = (min(now + VERIFIED_TTL_S, expires), principal, expires)
        return principal


# ---- key management (the `serving keys` command) -------------------------------------------------


async def create_key(store: Store, name: str, *, models: list[str] | None = None, rpm: int | None = None,
                     tpm: int | None = None, expires_in_days: float | None = None) -> tuple[str, dict[str, Any]]:
    """A new key; the clear key is returned once and never stored."""
    if any(r["name"] == name for r in (await store.key_list()).values()):
        raise ValueError(f"a key named {name!r} exists already")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    now = time.time()
    record = {"name": name, "models": models, "rpm": rpm, "tpm": tpm, "created_at": now,
              "expires_at": now + expires_in_days * 86400 if expires_in_days else None,
              "hint": f"{key[:len(KEY_PREFIX) + 2]}...{key[-4:]}"}
    await store.key_put(digest(key), record)
    return key, record


async def find_key(store: Store, name: str) -> tuple[str, dict[str, Any]]:
    for d, record in (await store.key_list()).items():
        if record["name"] == name:
            return d, record
    raise ValueError(f"no key named {name!r}")


async def revoke_key(store: Store, name: str) -> None:
    d, _ = await find_key(store, name)
    await store.key_delete(d)
