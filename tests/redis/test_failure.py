"""Redis failing under traffic: requests go on without it (cache bypassed, limits fail open or closed),
none waits longer than about redis.timeout_s, and the same gateway uses Redis again once it is back."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

import serving.gateway.auth as auth
from serving.engine.fake import FakeEngine
from serving.gateway.auth import create_key
from serving.gateway.store import RedisStore, Resilient, StoreUnavailable
from tests.redis.support import (
    assert_envelope,
    client_for,
    make_engines,
    post_chat,
    ratelimit_headers,
    settle,
    sse_json,
    wait_for,
)

TIMEOUT_S = 0.2
RETRY_S = 0.5
SLACK_S = 0.5  # event loop and ASGI overhead on a loaded CI machine; without the timeout a frozen Redis hangs forever
LIMITED = "limited-key-0123456789abcdef"
FREE = "free-key-0123456789abcdef"


def config_sections(**limits) -> dict:
    return {
        "redis": {"timeout_s": TIMEOUT_S, "retry_interval_s": RETRY_S},
        "auth": {"enabled": True, "keys": [{"name": "limited", "key": LIMITED, "rpm": 5},
                                           {"name": "free", "key": FREE}]},
        "limits": limits,
    }


async def timed(request) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = await request
    return response, time.perf_counter() - started


async def until(check, timeout: float = 5.0, interval: float = 0.1):
    """Call `check()` (a coroutine function) until it returns something true; that value, or fail."""
    end = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < end, "the gateway did not use Redis (again) in time"
        await asyncio.sleep(interval)


async def redis_in_use(app, free: httpx.AsyncClient, limited: httpx.AsyncClient, **fields) -> str:
    """Wait until the gateway answers from the cache and counts the limited key in Redis (polled: on a
    loaded machine one call may exceed the short timeout and turn the store off for a moment);
    returns the limited key's x-ratelimit-remaining-requests."""

    async def cache_hits():
        await settle(app)
        return (await post_chat(free, **fields)).headers["x-cache"] == "hit"

    async def counted():
        return ratelimit_headers(await post_chat(limited, temperature=0.5)).get("x-ratelimit-remaining-requests")

    await until(cache_hits)
    return await until(counted)


async def test_redis_stopped_mid_traffic_then_restarted(gateway, redis_server) -> None:
    tiny = FakeEngine("tiny")
    app = gateway(engines=make_engines(tiny=tiny, other=FakeEngine("other", itl_s=0.02)), **config_sections())
    resilient = app.state.services.store
    async with client_for(app, LIMITED) as limited, client_for(app, FREE) as free:
        # Redis up: cache and limits work
        assert int(await redis_in_use(app, free, limited)) < 5
        errors_before, started_before = resilient.errors, len(tiny.started)

        # a long stream is under way when Redis goes away
        in_flight = asyncio.create_task(post_chat(free, model="other", stream=True, max_tokens=40))
        await asyncio.sleep(0.2)
        redis_server.stop()

        timings: list[float] = []
        down: list[httpx.Response] = []
        for i in range(14):  # about 1.5 s: the breaker lets calls through again (and they fail) every 0.5 s
            for request in (post_chat(free), post_chat(limited, temperature=0.5),
                            post_chat(free, stream=True, max_tokens=3),
                            free.post("/v1/embeddings", json={"model": "embedder", "input": f"e {i}"})):
                response, elapsed = await timed(request)
                down.append(response)
                timings.append(elapsed)
            await asyncio.sleep(0.1)
        assert [r.status_code for r in down] == [200] * len(down)
        assert max(timings) < TIMEOUT_S + SLACK_S, sorted(timings)[-5:]
        # the cache is bypassed, and says so (the sampled request of `limited` is never cached)...
        assert [r.headers["x-cache"] for r in down] == ["bypass"] * len(down)
        assert len(tiny.started) - started_before == 3 * 14  # every request ran on the engine
        limited_down = down[1::4]
        assert all(ratelimit_headers(r) == {} for r in limited_down)  # ...and limits fail open:
        assert len(limited_down) > 5  # more than the key's 5 RPM got through
        assert sse_json(down[2].text)[-1]["choices"][0]["finish_reason"] == "length"
        streamed = await in_flight
        assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
        assert len(sse_json(streamed.text)) == 41
        assert resilient.errors >= errors_before + 3  # tried again after each retry interval, failed, counted

        # Redis is back (empty: no persistence); the same app uses it again within a few seconds
        redis_server.start()
        restarted = time.monotonic()
        counted = 0
        while (response := await post_chat(limited, temperature=0.5)).status_code == 200:
            counted += bool(ratelimit_headers(response))  # admitted by Redis, not by the fail-open policy
            assert counted <= 5, "the RPM limit is not enforced after Redis came back"
            assert time.monotonic() - restarted < 5, "the limit is still not enforced 5 s after Redis came back"
            await asyncio.sleep(0.05)
        assert_envelope(response, 429, code="rate_limit_exceeded")
        assert counted == 5

        async def cache_hits_again():
            await settle(app)
            return (await post_chat(free, max_tokens=5)).headers["x-cache"] == "hit"

        await until(cache_hits_again)
        assert time.monotonic() - restarted < 5
        # (that nothing fails at all once Redis is back is test_no_store_errors_once_redis_is_back)


async def test_no_store_errors_once_redis_is_back(gateway, redis_server) -> None:
    app = gateway(**config_sections())
    resilient = app.state.services.store
    async with client_for(app, LIMITED) as limited, client_for(app, FREE) as free:
        # concurrent traffic: the connection pool holds several connections
        await asyncio.gather(*(post_chat(free, temperature=0.5) for _ in range(6)))
        await settle(app)
        redis_server.stop()
        redis_server.start()  # a quick restart (a failover, a rolling update of Redis)
        assert resilient.errors == 0
        responses = await asyncio.gather(*(post_chat(limited, temperature=0.5) for _ in range(5)))
        await settle(app)
        assert resilient.errors == 0  # Redis is up: nothing should fail
        assert all(ratelimit_headers(r) for r in responses)  # counted in Redis, not let through by the policy
        assert_envelope(await post_chat(limited, temperature=0.5), 429, code="rate_limit_exceeded")


async def test_failure_policy_closed_answers_503_to_limited_keys(gateway, redis_server) -> None:
    app = gateway(**config_sections(failure_policy="closed"))
    async with client_for(app, LIMITED) as limited, client_for(app, FREE) as free:

        async def admitted():
            return (await post_chat(limited)).status_code == 200

        await until(admitted)
        redis_server.stop()
        for _ in range(6):
            response, elapsed = await timed(post_chat(limited))
            assert elapsed < TIMEOUT_S + SLACK_S
            assert_envelope(response, 503, code="limits_unavailable")
            assert int(response.headers["retry-after"]) >= 1
            response, elapsed = await timed(post_chat(free))  # a key without limits does not need Redis
            assert response.status_code == 200 and elapsed < TIMEOUT_S + SLACK_S
            await asyncio.sleep(0.15)
        redis_server.start()
        await until(admitted)


async def test_frozen_redis_costs_at_most_the_timeout(gateway, redis_server) -> None:
    """A Redis that accepts connections but never answers (SIGSTOP): the timeout, not the socket's,
    bounds every request; after it resumes the answers are right (no reply read by the wrong call)."""
    app = gateway(**config_sections())
    async with client_for(app, LIMITED) as limited, client_for(app, FREE) as free:
        before = int(await redis_in_use(app, free, limited, max_tokens=2))
        redis_server.pause()
        timings = []
        for _ in range(8):
            for request in (post_chat(limited, temperature=0.5), post_chat(free), post_chat(free, max_tokens=2)):
                response, elapsed = await timed(request)
                assert response.status_code == 200
                timings.append(elapsed)
            await asyncio.sleep(0.1)
        assert max(timings) < TIMEOUT_S + SLACK_S, sorted(timings)[-5:]
        assert max(timings) > TIMEOUT_S * 0.8  # some requests really waited on Redis, and gave up in time
        assert app.state.services.store.errors >= 2
        redis_server.resume()

        async def hit_again():
            response = await post_chat(free, max_tokens=2)
            return response.headers["x-cache"] == "hit"

        await until(hit_again)
        # counting goes on from where it was (checks sent during the freeze may run when Redis resumes)
        after = int(await redis_in_use(app, free, limited, max_tokens=2))
        assert after < before
        store = app.state.services.store.store
        for i in range(20):  # every reply belongs to its own command
            await store.cache_set(f"probe-{i}", f"value-{i}".encode(), 60)
        assert await asyncio.gather(*(store.cache_get(f"probe-{i}") for i in range(20))) == [
            f"value-{i}".encode() for i in range(20)]


async def test_keys_verified_before_an_outage_keep_working(gateway, redis_server, monkeypatch) -> None:
    monkeypatch.setattr(auth, "VERIFIED_TTL_S", 0.0)  # even when the verification is stale
    app = gateway(**config_sections())
    store = app.state.services.store.store
    known, _ = await create_key(store, "known", rpm=10)
    unseen, _ = await create_key(store, "unseen")
    async with client_for(app, known) as client:

        async def accepted():
            return (await post_chat(client)).status_code == 200

        await until(accepted)
        redis_server.stop()
        for _ in range(3):
            response, elapsed = await timed(post_chat(client))
            assert response.status_code == 200 and elapsed < TIMEOUT_S + SLACK_S
    async with client_for(app, unseen) as client:
        response, elapsed = await timed(post_chat(client))
    # a key never seen cannot be checked: 503 (retry), never 401, and quickly
    assert_envelope(response, 503, code="auth_unavailable")
    assert elapsed < TIMEOUT_S + SLACK_S


async def test_resilient_wrapper_times_out_skips_and_counts_errors(redis_url, redis_server) -> None:
    failed: list[str] = []
    raw = RedisStore(redis_url)
    await raw.cache_set("warm", b"up", 60)  # the first connection, outside the short timeout
    store = Resilient(raw, timeout_s=TIMEOUT_S, retry_interval_s=RETRY_S, on_error=failed.append)
    try:
        await store.call("cache_set", "k", b"v", 60)
        assert await store.call("cache_get", "k") == b"v"
        assert store.errors == 0 and store.available

        redis_server.stop()
        with pytest.raises(StoreUnavailable):
            await store.call("cache_get", "k")
        assert store.errors == 1 and failed == ["cache_get"] and not store.available
        started = time.perf_counter()
        with pytest.raises(StoreUnavailable):  # skipped without trying: not counted again
            await store.call("rate_check", "s", 1, 0, 60)
        assert time.perf_counter() - started < 0.01
        assert store.errors == 1

        await asyncio.sleep(RETRY_S + 0.05)
        assert store.available
        with pytest.raises(StoreUnavailable):
            await store.call("key_get", "d")
        assert store.errors == 2 and failed == ["cache_get", "key_get"]

        redis_server.start()
        await asyncio.sleep(RETRY_S + 0.05)
        assert await store.call("cache_get", "k") is None  # a new, empty Redis
        await store.call("cache_set", "k", b"again", 60)
        assert await store.call("cache_get", "k") == b"again"
        assert store.errors == 2

        redis_server.pause()
        started = time.perf_counter()
        with pytest.raises(StoreUnavailable):
            await store.call("cache_get", "k")
        assert TIMEOUT_S * 0.9 < time.perf_counter() - started < TIMEOUT_S + SLACK_S
        # a timeout is a fault once Redis does not answer a ping either (a ping of at least 1 s, in the background)
        assert store.errors == 2 and store.available
        assert await wait_for(lambda: store.errors == 3, timeout=3)
        assert not store.available and failed[-1] == "cache_get"
        redis_server.resume()
    finally:
        redis_server.resume()
        await store.close()
