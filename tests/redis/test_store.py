"""The Store operations, on a real Redis and in memory: the same semantics from both backends."""

from __future__ import annotations

import asyncio
import time

import pytest_asyncio

from serving.gateway.store import MemoryStore, RedisStore

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


async def test_rate_check_sliding_window(store) -> None:
    # 3 requests per 2-second window
    results = [await store.rate_check("s", 3, 0, 2) for _ in range(3)]
    assert [r[0] for r in results] == [True, True, True]
    assert [r[1] for r in results] == [1, 2, 3]
    refused_at = time.monotonic()
    admitted, requests, tokens, reset = await store.rate_check("s", 3, 0, 2)
    assert (admitted, requests, tokens) == (False, 3, 0)
    assert 0 < reset <= 2  # seconds until the oldest (per-second) bucket leaves the window
    # a refusal does not take a slot: still refused, still 3 counted
    assert (await store.rate_check("s", 3, 0, 2))[:2] == (False, 3)
    # another subject is counted apart
    assert (await store.rate_check("other", 3, 0, 2))[:2] == (True, 1)
    while not (result := await store.rate_check("s", 3, 0, 2))[0]:
        assert time.monotonic() - refused_at < reset + 0.5, "still refused after Retry-After"
        await asyncio.sleep(0.05)
    waited = time.monotonic() - refused_at
    assert reset - 1.05 <= waited <= reset + 0.5  # buckets are whole seconds
    assert result[1] == 1  # the window moved past all three


async def test_tokens_count_against_tpm(store) -> None:
    assert await store.rate_check("s", 0, 100, 60) == (True, 1, 0, 60.0)
    await store.tokens_add("s", 60, 60)
    admitted, requests, tokens, _ = await store.rate_check("s", 0, 100, 60)
    assert (admitted, requests, tokens) == (True, 2, 60)
    await store.tokens_add("s", 40, 60)
    admitted, requests, tokens, reset = await store.rate_check("s", 0, 100, 60)
    assert (admitted, requests, tokens) == (False, 2, 100)
    assert 58 <= reset <= 60
    # an RPM limit alone does not look at tokens
    assert (await store.rate_check("s", 10, 0, 60))[:3] == (True, 3, 100)


async def test_tokens_leave_the_window(store) -> None:
    await store.tokens_add("s", 50, 1)
    assert (await store.rate_check("s", 0, 50, 1))[0] is False
    await asyncio.sleep(1.05)
    admitted, _, tokens, _ = await store.rate_check("s", 0, 50, 1)
    assert admitted and tokens == 0


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
        results = await asyncio.gather(*(replicas[i % 2].rate_check("hot", n, 0, 60) for i in range(3 * n)))
    finally:
        for replica in replicas:
            await replica.close()
    admitted = [r for r in results if r[0]]
    assert len(admitted) == n
    assert sorted(r[1] for r in admitted) == list(range(1, n + 1))  # each admission saw its own count
    assert all(r[1] == n for r in results if not r[0])


async def test_redis_rate_windows_expire(redis_url, redis_client) -> None:
    """The windows' hashes carry a TTL: counters of keys no longer used do not stay in Redis."""
    store = RedisStore(redis_url, prefix=PREFIX)
    try:
        await store.rate_check("s", 5, 5, 30)
        await store.tokens_add("s", 3, 30)
    finally:
        await store.close()
    keys = sorted(k.decode() for k in redis_client.keys(f"{PREFIX}rl:*"))
    assert keys == [f"{PREFIX}rl:req:s", f"{PREFIX}rl:tok:s"]
    assert all(0 < redis_client.ttl(k) <= 31 for k in keys)
