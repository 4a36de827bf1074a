"""Shared state of the gateway: cache entries, API keys, rate-limit windows and usage.

`RedisStore` keeps it in Redis (one connection pool per gateway replica; every rate check is one
atomic Lua script, so limits hold across replicas). `MemoryStore` keeps it in the process, for local
use without Redis; it implements the same operations with the same semantics.

Both are wrapped by `Resilient`: every call has a short timeout, and after a failure calls are
skipped for `retry_interval_s` (no request waits on a dead Redis), then tried again, so a Redis
that comes back is used again without a restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from typing import Any, Protocol

logger = logging.getLogger("serving.gateway")


class StoreUnavailable(Exception):
    """The store could not answer in time; the caller applies its failure policy."""


class Store(Protocol):
    """The operations the gateway needs. `now` is the store's clock (Redis TIME in Redis)."""

    async def cache_get(self, key: str) -> bytes | None: ...
    async def cache_set(self, key: str, value: bytes, ttl_s: int) -> None: ...
    async def key_get(self, digest: str) -> dict[str, Any] | None: ...
    async def key_put(self, digest: str, record: dict[str, Any]) -> None: ...
    async def key_delete(self, digest: str) -> bool: ...
    async def key_list(self) -> dict[str, dict[str, Any]]: ...
    async def rate_check(self, subject: str, rpm: int, tpm: int, window_s: int) -> tuple[bool, int, int, float]:
        """Admit one request if the last `window_s` seconds hold fewer than `rpm` requests and
        `tpm` tokens (0 = no limit); returns (admitted, requests, tokens, seconds until a slot frees)."""
        ...
    async def tokens_add(self, subject: str, tokens: int, window_s: int) -> None: ...
    async def usage_add(self, subject: str, day: str, model: str, counts: dict[str, int]) -> None: ...
    async def usage_get(self, subject: str) -> dict[str, dict[str, dict[str, int]]]: ...
    async def close(self) -> None: ...


# KEYS: requests hash, tokens hash. ARGV: rpm, tpm, window. Buckets are per second (field = epoch
# second); old buckets are dropped on the way, so memory stays bounded by the window.
RATE_CHECK = """
local now = tonumber(redis.call('TIME')[1])
local window = tonumber(ARGV[3])
local function total(key)
  local sum, oldest = 0, nil
  local buckets = redis.call('HGETALL', key)
  for i = 1, #buckets, 2 do
    local t = tonumber(buckets[i])
    if t <= now - window then
      redis.call('HDEL', key, buckets[i])
    else
      sum = sum + tonumber(buckets[i + 1])
      if oldest == nil or t < oldest then oldest = t end
    end
  end
  return sum, oldest
end
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local requests, r_oldest = total(KEYS[1])
local tokens, t_oldest = total(KEYS[2])
if rpm > 0 and requests >= rpm then
  return {0, requests, tokens, (r_oldest or now) + window - now}
end
if tpm > 0 and tokens >= tpm then
  return {0, requests, tokens, (t_oldest or now) + window - now}
end
redis.call('HINCRBY', KEYS[1], now, 1)
redis.call('EXPIRE', KEYS[1], window + 1)
return {1, requests + 1, tokens, (r_oldest or now) + window - now}
"""

TOKENS_ADD = """
local now = tonumber(redis.call('TIME')[1])
redis.call('HINCRBY', KEYS[1], now, tonumber(ARGV[1]))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]) + 1)
return 1
"""


class RedisStore:
    def __init__(self, url: str, *, password: str | None = None, prefix: str = "serving:", max_connections: int = 64):
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # one immediate retry: after a Redis restart every pooled connection is stale once, and without
        # it each would fail a request and trip the circuit breaker again
        self._redis = redis.Redis.from_url(url, password=password, max_connections=max_connections,
                                           socket_connect_timeout=1, health_check_interval=30,
                                           retry=Retry(NoBackoff(), 1))
        self._p = prefix
        self._rate = self._redis.register_script(RATE_CHECK)
        self._tokens = self._redis.register_script(TOKENS_ADD)

    async def cache_get(self, key: str) -> bytes | None:
        return await self._redis.get(f"{self._p}cache:{key}")

    async def cache_set(self, key: str, value: bytes, ttl_s: int) -> None:
        await self._redis.set(f"{self._p}cache:{key}", value, ex=ttl_s)

    async def key_get(self, digest: str) -> dict[str, Any] | None:
        raw = await self._redis.hget(f"{self._p}keys", digest)
        return json.loads(raw) if raw else None

    async def key_put(self, digest: str, record: dict[str, Any]) -> None:
        await self._redis.hset(f"{self._p}keys", digest, json.dumps(record))

    async def key_delete(self, digest: str) -> bool:
        return bool(await self._redis.hdel(f"{self._p}keys", digest))

    async def key_list(self) -> dict[str, dict[str, Any]]:
        raw = await self._redis.hgetall(f"{self._p}keys")
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    async def rate_check(self, subject: str, rpm: int, tpm: int, window_s: int) -> tuple[bool, int, int, float]:
        keys = [f"{self._p}rl:req:{subject}", f"{self._p}rl:tok:{subject}"]
        admitted, requests, tokens, reset = await self._rate(keys=keys, args=[rpm, tpm, window_s])
        return bool(admitted), int(requests), int(tokens), float(reset)

    async def tokens_add(self, subject: str, tokens: int, window_s: int) -> None:
        await self._tokens(keys=[f"{self._p}rl:tok:{subject}"], args=[tokens, window_s])

    async def usage_add(self, subject: str, day: str, model: str, counts: dict[str, int]) -> None:
        key = f"{self._p}usage:{subject}:{day}"
        async with self._redis.pipeline(transaction=True) as pipe:
            for name, value in counts.items():
                pipe.hincrby(key, f"{model}|{name}", value)
            pipe.expire(key, 400 * 86400)
            pipe.sadd(f"{self._p}usage-days:{subject}", day)
            await pipe.execute()

    async def usage_get(self, subject: str) -> dict[str, dict[str, dict[str, int]]]:
        days = sorted(d.decode() for d in await self._redis.smembers(f"{self._p}usage-days:{subject}"))
        out: dict[str, dict[str, dict[str, int]]] = {}
        for day in days:
            for field, value in (await self._redis.hgetall(f"{self._p}usage:{subject}:{day}")).items():
                model, _, name = field.decode().rpartition("|")
                out.setdefault(day, {}).setdefault(model, {})[name] = int(value)
        return out

    async def ping(self) -> bool:
        return bool(await self._redis.ping())

    async def close(self) -> None:
        await self._redis.aclose()


class MemoryStore:
    """The same operations in this process (no Redis): for one gateway replica and local runs."""

    def __init__(self, clock=time.time):
        self._clock = clock
        self._cache: dict[str, tuple[float, bytes]] = {}
        self._keys: dict[str, dict[str, Any]] = {}
        self._buckets: dict[str, dict[int, int]] = defaultdict(dict)
        self._usage: dict[str, dict[str, dict[str, dict[str, int]]]] = {}

    async def cache_get(self, key: str) -> bytes | None:
        entry = self._cache.get(key)
        if entry is None or entry[0] < self._clock():
            self._cache.pop(key, None)
            return None
        return entry[1]

    async def cache_set(self, key: str, value: bytes, ttl_s: int) -> None:
        self._cache[key] = (self._clock() + ttl_s, value)

    async def key_get(self, digest: str) -> dict[str, Any] | None:
        return self._keys.get(digest)

    async def key_put(self, digest: str, record: dict[str, Any]) -> None:
        self._keys[digest] = dict(record)

    async def key_delete(self, digest: str) -> bool:
        return self._keys.pop(digest, None) is not None

    async def key_list(self) -> dict[str, dict[str, Any]]:
        return dict(self._keys)

    def _total(self, key: str, now: int, window: int) -> tuple[int, int | None]:
        buckets = self._buckets[key]
        for t in [t for t in buckets if t <= now - window]:
            del buckets[t]
        return sum(buckets.values()), min(buckets, default=None)

    async def rate_check(self, subject: str, rpm: int, tpm: int, window_s: int) -> tuple[bool, int, int, float]:
        now = int(self._clock())
        requests, r_oldest = self._total(f"req:{subject}", now, window_s)
        tokens, t_oldest = self._total(f"tok:{subject}", now, window_s)
        if rpm and requests >= rpm:
            return False, requests, tokens, (r_oldest or now) + window_s - now
        if tpm and tokens >= tpm:
            return False, requests, tokens, (t_oldest or now) + window_s - now
        bucket = self._buckets[f"req:{subject}"]
        bucket[now] = bucket.get(now, 0) + 1
        return True, requests + 1, tokens, (r_oldest or now) + window_s - now

    async def tokens_add(self, subject: str, tokens: int, window_s: int) -> None:
        bucket = self._buckets[f"tok:{subject}"]
        now = int(self._clock())
        bucket[now] = bucket.get(now, 0) + tokens

    async def usage_add(self, subject: str, day: str, model: str, counts: dict[str, int]) -> None:
        entry = self._usage.setdefault(subject, {}).setdefault(day, {}).setdefault(model, {})
        for name, value in counts.items():
            entry[name] = entry.get(name, 0) + value

    async def usage_get(self, subject: str) -> dict[str, dict[str, dict[str, int]]]:
        return json.loads(json.dumps(self._usage.get(subject, {})))

    async def close(self) -> None:
        pass


class Resilient:
    """Timeouts and a short circuit breaker around a store. Failing calls raise StoreUnavailable."""

    def __init__(self, store: Store, *, timeout_s: float, retry_interval_s: float, on_error=None):
        self.store = store
        self.timeout_s = timeout_s
        self.retry_interval_s = retry_interval_s
        self.errors = 0
        self._skip_until = 0.0
        self._on_error = on_error

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._skip_until

    async def call(self, method: str, *args: Any) -> Any:
        if not self.available:
            raise StoreUnavailable("skipped: the store failed recently")
        try:
            return await asyncio.wait_for(getattr(self.store, method)(*args), self.timeout_s)
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - any store failure means: go on without it
            self.errors += 1
            self._skip_until = time.monotonic() + self.retry_interval_s
            if self._on_error is not None:
                self._on_error(method)
            logger.warning("store %s failed (%r); going on without it for %.1fs", method, exc, self.retry_interval_s)
            raise StoreUnavailable(str(exc)) from exc

    async def close(self) -> None:
        await self.store.close()


def build_store(redis_config) -> Store:
    if redis_config.url:
        password = redis_config.password.get_secret_value() if redis_config.password else None
        return RedisStore(redis_config.url, password=password, prefix=redis_config.key_prefix,
                          max_connections=redis_config.max_connections)
    return MemoryStore()
