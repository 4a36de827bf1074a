"""The Store operations, on a real Redis and in memory: the same semantics from both backends."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from typing import Iterator

import pytest
import pytest_asyncio
import redis

from serving.gateway.store import SWEEP, MemoryStore, RedisStore
from tests.support import free_port

PREFIX = "t:"


@pytest_asyncio.fixture(loop_scope="function", params=["redis", "memory"])
async def store(request, redis_url):
    store = RedisStore(redis_url, prefix=PREFIX) if request.param == "redis" else MemoryStore()
    yield store
    await store.close()


async def test_cache_get_set_and_ttl(store) -> None:
    assert await store.cache_get("nothing") is None
    await store.cache_set("short", b"\x00answer\xff", 1)
    await store.cache_set("long", b"kept", 60)
    assert await store.cache_get("short") == b"\x00answer\xff"
    await store.cache_set("long", b"replaced", 60)
    assert await store.cache_get("long") == b"replaced"
    await asyncio.sleep(1.15)
    assert await store.cache_get("short") is None
    assert await store.cache_get("long") == b"replaced"


async def test_redis_cache_entry_has_its_ttl(redis_url, redis_client) -> None:
    store = RedisStore(redis_url, prefix=PREFIX)
    try:
        await store.cache_set("k", b"v", 300)
    finally:
        await store.close()
    assert redis_client.get(f"{PREFIX}cache:k") == b"v"
    assert 295 <= redis_client.ttl(f"{PREFIX}cache:k") <= 300


async def test_keys_put_get_list_delete(store) -> None:
    assert await store.key_get("d1") is None
    assert await store.key_list() == {}
    a = {"name": "alice", "models": ["tiny"], "rpm": 5, "tpm": None, "expires_at": None}
    b = {"name": "bob", "models": None, "rpm": None, "tpm": 100, "expires_at": 123.5}
    await store.key_put("d1", a)
    await store.key_put("d2", b)
    assert await store.key_get("d1") == a
    assert await store.key_list() == {"d1": a, "d2": b}
    assert await store.key_delete("d1") is True
    assert await store.key_delete("d1") is False
    assert await store.key_get("d1") is None
    assert await store.key_list() == {"d2": b}


async def admit(store, subject: str, *, rpm: int = 0, tpm: int = 0, window: int = 60, reserve: int = 0,
                cap: int = 0, lease: str = "lease", lease_s: float = 30):
    return await store.admit(subject, lease, rpm=rpm, tpm=tpm, reserve=reserve, max_concurrent=cap, window_s=window,
                             lease_s=lease_s)


async def use(store, subject: str, tokens: int, window: int = 60) -> None:
    """Tokens used by a request admitted without a reservation."""
    await store.release(subject, "", bucket=0, reserved=0, used=tokens, window_s=window)


async def test_rate_check_sliding_window(store) -> None:
    # 3 requests per 2-second window
    results = [await admit(store, "s", rpm=3, window=2) for _ in range(3)]
    assert [r.refused for r in results] == [None, None, None]
    assert [r.requests for r in results] == [1, 2, 3]
    refused_at = time.monotonic()
    result = await admit(store, "s", rpm=3, window=2)
    assert (result.refused, result.requests, result.tokens) == ("requests", 3, 0)
    assert 0 < result.reset_s <= 2  # seconds until the oldest (per-second) bucket leaves the window
    reset = result.reset_s
    # a refusal does not take a slot: still refused, still 3 counted
    assert (await admit(store, "s", rpm=3, window=2)).requests == 3
    # another subject is counted apart
    assert (await admit(store, "other", rpm=3, window=2)).requests == 1
    while (result := await admit(store, "s", rpm=3, window=2)).refused:
        assert time.monotonic() - refused_at < reset + 0.5, "still refused after Retry-After"
        await asyncio.sleep(0.05)
    waited = time.monotonic() - refused_at
    assert reset - 1.05 <= waited <= reset + 0.5  # buckets are whole seconds
    assert result.requests == 1  # the window moved past all three


async def test_tokens_count_against_tpm(store) -> None:
    first = await admit(store, "s", tpm=100)
    assert (first.refused, first.requests, first.tokens, first.reset_s) == (None, 1, 0, 60.0)
    await use(store, "s", 60)
    result = await admit(store, "s", tpm=100)
    assert (result.refused, result.requests, result.tokens) == (None, 2, 60)
    await use(store, "s", 40)
    result = await admit(store, "s", tpm=100)
    assert (result.refused, result.requests, result.tokens) == ("tokens", 2, 100)
    assert 58 <= result.reset_s <= 60
    # an RPM limit alone does not look at tokens
    result = await admit(store, "s", rpm=10)
    assert (result.refused, result.requests, result.tokens) == (None, 3, 100)


async def test_tokens_leave_the_window(store) -> None:
    await use(store, "s", 50, window=1)
    assert (await admit(store, "s", tpm=50, window=1)).refused == "tokens"
    await asyncio.sleep(1.05)
    result = await admit(store, "s", tpm=50, window=1)
    assert result.refused is None and result.tokens == 0


async def test_reservations_count_until_settled(store) -> None:
    """A reservation counts against TPM from admission; its release replaces it by what was used."""
    first = await admit(store, "s", tpm=100, reserve=70, lease="a")
    assert (first.refused, first.tokens) == (None, 70)
    second = await admit(store, "s", tpm=100, reserve=40, lease="b")  # 70 + 40 would overshoot 100
    assert (second.refused, second.tokens) == ("tokens", 70)
    assert (await admit(store, "s", tpm=100, reserve=30, lease="c")).tokens == 100  # exactly fits
    await store.release("s", "a", bucket=first.bucket, reserved=70, used=12, window_s=60)
    assert (await admit(store, "s", tpm=100, reserve=0)).tokens == 30 + 12
    await store.release("s", "x", bucket=first.bucket, reserved=30, used=0, window_s=60)  # refunded
    assert (await admit(store, "s", tpm=100, reserve=0)).tokens == 12


async def test_concurrency_leases(store) -> None:
    held = [await admit(store, "s", cap=2, lease=name) for name in ("a", "b")]
    assert [r.in_flight for r in held] == [1, 2]
    refused = await admit(store, "s", cap=2, rpm=100, lease="c")
    assert (refused.refused, refused.in_flight, refused.requests) == ("concurrent", 2, 2)  # refusal counts nothing
    await store.release("s", "a", bucket=0, reserved=0, used=0, window_s=60)
    assert (await admit(store, "s", cap=2, lease="c")).in_flight == 2
    assert (await admit(store, "other", cap=2, lease="a")).in_flight == 1  # per subject
    # a lease nobody released (its gateway died) frees its slot when it expires
    await store.release("s", "b", bucket=0, reserved=0, used=0, window_s=60)
    await admit(store, "s", cap=2, lease="short", lease_s=0.2)
    assert (await admit(store, "s", cap=2, lease="d")).refused == "concurrent"
    await asyncio.sleep(0.3)
    assert (await admit(store, "s", cap=2, lease="d")).in_flight == 2


async def test_usage_by_day_and_model(store) -> None:
    assert await store.usage_get("s") == {}
    await store.usage_add("s", "2026-11-01", "tiny", {"requests": 1, "prompt_tokens": 4, "completion_tokens": 6})
    await store.usage_add("s", "2026-11-01", "tiny", {"requests": 1, "prompt_tokens": 4, "completion_tokens": 2})
    await store.usage_add("s", "2026-11-01", "org/other", {"requests": 1, "cached_requests": 1})
    await store.usage_add("s", "2026-11-02", "tiny", {"requests": 2})
    await store.usage_add("someone-else", "2026-11-01", "tiny", {"requests": 7})
    assert await store.usage_get("s") == {
        "2026-11-01": {"tiny": {"requests": 2, "prompt_tokens": 8, "completion_tokens": 8},
                       "org/other": {"requests": 1, "cached_requests": 1}},
        "2026-11-02": {"tiny": {"requests": 2}},
    }
    assert await store.usage_get("someone-else") == {"2026-11-01": {"tiny": {"requests": 7}}}


async def test_concurrent_rate_checks_admit_exactly_n(redis_url) -> None:
    """3N concurrent checks from two stores (two gateway replicas, two pools) admit exactly N."""
    n = 20
    replicas = [RedisStore(redis_url, prefix=PREFIX), RedisStore(redis_url, prefix=PREFIX)]
    try:
        results = await asyncio.gather(*(admit(replicas[i % 2], "hot", rpm=n) for i in range(3 * n)))
    finally:
        for replica in replicas:
            await replica.close()
    admitted = [r for r in results if r.refused is None]
    assert len(admitted) == n
    assert sorted(r.requests for r in admitted) == list(range(1, n + 1))  # each admission saw its own count
    assert all(r.requests == n for r in results if r.refused)


async def test_redis_limits_and_usage_carry_no_ttl(redis_url, redis_client) -> None:
    """Under volatile-lru a key with a TTL may be evicted: only cache entries have one. The limits' contents
    expire in the scripts instead (the next tests), usage is kept."""
    store = RedisStore(redis_url, prefix=PREFIX)
    try:
        await admit(store, "s", rpm=5, tpm=5, reserve=2, cap=3, window=30, lease_s=20)
        await use(store, "s", 3, window=30)
        await store.usage_add("s", "2026-11-30", "m", {"requests": 1})
        await store.cache_set("answer", b"{}", 300)
    finally:
        await store.close()
    keys = {k.decode(): redis_client.ttl(k) for k in redis_client.scan_iter(f"{PREFIX}*")}
    limits = {f"{PREFIX}rl:{name}" for name in ("req:s", "tok:s", "lease:s", "active")}
    assert {k for k in keys if ":rl:" in k} == limits
    assert {k: ttl for k, ttl in keys.items() if ttl != -1} == {f"{PREFIX}cache:answer": keys[f"{PREFIX}cache:answer"]}


def limit_keys(store, redis_client) -> set[str]:
    """The rate-limit keys the store holds, named as in Redis (MemoryStore's entries mapped to those names)."""
    if isinstance(store, RedisStore):
        return {k.decode()[len(PREFIX):] for k in redis_client.scan_iter(f"{PREFIX}rl:*")}
    return ({f"rl:{key}" for key in store._buckets} | {f"rl:lease:{s}" for s in store._leases}
            | ({"rl:active"} if store._indexed else set()))


async def test_a_finished_requests_lease_goes_and_its_window_is_pruned_by_the_next_call(store, redis_client) -> None:
    """Nothing stays behind a request: its lease goes at release, its buckets once out of the window (at the
    next call of anyone), a lease nobody released once it expired."""
    done = await admit(store, "s", tpm=100, reserve=10, cap=2, window=1, lease="a", lease_s=30)
    await admit(store, "dead", cap=2, window=1, lease="lost", lease_s=0.5)  # its gateway never releases it
    assert limit_keys(store, redis_client) == {"rl:req:s", "rl:tok:s", "rl:lease:s", "rl:req:dead", "rl:lease:dead",
                                               "rl:active"}
    await store.release("s", "a", bucket=done.bucket, reserved=10, used=4, window_s=1)
    assert "rl:lease:s" not in limit_keys(store, redis_client)  # an empty lease set is deleted at once
    await asyncio.sleep(2.05)  # both windows and the lost lease have expired
    await admit(store, "someone-else", window=1)
    assert limit_keys(store, redis_client) == {"rl:req:someone-else", "rl:active"}
    await asyncio.sleep(1.05)
    await admit(store, "someone-else", rpm=5, window=1)  # prunes its own window: one new request counted
    assert limit_keys(store, redis_client) == {"rl:req:someone-else", "rl:active"}


async def test_rate_limit_keys_stay_bounded_over_many_windows(store, redis_client) -> None:
    """Many keys, each making one request and never coming back, over several 1-second windows: the keys
    held stay those of the last windows' subjects (each call prunes up to SWEEP overdue subjects), and once
    all are overdue the next calls leave nothing of them."""
    rounds, per_round, window = 6, 40, 1
    counts = []
    for r in range(rounds):
        for j in range(per_round):
            lease = f"lease-{j}"
            held = await admit(store, f"k{r}-{j}", tpm=1000, reserve=5, cap=2, window=window, lease=lease, lease_s=1)
            await store.release(f"k{r}-{j}", lease, bucket=held.bucket, reserved=5, used=3, window_s=window)
        counts.append(len(limit_keys(store, redis_client)))
        await asyncio.sleep(0.5)
    written = rounds * per_round * 2  # a requests and a tokens hash each (the released lease went at once)
    assert max(counts) <= 3 * per_round * 2 + 1 < written, counts  # about two rounds are within a window
    await asyncio.sleep(2.05)
    for _ in range(written // SWEEP):
        await admit(store, "last", window=window)
    assert limit_keys(store, redis_client) == {"rl:req:last", "rl:active"}, counts


@pytest.fixture
def small_redis(tmp_path) -> Iterator[str]:
    """Its own redis-server, bounded as the chart's is but tiny: --maxmemory 2mb, volatile-lru. Its URL."""
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), "--maxmemory", "2mb", "--maxmemory-policy", "volatile-lru"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.RedisError:
            assert time.monotonic() < deadline and process.poll() is None, "redis-server did not start"
            time.sleep(0.02)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        process.terminate()
        process.wait(10)


async def flood_cache(store, megabytes: int) -> None:
    """`megabytes` of cached answers (32 KiB each), as one tenant's large distinct prompts would leave."""
    body = os.urandom(32 * 1024)
    for i in range(megabytes * 32):
        await store.cache_set(f"flood-{i}", body, 3600)


def limits_and_usage(client: redis.Redis) -> dict[str, object]:
    """Every rate-limit and usage key of the default prefix, with its contents."""
    out: dict[str, object] = {}
    for key in client.scan_iter("serving:*"):
        name = key.decode()
        if name.startswith(("serving:rl:", "serving:usage")):
            kind = client.type(key)
            out[name] = (client.hgetall(key) if kind == b"hash" else client.zrange(key, 0, -1, withscores=True)
                         if kind == b"zset" else client.smembers(key))
    return out


async def test_a_cache_flood_never_evicts_rate_limits_leases_or_usage(small_redis) -> None:
    """8 MB of cache into a 2 MB Redis that evicts keys with a TTL: the cache entries go, every window, lease and
    usage record stays as it was, and the limits still count what they counted (before: all 200 of those
    keys of 50 tenants were evicted, since each had a TTL)."""
    store = RedisStore(small_redis)
    client = redis.Redis.from_url(small_redis)
    try:
        for i in range(50):
            await admit(store, f"k{i}", rpm=2, tpm=10_000, reserve=10, cap=2, lease=f"lease-{i}", lease_s=600)
            await store.usage_add(f"k{i}", "2026-11-30", "tiny", {"requests": 1, "prompt_tokens": 7})
        before = limits_and_usage(client)
        written = {f"serving:{kind}:k{i}" for i in range(50) for kind in ("rl:req", "rl:tok", "rl:lease", "usage-days")}
        assert written | {f"serving:usage:k{i}:2026-11-30" for i in range(50)} <= set(before)
        await flood_cache(store, megabytes=8)
        info = client.info("stats") | client.info("memory")
        assert info["evicted_keys"] > 0 and info["used_memory"] <= 2 * 2**20
        assert limits_and_usage(client) == before
        again = await admit(store, "k7", rpm=2, tpm=10_000, reserve=10, cap=2, lease="second", lease_s=600)
        assert (again.refused, again.requests, again.tokens, again.in_flight) == (None, 2, 20, 2)
        assert (await admit(store, "k7", rpm=2, cap=3)).refused == "requests"
        assert await store.usage_get("k7") == {"2026-11-30": {"tiny": {"requests": 1, "prompt_tokens": 7}}}
    finally:
        client.close()
        await store.close()
