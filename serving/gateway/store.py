"""Shared state of the gateway: cache entries, API keys, rate-limit windows and usage.

`RedisStore` keeps it in Redis (one connection pool per gateway replica; every rate check is one
atomic Lua script, so limits hold across replicas). `MemoryStore` keeps it in the process, for local
use without Redis; it implements the same operations with the same semantics.

In Redis only cache entries carry a key TTL: the bundled Redis runs with maxmemory and volatile-lru, so
exactly those are evicted under memory pressure, never a key, a rate-limit window, a lease or usage.
The limits' contents expire inside the scripts instead (see ADMIT); usage is kept for good.

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
import heapq
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

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
    async def usage_add(self, subject: str, day: str, model: str, counts: dict[str, int]) -> None:
        """Add `counts` (name -> amount) to `subject`'s usage of `model` on `day` (YYYY-MM-DD). Kept without
        expiry (one small hash per key and day); nothing prunes old days."""
        ...
    async def usage_get(self, subject: str) -> dict[str, dict[str, dict[str, int]]]: ...
    async def record_get(self, kind: str, owner: str, ids: list[str]) -> list[bytes | None]:
        """The records `ids` of `kind` that `owner` (a key's subject) stored, None for each that is not there
        (never stored, expired, deleted, or another owner's: owners never see each other's records)."""
        ...
    async def record_put(self, kind: str, owner: str, record_id: str, value: bytes, ttl_s: int,
                         touch: tuple[str, ...] = ()) -> None:
        """Store a record for `ttl_s` seconds (0: without expiry) and give the records `touch` (its ancestors,
        which it needs) the same `ttl_s` from now, so a chain expires as a whole after its last use."""
        ...
    async def record_delete(self, kind: str, owner: str, record_id: str) -> bool: ...
    async def record_put_fenced(self, kind: str, owner: str, record_id: str, value: bytes, lease: str,
                                holder: str) -> bool:
        """Store a record without expiry only while `holder` holds `lease` (atomically: a holder whose lease
        passed to another writes nothing). True when written."""
        ...
    async def index_add(self, index: str, member: str, score: float) -> None:
        """Add `member` to the sorted `index` (ordered by `score`, e.g. a creation time) or move it."""
        ...
    async def index_remove(self, index: str, member: str) -> None: ...
    async def index_range(self, index: str, *, newest_first: bool = True) -> list[str]:
        """All members of `index`, by score (highest first with `newest_first`)."""
        ...
    async def lease_take(self, lease: str, holder: str, ttl_s: float) -> bool:
        """Take `lease` for `holder` for `ttl_s` seconds if nobody else holds it (renew it if `holder` does).
        True when `holder` holds it now."""
        ...
    async def lease_drop(self, lease: str, holder: str) -> None:
        """Give `lease` up, if `holder` holds it."""
        ...
    async def ping(self) -> bool: ...
    async def close(self) -> None: ...


# Nothing of the limits has a key TTL: the bundled Redis evicts keys with a TTL (volatile-lru) under
# memory pressure, and only cache entries may go. Their contents expire instead, in the scripts:
# - buckets are per second (hash field = epoch second) and dropped once out of the window; leases are
#   scored by their expiry (a gateway that died with requests in flight holds their slots for lease_s
#   at most) and dropped once expired. Redis deletes a hash or sorted set when its last field goes.
# - the index (a sorted set: subject -> when its last bucket or lease expires, at least) finds the
#   subjects nobody calls any more: every admission prunes up to SWEEP of the overdue ones, so their
#   keys go too and rl:* stays bounded by the subjects active in the last window (or holding leases).
# The sweep reaches keys by name from ARGV (prefix): these scripts need one Redis, not a cluster (a
# subject's keys are not hash-tagged either).
SWEEP = 4
LIMITS_LIB = """
local clock = redis.call('TIME')
local now = tonumber(clock[1])
local precise = now + tonumber(clock[2]) / 1000000
-- buckets of hash `key` in the window (the older ones are deleted): their sum, oldest and newest second
local function buckets(key, window)
  local sum, oldest, newest = 0, nil, nil
  local fields = redis.call('HGETALL', key)
  for i = 1, #fields, 2 do
    local t = tonumber(fields[i])
    if t <= now - window then
      redis.call('HDEL', key, fields[i])
    else
      sum = sum + tonumber(fields[i + 1])
      if oldest == nil or t < oldest then oldest = t end
      if newest == nil or t > newest then newest = t end
    end
  end
  return sum, oldest, newest
end
-- leases of sorted set `key` not yet expired (the others are deleted): how many, the latest expiry
local function leases(key)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', precise)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  return #last > 0 and redis.call('ZCARD', key) or 0, tonumber(last[2])
end
local function latest(a, b)
  if a == nil or (b ~= nil and b > a) then return b end
  return a
end
-- drop the expired content of `subject`'s keys (keys left empty go with it); index the subject by when
-- what is left expires, or take it out of the index when nothing is left
local function settle(index, subject, req, tok, lease, window)
  local _, _, r_newest = buckets(req, window)
  local _, _, t_newest = buckets(tok, window)
  local _, lease_until = leases(lease)
  local newest = latest(r_newest, t_newest)
  local expiry = latest(newest and newest + window, lease_until)
  if expiry then
    redis.call('ZADD', index, expiry, subject)
  else
    redis.call('ZREM', index, subject)
  end
end
-- settle up to `limit` subjects whose indexed time has passed
local function sweep(index, base, window, limit)
  for _, subject in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', precise, 'LIMIT', 0, limit)) do
    settle(index, subject, base .. 'req:' .. subject, base .. 'tok:' .. subject, base .. 'lease:' .. subject, window)
  end
end
"""

# KEYS: requests hash, tokens hash, leases sorted set, index. ARGV: rpm, tpm, window, reserve,
# max_concurrent, lease_s, lease, subject, key prefix of the limits, sweep limit.
ADMIT = LIMITS_LIB + """
local rpm, tpm, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local reserve, cap, lease_s = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
sweep(KEYS[4], ARGV[9], window, tonumber(ARGV[10]))
local requests, r_oldest = buckets(KEYS[1], window)
local tokens, t_oldest = buckets(KEYS[2], window)
local in_flight = leases(KEYS[3])
if cap == 0 then in_flight = 0 end
if cap > 0 and in_flight >= cap then
  return {'concurrent', requests, tokens, in_flight, 1, now}
end
if rpm > 0 and requests >= rpm then
  return {'requests', requests, tokens, in_flight, (r_oldest or now) + window - now, now}
end
if tpm > 0 and (tokens >= tpm or tokens + reserve > tpm) then
  return {'tokens', requests, tokens, in_flight, (t_oldest or now) + window - now, now}
end
redis.call('HINCRBY', KEYS[1], now, 1)
if reserve > 0 then
  redis.call('HINCRBY', KEYS[2], now, reserve)
end
local expiry = now + window
if cap > 0 then
  redis.call('ZADD', KEYS[3], precise + lease_s, ARGV[7])
  in_flight = in_flight + 1
  expiry = latest(expiry, precise + lease_s)
end
-- a subject already indexed keeps its time (the sweep finds the real one then): one write less
redis.call('ZADD', KEYS[4], 'NX', expiry, ARGV[8])
return {'', requests + 1, tokens + reserve, in_flight, (r_oldest or now) + window - now, now}
"""

# KEYS: requests hash, tokens hash, leases sorted set, index. ARGV: lease, bucket, reserved, used,
# window, subject. The subject is settled after: its index time follows the leases still held.
RELEASE = LIMITS_LIB + """
redis.call('ZREM', KEYS[3], ARGV[1])
local reserved, used = tonumber(ARGV[3]), tonumber(ARGV[4])
if reserved > 0 and redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then
  if redis.call('HINCRBY', KEYS[2], ARGV[2], -reserved) <= 0 then
    redis.call('HDEL', KEYS[2], ARGV[2])
  end
end
if used > 0 then
  redis.call('HINCRBY', KEYS[2], now, used)
end
settle(KEYS[4], ARGV[6], KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[5]))
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


def _text(value: bytes | str) -> str:
    """A Redis reply as text: the client is made without decode_responses, its types allow both."""
    return value.decode() if isinstance(value, bytes) else value


# Leases (one holder at a time, for a time) and writes fenced by them: a batch is run by the holder of its
# lease alone, and a holder that lost its lease (paused past its expiry) cannot overwrite the new holder's
# progress. Lease keys carry a TTL (their expiry is the point), so memory pressure may end one early: the
# fence then refuses the old holder's writes, and the batch is resumed, never run twice into its output.
LEASE_TAKE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
LEASE_DROP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""
FENCED_PUT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
return 1
"""


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
        self._fenced = self._redis.register_script(FENCED_PUT)
        self._lease_take = self._redis.register_script(LEASE_TAKE)
        self._lease_drop = self._redis.register_script(LEASE_DROP)

    def _limit_keys(self, subject: str) -> tuple[str, str, str, str]:
        """Requests hash, tokens hash and leases of `subject`, and the index of all subjects (see ADMIT)."""
        base = f"{self._p}rl:"
        return f"{base}req:{subject}", f"{base}tok:{subject}", f"{base}lease:{subject}", f"{base}active"

    async def cache_get(self, key: str) -> bytes | None:
        value = await self._redis.get(f"{self._p}cache:{key}")
        return value.encode() if isinstance(value, str) else value

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
        return {_text(k): json.loads(v) for k, v in raw.items()}

    async def admit(self, subject: str, lease: str, *, rpm: int, tpm: int, reserve: int, max_concurrent: int,
                    window_s: int, lease_s: float) -> Admitted:
        refused, requests, tokens, in_flight, reset, bucket = await self._admit(
            keys=list(self._limit_keys(subject)),
            args=[rpm, tpm, window_s, reserve, max_concurrent, lease_s, lease, subject, f"{self._p}rl:", SWEEP])
        return Admitted(_text(refused) or None, int(requests), int(tokens), int(in_flight), float(reset), int(bucket))

    async def release(self, subject: str, lease: str, *, bucket: int, reserved: int, used: int,
                      window_s: int) -> None:
        await self._release(keys=list(self._limit_keys(subject)),
                            args=[lease, bucket, reserved, used, window_s, subject])

    async def usage_add(self, subject: str, day: str, model: str, counts: dict[str, int]) -> None:
        # no TTL: a key with one may be evicted (volatile-lru), and usage is kept until an operator drops it
        key = f"{self._p}usage:{subject}:{day}"
        async with self._redis.pipeline(transaction=True) as pipe:
            for name, value in counts.items():
                pipe.hincrby(key, f"{model}|{name}", value)
            pipe.sadd(f"{self._p}usage-days:{subject}", day)
            await pipe.execute()

    async def usage_get(self, subject: str) -> dict[str, dict[str, dict[str, int]]]:
        days = sorted(_text(d) for d in await self._redis.smembers(f"{self._p}usage-days:{subject}"))
        out: dict[str, dict[str, dict[str, int]]] = {}
        for day in days:
            for field, value in (await self._redis.hgetall(f"{self._p}usage:{subject}:{day}")).items():
                model, _, name = _text(field).rpartition("|")
                out.setdefault(day, {}).setdefault(model, {})[name] = int(value)
        return out

    def _record_key(self, kind: str, owner: str, record_id: str) -> str:
        return f"{self._p}{kind}:{owner}:{record_id}"

    async def record_get(self, kind: str, owner: str, ids: list[str]) -> list[bytes | None]:
        if not ids:
            return []
        values = await self._redis.mget([self._record_key(kind, owner, i) for i in ids])
        return [v.encode() if isinstance(v, str) else v for v in values]

    async def record_put(self, kind: str, owner: str, record_id: str, value: bytes, ttl_s: int,
                         touch: tuple[str, ...] = ()) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._record_key(kind, owner, record_id), value, ex=ttl_s or None)
            for other in touch:
                pipe.expire(self._record_key(kind, owner, other), ttl_s)
            await pipe.execute()

    async def record_delete(self, kind: str, owner: str, record_id: str) -> bool:
        return bool(await self._redis.delete(self._record_key(kind, owner, record_id)))

    async def record_put_fenced(self, kind: str, owner: str, record_id: str, value: bytes, lease: str,
                                holder: str) -> bool:
        return bool(await self._fenced(keys=[f"{self._p}lease:{lease}", self._record_key(kind, owner, record_id)],
                                       args=[holder, value]))

    async def index_add(self, index: str, member: str, score: float) -> None:
        await self._redis.zadd(f"{self._p}index:{index}", {member: score})

    async def index_remove(self, index: str, member: str) -> None:
        await self._redis.zrem(f"{self._p}index:{index}", member)

    async def index_range(self, index: str, *, newest_first: bool = True) -> list[str]:
        members = await self._redis.zrange(f"{self._p}index:{index}", 0, -1, desc=newest_first)
        return [_text(m) for m in members]  # type: ignore[arg-type]  # members only, without scores

    async def lease_take(self, lease: str, holder: str, ttl_s: float) -> bool:
        return bool(await self._lease_take(keys=[f"{self._p}lease:{lease}"], args=[holder, int(ttl_s * 1000)]))

    async def lease_drop(self, lease: str, holder: str) -> None:
        await self._lease_drop(keys=[f"{self._p}lease:{lease}"], args=[holder])

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
        # as in Redis: no entry is kept empty, and the index finds the subjects nobody calls any more
        self._buckets: dict[str, dict[int, int]] = {}  # "req:<subject>"/"tok:<subject>" -> epoch second -> count
        self._leases: dict[str, dict[str, float]] = {}  # subject -> lease -> expiry
        self._indexed: dict[str, float] = {}  # the index (Redis' sorted set): subject -> when its content expires
        self._index: list[tuple[float, str]] = []  # a heap of _indexed's items; entries of changed times are stale
        self._usage: dict[str, dict[str, dict[str, dict[str, int]]]] = {}
        self._indexes: dict[str, dict[str, float]] = {}  # index -> member -> score
        self._lease_holders: dict[str, tuple[str, float]] = {}  # lease -> (holder, expiry)

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

    def _window(self, key: str, now: int, window: int) -> tuple[int, int | None, int | None]:
        """Buckets of `key` in the window (older ones dropped, an empty key too): sum, oldest, newest second."""
        buckets = self._buckets.get(key, {})
        for t in [t for t in buckets if t <= now - window]:
            del buckets[t]
        if not buckets:
            self._buckets.pop(key, None)
        return sum(buckets.values()), min(buckets, default=None), max(buckets, default=None)

    def _held(self, subject: str, precise: float) -> tuple[int, float | None]:
        """Leases of `subject` not yet expired (the others dropped, an empty entry too): count, latest expiry."""
        leases = self._leases.get(subject, {})
        for expired in [name for name, until in leases.items() if until <= precise]:
            del leases[expired]
        if not leases:
            self._leases.pop(subject, None)
        return len(leases), max(leases.values(), default=None)

    def _index_at(self, subject: str, expiry: float | None) -> None:
        """Index `subject` at `expiry` (None: take it out), as ZADD/ZREM do in Redis."""
        if expiry is None:
            self._indexed.pop(subject, None)  # its heap entries are dropped when the sweep reaches them
            return
        if self._indexed.get(subject) == expiry:
            return
        self._indexed[subject] = expiry
        heapq.heappush(self._index, (expiry, subject))
        if len(self._index) > 2 * len(self._indexed) + 64:  # stale entries: rebuild, so the heap stays bounded
            self._index = [(e, s) for s, e in self._indexed.items()]
            heapq.heapify(self._index)

    def _expiry(self, subject: str, precise: float, window: int) -> float | None:
        """Drop `subject`'s expired buckets and leases; when what is left expires (None: nothing is left)."""
        ends = [newest + window for kind in ("req", "tok")
                if (newest := self._window(f"{kind}:{subject}", int(precise), window)[2]) is not None]
        lease_until = self._held(subject, precise)[1]
        return max(ends + ([lease_until] if lease_until is not None else []), default=None)

    def _settle(self, subject: str, precise: float, window: int) -> None:
        self._index_at(subject, self._expiry(subject, precise, window))

    def _sweep(self, precise: float, window: int) -> None:
        """Settle up to SWEEP subjects whose indexed time has passed, as ADMIT does in Redis."""
        settled = 0
        while settled < SWEEP and self._index and self._index[0][0] <= precise:
            expiry, subject = heapq.heappop(self._index)
            if self._indexed.get(subject) == expiry:  # else a stale entry: its time changed since
                self._settle(subject, precise, window)
                settled += 1

    async def admit(self, subject: str, lease: str, *, rpm: int, tpm: int, reserve: int, max_concurrent: int,
                    window_s: int, lease_s: float) -> Admitted:
        precise = self._clock()
        now = int(precise)
        self._sweep(precise, window_s)
        requests, r_oldest, _ = self._window(f"req:{subject}", now, window_s)
        tokens, t_oldest, _ = self._window(f"tok:{subject}", now, window_s)
        held = self._held(subject, precise)[0]
        in_flight = held if max_concurrent else 0
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
        expiry = float(now + window_s)
        if max_concurrent:
            self._leases.setdefault(subject, {})[lease] = precise + lease_s
            in_flight += 1
            expiry = max(expiry, precise + lease_s)
        if subject not in self._indexed:  # as ZADD NX: an indexed subject keeps its time (the sweep settles it)
            self._index_at(subject, expiry)
        return Admitted(None, requests + 1, tokens + reserve, in_flight, reset, now)

    async def release(self, subject: str, lease: str, *, bucket: int, reserved: int, used: int,
                      window_s: int) -> None:
        precise = self._clock()
        self._leases.get(subject, {}).pop(lease, None)
        tokens = self._buckets.get(f"tok:{subject}", {})
        if reserved and bucket in tokens:
            tokens[bucket] -= reserved
            if tokens[bucket] <= 0:
                del tokens[bucket]
        self._add(f"tok:{subject}", int(precise), used)
        self._settle(subject, precise, window_s)  # drops what is left empty; its index time follows what is left

    def _add(self, key: str, now: int, amount: int) -> None:
        if amount:
            bucket = self._buckets.setdefault(key, {})
            bucket[now] = bucket.get(now, 0) + amount

    async def usage_add(self, subject: str, day: str, model: str, counts: dict[str, int]) -> None:
        entry = self._usage.setdefault(subject, {}).setdefault(day, {}).setdefault(model, {})
        for name, value in counts.items():
            entry[name] = entry.get(name, 0) + value

    async def usage_get(self, subject: str) -> dict[str, dict[str, dict[str, int]]]:
        return json.loads(json.dumps(self._usage.get(subject, {})))

    async def record_get(self, kind: str, owner: str, ids: list[str]) -> list[bytes | None]:
        return [await self.cache_get(f"{kind}:{owner}:{i}") for i in ids]

    async def record_put(self, kind: str, owner: str, record_id: str, value: bytes, ttl_s: int,
                         touch: tuple[str, ...] = ()) -> None:
        self._cache[f"{kind}:{owner}:{record_id}"] = (self._clock() + ttl_s if ttl_s else float("inf"), value)
        for other in touch:
            key = f"{kind}:{owner}:{other}"
            if key in self._cache:
                self._cache[key] = (self._clock() + ttl_s, self._cache[key][1])

    async def record_delete(self, kind: str, owner: str, record_id: str) -> bool:
        return self._cache.pop(f"{kind}:{owner}:{record_id}", None) is not None

    async def record_put_fenced(self, kind: str, owner: str, record_id: str, value: bytes, lease: str,
                                holder: str) -> bool:
        if not self._holds(lease, holder):
            return False
        await self.record_put(kind, owner, record_id, value, 0)
        return True

    async def index_add(self, index: str, member: str, score: float) -> None:
        self._indexes.setdefault(index, {})[member] = score

    async def index_remove(self, index: str, member: str) -> None:
        self._indexes.get(index, {}).pop(member, None)

    async def index_range(self, index: str, *, newest_first: bool = True) -> list[str]:
        items = sorted(self._indexes.get(index, {}).items(), key=lambda item: (item[1], item[0]),
                       reverse=newest_first)
        return [member for member, _ in items]

    def _holds(self, lease: str, holder: str) -> bool:
        held = self._lease_holders.get(lease)
        return held is not None and held[0] == holder and held[1] > self._clock()

    async def lease_take(self, lease: str, holder: str, ttl_s: float) -> bool:
        held = self._lease_holders.get(lease)
        if held is not None and held[0] != holder and held[1] > self._clock():
            return False
        self._lease_holders[lease] = (holder, self._clock() + ttl_s)
        return True

    async def lease_drop(self, lease: str, holder: str) -> None:
        if self._holds(lease, holder):
            del self._lease_holders[lease]

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
        turns = self._turns
        if turns is not None:
            await self._take_turn(turns)
        try:
            # asyncio.timeout, not wait_for: no task per call (every request makes several)
            async with asyncio.timeout(self.timeout_s):
                return await getattr(self.store, method)(*args, **kwargs)
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except TimeoutError as exc:  # this call goes on without the store; the breaker waits for a ping
            self._check_alive(method, exc)
            raise StoreUnavailable(f"{method} timed out") from exc
        except Exception as exc:  # any store failure means: go on without it (re-raised as StoreUnavailable)
            self._failed(method, exc)
            raise StoreUnavailable(str(exc)) from exc
        finally:
            if turns is not None:
                turns.release()

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

    async def _take_turn(self, turns: asyncio.Semaphore) -> None:
        """A turn within `wait_s` (StoreBusy otherwise); a free one is taken without a timer."""
        if not turns.locked():
            await turns.acquire()
            return
        try:
            async with asyncio.timeout(self.wait_s):
                await turns.acquire()
        except TimeoutError:
            self.busy += 1
            raise StoreBusy(f"no free connection within {self.wait_s}s") from None

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
