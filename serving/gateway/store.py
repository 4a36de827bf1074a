"""Shared state of the gateway: cache entries, API keys, rate-limit windows and usage.

`RedisStore` keeps it in Redis (one connection pool per gateway replica; every rate check is one
atomic Lua script, so limits hold across replicas). `MemoryStore` keeps it in the process, for local
use without Redis; it implements the same operations with the same semantics.

Both are wrapped by `Resilient`: at most `max_concurrency` calls run at once (the others wait up to
`wait_s` for a turn: a flood of requests queues instead of failing), every call has a short timeout,
and after a Redis failure calls are skipped for `retry_interval_s` (no request waits on a dead Redis),
then tried again, so a Redis that comes back is used again without a restart. Only failures of Redis
itself open that breaker: a wait for a turn that runs out does not, and a call that times out opens it
only when Redis then fails to answer a ping too (a flood that keeps the event loop busy makes calls
late without Redis being at fault).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Protocol

logger = logging.getLogger("serving.gateway")


class StoreUnavailable(Exception):
    """The store could not answer in time; the caller applies its failure policy."""


class StoreBusy(StoreUnavailable):
    """Every connection stayed busy for the whole wait: this call is skipped, but Redis is not at fault
    (the breaker stays closed and other calls go on)."""


@dataclass(frozen=True)
class Admitted:
    """What `admit` decided. refused: None (admitted), "concurrent", "requests" or "tokens".
    requests/tokens: counted in the window, this request included when admitted (tokens: its
    reservation too); in_flight: the key's leases held, this one included; reset_s: seconds until the
    oldest counted second leaves the window; bucket: the epoch second its reservation was counted in."""

    refused: str | None
    requests: int
    tokens: int
    in_flight: int
    reset_s: float
    bucket: int


class Store(Protocol):
    """The operations the gateway needs. `now` is the store's clock (Redis TIME in Redis)."""

    async def cache_get(self, key: str) -> bytes | None: ...
    async def cache_set(self, key: str, value: bytes, ttl_s: int) -> None: ...
    async def key_get(self, digest: str) -> dict[str, Any] | None: ...
    async def key_put(self, digest: str, record: dict[str, Any]) -> None: ...
    async def key_delete(self, digest: str) -> bool: ...
    async def key_list(self) -> dict[str, dict[str, Any]]: ...
    async def admit(self, subject: str, lease: str, *, rpm: int, tpm: int, reserve: int, max_concurrent: int,
                    window_s: int, lease_s: float) -> Admitted:
        """Admit one request of `subject` atomically, or refuse it: fewer than `max_concurrent` leases held
        (then `lease` is held for up to `lease_s` seconds, unless released), fewer than `rpm` requests in the
        last `window_s` seconds, and fewer than `tpm` tokens counted there, with `reserve` (reserved now)
        fitting in what is left.
        0 = no limit. Checked in that order; the first that fails names the refusal."""
        ...
    async def release(self, subject: str, lease: str, *, bucket: int, reserved: int, used: int,
                      window_s: int) -> None:
        """The end of an admitted request: its lease is given back, its reservation (counted in `bucket`)
        taken out of the window and the tokens it really `used` counted now."""
        ...
    async def usage_add(self, subject: str, day: str, model: str, counts: dict[str, int]) -> None: ...
    async def usage_get(self, subject: str) -> dict[str, dict[str, dict[str, int]]]: ...
    async def ping(self) -> bool: ...
    async def close(self) -> None: ...


# KEYS: requests hash, tokens hash, leases sorted set. ARGV: rpm, tpm, window, reserve, max_concurrent,
# lease_s, lease. Buckets are per second (field = epoch second); old buckets are dropped on the way, so
# memory stays bounded by the window. Leases are scored by their expiry: a gateway that died with
# requests in flight holds their slots for lease_s at most.
ADMIT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1])
local precise = now + tonumber(clock[2]) / 1000000
local rpm, tpm, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local reserve, cap, lease_s = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
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
local requests, r_oldest = total(KEYS[1])
local tokens, t_oldest = total(KEYS[2])
local in_flight = 0
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', precise)
  in_flight = redis.call('ZCARD', KEYS[3])
  if in_flight >= cap then
    return {'concurrent', requests, tokens, in_flight, 1, now}
  end
end
if rpm > 0 and requests >= rpm then
  return {'requests', requests, tokens, in_flight, (r_oldest or now) + window - now, now}
end
if tpm > 0 and (tokens >= tpm or tokens + reserve > tpm) then
  return {'tokens', requests, tokens, in_flight, (t_oldest or now) + window - now, now}
end
redis.call('HINCRBY', KEYS[1], now, 1)
redis.call('EXPIRE', KEYS[1], window + 1)
if reserve > 0 then
  redis.call('HINCRBY', KEYS[2], now, reserve)
  redis.call('EXPIRE', KEYS[2], window + 1)
end
if cap > 0 then
  redis.call('ZADD', KEYS[3], precise + lease_s, ARGV[7])
  redis.call('EXPIRE', KEYS[3], math.ceil(lease_s) + 1)
  in_flight = in_flight + 1
end
return {'', requests + 1, tokens + reserve, in_flight, (r_oldest or now) + window - now, now}
"""

# KEYS: tokens hash, leases sorted set. ARGV: lease, bucket, reserved, used, window.
RELEASE = """
redis.call('ZREM', KEYS[2], ARGV[1])
local reserved, used = tonumber(ARGV[3]), tonumber(ARGV[4])
if reserved > 0 and redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1 then
  if redis.call('HINCRBY', KEYS[1], ARGV[2], -reserved) <= 0 then
    redis.call('HDEL', KEYS[1], ARGV[2])
  end
end
if used > 0 then
  local now = tonumber(redis.call('TIME')[1])
  redis.call('HINCRBY', KEYS[1], now, used)
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]) + 1)
end
return 1
"""


def tls_options(url: str, *, ca_file: str | None = None, cert_file: str | None = None,
                key_file: str | None = None) -> dict[str, Any]:
    """redis-py connection options of a rediss:// URL: the server's certificate is verified (against
    `ca_file`, else the system's CAs) and its name checked; `cert_file`/`key_file`: a client certificate."""
    if not url.startswith("rediss://"):
        return {}
    options: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    if ca_file:
        options["ssl_ca_certs"] = ca_file
    if cert_file:
        options.update(ssl_certfile=cert_file, ssl_keyfile=key_file)
    return options


class RedisStore:
    """The store in Redis. `max_connections` connections at most; a call that finds them all busy waits
    up to `pool_timeout_s` for one (redis-py's plain pool would fail it at once). `tls`: see tls_options."""

    def __init__(self, url: str, *, password: str | None = None, prefix: str = "serving:", max_connections: int = 64,
                 pool_timeout_s: float = 1.0, tls: dict[str, Any] | None = None):
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # one immediate retry: after a Redis restart every pooled connection is stale once, and without
        # it each would fail a request and trip the circuit breaker again
        retry = Retry(NoBackoff(), 1)
        pool = redis.BlockingConnectionPool.from_url(url, password=password, max_connections=max_connections,
                                                     timeout=pool_timeout_s, socket_connect_timeout=1,
                                                     health_check_interval=30, retry=retry, **(tls or {}))
        self._redis = redis.Redis(connection_pool=pool, retry=retry)
        self._p = prefix
        self._admit = self._redis.register_script(ADMIT)
        self._release = self._redis.register_script(RELEASE)

    def _limit_keys(self, subject: str) -> tuple[str, str, str]:
        return f"{self._p}rl:req:{subject}", f"{self._p}rl:tok:{subject}", f"{self._p}rl:lease:{subject}"

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

    async def admit(self, subject: str, lease: str, *, rpm: int, tpm: int, reserve: int, max_concurrent: int,
                    window_s: int, lease_s: float) -> Admitted:
        refused, requests, tokens, in_flight, reset, bucket = await self._admit(
            keys=list(self._limit_keys(subject)), args=[rpm, tpm, window_s, reserve, max_concurrent, lease_s, lease])
        return Admitted(refused.decode() or None, int(requests), int(tokens), int(in_flight), float(reset), int(bucket))

    async def release(self, subject: str, lease: str, *, bucket: int, reserved: int, used: int,
                      window_s: int) -> None:
        _, tokens, leases = self._limit_keys(subject)
        await self._release(keys=[tokens, leases], args=[lease, bucket, reserved, used, window_s])

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
        self._leases: dict[str, dict[str, float]] = defaultdict(dict)  # subject -> lease -> expiry
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

    async def admit(self, subject: str, lease: str, *, rpm: int, tpm: int, reserve: int, max_concurrent: int,
                    window_s: int, lease_s: float) -> Admitted:
        precise = self._clock()
        now = int(precise)
        requests, r_oldest = self._total(f"req:{subject}", now, window_s)
        tokens, t_oldest = self._total(f"tok:{subject}", now, window_s)
        leases = self._leases[subject]
        for expired in [name for name, until in leases.items() if until <= precise]:
            del leases[expired]
        in_flight = len(leases) if max_concurrent else 0
        refused, reset = None, (r_oldest or now) + window_s - now
        if max_concurrent and in_flight >= max_concurrent:
            refused, reset = "concurrent", 1
        elif rpm and requests >= rpm:
            refused = "requests"
        elif tpm and (tokens >= tpm or tokens + reserve > tpm):
            refused, reset = "tokens", (t_oldest or now) + window_s - now
        if refused:
            return Admitted(refused, requests, tokens, in_flight, reset, now)
        self._add(f"req:{subject}", now, 1)
        self._add(f"tok:{subject}", now, reserve)
        if max_concurrent:
            leases[lease] = precise + lease_s
            in_flight += 1
        return Admitted(None, requests + 1, tokens + reserve, in_flight, reset, now)

    async def release(self, subject: str, lease: str, *, bucket: int, reserved: int, used: int,
                      window_s: int) -> None:
        self._leases[subject].pop(lease, None)
        tokens = self._buckets[f"tok:{subject}"]
        if reserved and bucket in tokens:
            tokens[bucket] -= reserved
            if tokens[bucket] <= 0:
                del tokens[bucket]
        self._add(f"tok:{subject}", int(self._clock()), used)

    def _add(self, key: str, now: int, amount: int) -> None:
        if amount:
            bucket = self._buckets[key]
            bucket[now] = bucket.get(now, 0) + amount

    async def usage_add(self, subject: str, day: str, model: str, counts: dict[str, int]) -> None:
        entry = self._usage.setdefault(subject, {}).setdefault(day, {}).setdefault(model, {})
        for name, value in counts.items():
            entry[name] = entry.get(name, 0) + value

    async def usage_get(self, subject: str) -> dict[str, dict[str, dict[str, int]]]:
        return json.loads(json.dumps(self._usage.get(subject, {})))

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        pass


class Resilient:
    """Turns, timeouts and a short circuit breaker around a store. Failing calls raise StoreUnavailable
    (StoreBusy when no turn came within `wait_s`). `max_concurrency`: calls run at once (None: any
    number); it must not exceed the store's connections, so that a call that has its turn never waits
    for a connection and `timeout_s` measures Redis alone."""

    def __init__(self, store: Store, *, timeout_s: float, retry_interval_s: float, on_error=None,
                 max_concurrency: int | None = None, wait_s: float = 1.0):
        self.store = store
        self.timeout_s = timeout_s
        self.retry_interval_s = retry_interval_s
        self.wait_s = wait_s
        self.errors = 0  # Redis faults (they open the breaker)
        self.busy = 0  # calls skipped for want of a turn, or late while Redis answered (they do not)
        self._skip_until = 0.0
        self._probe: asyncio.Task | None = None
        self._on_error = on_error
        self._turns = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._skip_until

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if not self.available:
            raise StoreUnavailable("skipped: the store failed recently")
        async with self._turn():
            try:
                return await asyncio.wait_for(getattr(self.store, method)(*args, **kwargs), self.timeout_s)
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except TimeoutError as exc:  # this call goes on without the store; the breaker waits for a ping
                self._check_alive(method, exc)
                raise StoreUnavailable(f"{method} timed out") from exc
            except Exception as exc:  # noqa: BLE001 - any store failure means: go on without it
                self._failed(method, exc)
                raise StoreUnavailable(str(exc)) from exc

    def _failed(self, method: str, exc: BaseException) -> None:
        self.errors += 1
        self._skip_until = time.monotonic() + self.retry_interval_s
        if self._on_error is not None:
            self._on_error(method)
        logger.warning("store %s failed (%r); going on without it for %.1fs", method, exc, self.retry_interval_s)

    def _check_alive(self, method: str, exc: BaseException) -> None:
        """After a timeout: ping the store in the background (one ping at a time, a more generous timeout);
        it opens the breaker only if the store does not answer."""
        self.busy += 1
        if self._probe is not None and not self._probe.done():
            return

        async def probe() -> None:
            try:
                await asyncio.wait_for(self.store.ping(), max(1.0, 4 * self.timeout_s))
            except Exception:  # noqa: BLE001 - no answer to a ping either: the store is at fault
                self.busy -= 1
                self._failed(method, exc)

        self._probe = asyncio.get_running_loop().create_task(probe())

    @asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        if self._turns is None:
            yield
            return
        try:
            await asyncio.wait_for(self._turns.acquire(), self.wait_s)
        except TimeoutError:
            self.busy += 1
            raise StoreBusy(f"no free connection within {self.wait_s}s") from None
        try:
            yield
        finally:
            self._turns.release()

    async def close(self) -> None:
        await self.store.close()


def build_store(redis_config) -> Store:
    if redis_config.url:
        password = redis_config.password.get_secret_value() if redis_config.password else None
        tls = tls_options(redis_config.url, ca_file=redis_config.tls_ca_file, cert_file=redis_config.tls_cert_file,
                          key_file=redis_config.tls_key_file)
        return RedisStore(redis_config.url, password=password, prefix=redis_config.key_prefix,
                          max_connections=redis_config.max_connections,
                          pool_timeout_s=redis_config.pool_timeout_s, tls=tls)
    return MemoryStore()
