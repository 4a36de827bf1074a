"""Rate limits (RPM, TPM from real usage, streamed too), their headers, the SDK's retry, usage per key."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
import redis

import serving.gateway.auth as auth
from serving import cli
from serving.engine.fake import FakeEngine
from serving.gateway.auth import create_key, digest
from serving.gateway.limits import BYTES_PER_TOKEN
from tests.redis.support import (
    PROMPT_TOKENS,
    assert_envelope,
    chat_body,
    client_for,
    make_config,
    make_engines,
    post_chat,
    ratelimit_headers,
    sdk_for,
    settle,
    sse_json,
    stream_and_hang_up,
    wait_for,
)
from tests.redis.test_store import flood_cache, small_redis  # noqa: F401 - small_redis is a fixture

REQUEST_HEADERS = {f"x-ratelimit-{kind}-requests" for kind in ("limit", "remaining", "reset")}
TOKEN_HEADERS = {f"x-ratelimit-{kind}-tokens" for kind in ("limit", "remaining", "reset")}


def raw_store(app):
    return app.state.services.store.store


def reservation(**fields) -> int:
    """Tokens reserved at admission for post_chat(**fields): the prompt estimated from the body (as httpx
    sends it, compact) plus max_tokens."""
    body = json.dumps(chat_body(**fields), separators=(",", ":")).encode()
    return len(body) // BYTES_PER_TOKEN + chat_body(**fields)["max_tokens"]


def window_tokens(redis_client, key: str) -> int:
    return sum(int(v) for v in redis_client.hgetall(f"serving:rl:tok:{digest(key)}").values())


async def test_rpm_limit_429_with_headers(gateway) -> None:
    app = gateway(auth={"enabled": True})
    key, _ = await create_key(raw_store(app), "limited", rpm=2, tpm=10_000)
    async with client_for(app, key) as client:
        first, second = await post_chat(client), await post_chat(client, model="other")
        third = await post_chat(client)
    for response, remaining in ((first, "1"), (second, "0")):
        assert response.status_code == 200
        headers = ratelimit_headers(response)
        assert set(headers) == REQUEST_HEADERS | TOKEN_HEADERS
        assert headers["x-ratelimit-limit-requests"] == "2"
        assert headers["x-ratelimit-remaining-requests"] == remaining
        assert headers["x-ratelimit-limit-tokens"] == "10000"
        assert headers["x-ratelimit-reset-requests"].endswith("s")

    error = assert_envelope(third, 429, code="rate_limit_exceeded")
    assert error["type"] == "rate_limit_error"
    assert "RPM" in error["message"] and key not in error["message"]
    assert 1 <= int(third.headers["retry-after"]) <= 60
    headers = ratelimit_headers(third)
    assert set(headers) == REQUEST_HEADERS | TOKEN_HEADERS
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-limit-requests"] == "2"
    reset = headers["x-ratelimit-reset-requests"]
    assert reset.endswith("s") and 0 <= int(reset[:-1]) <= 60
    engines = app.state.services.registry.engines
    assert len(engines["tiny"].started) + len(engines["other"].started) == 2  # the refused one never ran


async def test_only_the_configured_limits_have_headers(gateway) -> None:
    app = gateway(auth={"enabled": True})
    rpm_only, _ = await create_key(raw_store(app), "rpm-only", rpm=50)
    tpm_only, _ = await create_key(raw_store(app), "tpm-only", tpm=500)
    unlimited, _ = await create_key(raw_store(app), "unlimited")
    async with client_for(app, rpm_only) as client:
        assert set(ratelimit_headers(await post_chat(client))) == REQUEST_HEADERS
    async with client_for(app, tpm_only) as client:
        response = await post_chat(client)
        assert set(ratelimit_headers(response)) == TOKEN_HEADERS
        assert response.headers["x-ratelimit-remaining-tokens"] == str(500 - reservation())  # reserved
    async with client_for(app, unlimited) as client:
        response = await post_chat(client)
        assert response.status_code == 200 and ratelimit_headers(response) == {}
        streamed = await post_chat(client, stream=True)
        assert streamed.status_code == 200 and ratelimit_headers(streamed) == {}


async def test_headers_on_streamed_and_cached_answers_of_limited_keys(gateway) -> None:
    app = gateway(auth={"enabled": True})
    key, _ = await create_key(raw_store(app), "limited", rpm=10)
    async with client_for(app, key) as client:
        miss = await post_chat(client, stream=True)
        await settle(app)
        hit = await post_chat(client, stream=True)
        hit_json = await post_chat(client)
    assert [r.headers["x-cache"] for r in (miss, hit, hit_json)] == ["miss", "hit", "hit"]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in (miss, hit, hit_json)] == ["9", "8", "7"]


async def test_unauthenticated_gateway_has_no_limits_headers(gateway) -> None:
    app = gateway()
    async with client_for(app) as client:
        responses = [await post_chat(client) for _ in range(3)]
    assert all(r.status_code == 200 and ratelimit_headers(r) == {} for r in responses)


async def test_openai_sdk_retries_429_and_succeeds(gateway) -> None:
    # a 2-second window: the second call is refused even when it falls in the next second
    app = gateway(auth={"enabled": True}, limits={"window_s": 2})
    key, _ = await create_key(raw_store(app), "one-per-window", rpm=1)
    statuses: list[int] = []

    async def seen(response: httpx.Response) -> None:
        statuses.append(response.status_code)

    sdk = sdk_for(app, key, max_retries=2, event_hooks={"response": [seen]})
    first = await sdk.chat.completions.create(**chat_body())
    started = time.monotonic()
    second = await sdk.chat.completions.create(**chat_body(max_tokens=3))
    waited = time.monotonic() - started
    assert first.choices[0].finish_reason == "length" and len(second.choices[0].message.content.split()) == 3
    assert statuses[0] == 200 and statuses[-1] == 200 and 429 in statuses
    assert 0.9 < waited < 3.5  # it waited as Retry-After said (1-2 s), not the SDK's short default backoff
    assert len(app.state.services.registry.engines["tiny"].started) == 2

    # without retries the SDK sees the 429 as a RateLimitError
    with pytest.raises(openai.RateLimitError) as caught:
        await sdk_for(app, key).chat.completions.create(**chat_body())
    assert caught.value.response.headers["retry-after"] in ("1", "2")


async def test_tpm_counts_real_prompt_and_completion_tokens(gateway, redis_client) -> None:
    app = gateway(auth={"enabled": True})
    per_request = PROMPT_TOKENS + 6
    reserved = reservation(temperature=0.5)  # more than it uses: the body overestimates the prompt
    tpm = 2 * per_request + reserved  # room for three requests' usage, not a fourth's reservation
    key, _ = await create_key(raw_store(app), "tokens", tpm=tpm)
    remaining = []
    async with client_for(app, key) as client:
        for _ in range(3):
            response = await post_chat(client, temperature=0.5)  # not cacheable: each one runs
            assert response.status_code == 200
            remaining.append(int(response.headers["x-ratelimit-remaining-tokens"]))
            await settle(app)
        refused = await post_chat(client, temperature=0.5)
    # the headers of a request show the tokens counted before it and its own reservation
    assert remaining == [tpm - reserved, tpm - per_request - reserved, tpm - 2 * per_request - reserved]
    assert window_tokens(redis_client, key) == 3 * per_request
    error = assert_envelope(refused, 429, code="rate_limit_exceeded")
    assert "TPM" in error["message"] and f"Used {3 * per_request}, Requested {reserved}" in error["message"]
    assert refused.headers["x-ratelimit-remaining-tokens"] == str(tpm - 3 * per_request)  # < its reservation
    assert 1 <= int(refused.headers["retry-after"]) <= 60


async def test_tpm_counts_streamed_tokens_the_client_did_not_ask_usage_for(gateway, redis_client) -> None:
    app = gateway(auth={"enabled": True})
    key, _ = await create_key(raw_store(app), "streamer", tpm=1000)
    async with client_for(app, key) as client:
        raw = await post_chat(client, stream=True, temperature=0.5, max_tokens=9)
    assert raw.status_code == 200
    events = sse_json(raw.text)
    assert '"usage"' not in raw.text and all("usage" not in e for e in events)  # the forced usage chunk is gone
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events).count(" ") == 8
    await settle(app)
    assert window_tokens(redis_client, key) == PROMPT_TOKENS + 9

    # the same through the SDK
    sdk = sdk_for(app, key)
    chunks = [c async for c in await sdk.chat.completions.create(**chat_body(stream=True, temperature=0.5))]
    assert chunks and all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    await settle(app)
    assert window_tokens(redis_client, key) == 2 * PROMPT_TOKENS + 9 + 6
    engine_requests = app.state.services.registry.engines["tiny"].started
    assert len(engine_requests) == 2


async def test_stream_with_include_usage_keeps_its_usage_and_counts_once(gateway, redis_client) -> None:
    app = gateway(auth={"enabled": True})
    key, _ = await create_key(raw_store(app), "streamer", tpm=1000)
    sdk = sdk_for(app, key)
    chunks = [c async for c in await sdk.chat.completions.create(
        **chat_body(stream=True, temperature=0.5, stream_options={"include_usage": True}))]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == PROMPT_TOKENS
    assert all(c.usage is None for c in chunks[:-1])  # the running usage the gateway asked for is taken out
    await settle(app)
    assert window_tokens(redis_client, key) == PROMPT_TOKENS + 6


async def test_tokens_of_a_stream_the_client_hung_up_on_are_counted(gateway, redis_client) -> None:
    tiny = FakeEngine("tiny", itl_s=0.02)
    app = gateway(auth={"enabled": True}, engines=make_engines(tiny=tiny))
    key, _ = await create_key(raw_store(app), "hangs-up", tpm=1000)
    # the client takes the role chunk and 5 of the 40 tokens, then goes
    sent = await stream_and_hang_up(app, chat_body(stream=True, temperature=0.5, max_tokens=40), after_chunks=6,
                                    key=key)
    assert sent[0]["status"] == 200
    assert await wait_for(lambda: len(tiny.aborted) == 1)
    await settle(app)
    counts = list((await raw_store(app).usage_get(digest(key))).values())[0]["tiny"]
    assert counts["requests"] == 1  # the request itself is recorded, and what it cost: its prompt (from the
    # engine's running usage, which the client never sees) and the tokens it got (5, and perhaps the one
    # whose sending failed)
    assert counts["prompt_tokens"] == PROMPT_TOKENS
    assert 5 <= counts["completion_tokens"] <= 6
    assert window_tokens(redis_client, key) == PROMPT_TOKENS + counts["completion_tokens"]
    sent_text = b"".join(m.get("body", b"") for m in sent[1:])
    assert sent_text.count(b'"choices":[{') >= 5 and b'"usage"' not in sent_text


async def test_running_usage_the_client_asked_for_is_kept_and_counted_once(gateway, redis_client) -> None:
    app = gateway(auth={"enabled": True})
    key, _ = await create_key(raw_store(app), "streamer", tpm=1000)
    sdk = sdk_for(app, key)
    chunks = [c async for c in await sdk.chat.completions.create(
        **chat_body(stream=True, temperature=0.5,
                    stream_options={"include_usage": True, "continuous_usage_stats": True}))]
    # role chunk, 6 tokens, then the usage chunk: every choice chunk carries the usage so far
    assert [c.usage.completion_tokens for c in chunks] == [0, 1, 2, 3, 4, 5, 6, 6]
    assert {c.usage.prompt_tokens for c in chunks} == {PROMPT_TOKENS} and chunks[-1].choices == []
    await settle(app)
    assert window_tokens(redis_client, key) == PROMPT_TOKENS + 6


async def test_streamed_completions_are_counted(gateway, redis_client) -> None:
    app = gateway(auth={"enabled": True})
    key, _ = await create_key(raw_store(app), "streamer", tpm=1000)
    async with client_for(app, key) as client:
        raw = await client.post("/v1/completions", json={"model": "tiny", "prompt": "a b c", "max_tokens": 5,
                                                         "stream": True})
    assert raw.status_code == 200 and '"usage"' not in raw.text
    await settle(app)
    assert window_tokens(redis_client, key) == 3 + 5


async def test_cache_hit_does_not_count_tokens(gateway, redis_client) -> None:
    app = gateway(auth={"enabled": True})
    key, _ = await create_key(raw_store(app), "cached", tpm=1000)
    async with client_for(app, key) as client:
        miss = await post_chat(client)
        await settle(app)
        hit = await post_chat(client)
        stream_hit = await post_chat(client, stream=True, stream_options={"include_usage": True})
        await settle(app)
    assert [r.headers["x-cache"] for r in (miss, hit, stream_hit)] == ["miss", "hit", "hit"]
    assert window_tokens(redis_client, key) == PROMPT_TOKENS + 6
    assert hit.headers["x-ratelimit-remaining-tokens"] == str(1000 - PROMPT_TOKENS - 6 - reservation())
    usage = await raw_store(app).usage_get(digest(key))
    (day,) = usage
    assert usage[day]["tiny"]["requests"] == 3
    assert usage[day]["tiny"]["cached_requests"] == 2


async def test_usage_recorded_per_key_by_model_and_day(gateway) -> None:
    app = gateway(auth={"enabled": True})
    key, _ = await create_key(raw_store(app), "user")
    other_key, _ = await create_key(raw_store(app), "someone-else")
    async with client_for(app, key) as client:
        await post_chat(client, temperature=0.5)
        await post_chat(client, temperature=0.5, stream=True, max_tokens=3)
        await post_chat(client, model="other", temperature=0.5, max_tokens=2)
        await client.post("/v1/embeddings", json={"model": "embedder", "input": ["a b", "c d e"]})
    async with client_for(app, other_key) as client:
        await post_chat(client, temperature=0.5)
    await settle(app)
    usage = await raw_store(app).usage_get(digest(key))
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert usage == {today: {
        "tiny": {"requests": 2, "prompt_tokens": 2 * PROMPT_TOKENS, "completion_tokens": 6 + 3, "cached_requests": 0},
        "other": {"requests": 1, "prompt_tokens": PROMPT_TOKENS, "completion_tokens": 2, "cached_requests": 0},
        "embedder": {"requests": 1, "prompt_tokens": 5, "completion_tokens": 0, "cached_requests": 0},
    }}
    assert (await raw_store(app).usage_get(digest(other_key)))[today]["tiny"]["requests"] == 1


async def test_usage_of_configuration_keys(gateway) -> None:
    secret = "cfg-key-for-usage-0123456789"
    app = gateway(auth={"enabled": True, "keys": [{"name": "from-config", "key": secret, "rpm": 10}]})
    async with client_for(app, secret) as client:
        assert (await post_chat(client)).status_code == 200
    await settle(app)
    usage = await raw_store(app).usage_get(digest(secret))
    assert list(usage.values()) == [{"tiny": {"requests": 1, "prompt_tokens": PROMPT_TOKENS, "completion_tokens": 6,
                                              "cached_requests": 0}}]


async def keys_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, ["keys", *argv])  # it runs its own event loop
    out, err = capsys.readouterr()
    return code, out, err


async def test_serving_keys_cli(gateway, redis_url, redis_client, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SERVING_REDIS__URL", redis_url)
    monkeypatch.setattr(auth, "VERIFIED_TTL_S", 0.0)
    code, out, _ = await keys_cli(capsys, "create", "alice", "--rpm", "5", "--tpm", "1000", "--models", "tiny,other")
    assert code == 0
    (key,) = [word for word in out.split() if word.startswith("sk-srv-")]
    assert digest(key).encode() in redis_client.hkeys("serving:keys")
    code, _, err = await keys_cli(capsys, "create", "alice")
    assert code == 1 and "exists" in err

    code, out, _ = await keys_cli(capsys, "list")
    assert code == 0 and "alice" in out and key not in out and key[len("sk-srv-"):][:12] not in out
    row = next(line for line in out.splitlines() if line.startswith("alice"))
    assert "tiny,other" in row and " 5 " in row and "1000" in row

    app = gateway(auth={"enabled": True})
    async with client_for(app, key) as client:
        assert (await post_chat(client, temperature=0.5)).status_code == 200
        assert (await post_chat(client)).headers["x-cache"] == "miss"
        await settle(app)  # the cache is written after the response
        assert (await post_chat(client)).headers["x-cache"] == "hit"
        assert (await client.post("/v1/embeddings", json={"model": "embedder", "input": "x"})).status_code == 404
    await settle(app)

    code, out, _ = await keys_cli(capsys, "usage", "alice")
    assert code == 0
    today = time.strftime("%Y-%m-%d", time.gmtime())
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["day", "model", "requests", "cached", "prompt", "tokens", "completion", "tokens", "batch",
                       "requests", "batch", "prompt", "tokens", "batch", "completion", "tokens"]
    assert rows[1:] == [[today, "tiny", "3", "1", str(3 * PROMPT_TOKENS), str(3 * 6), "0", "0", "0"]]
    code, out, _ = await keys_cli(capsys, "usage", "alice", "--json")
    assert json.loads(out) == {today: {"tiny": {"requests": 3, "cached_requests": 1,
                                                "prompt_tokens": 3 * PROMPT_TOKENS, "completion_tokens": 18}}}
    code, _, err = await keys_cli(capsys, "usage", "nobody")
    assert code == 1 and "nobody" in err

    code, out, _ = await keys_cli(capsys, "revoke", "alice")
    assert code == 0
    async with client_for(app, key) as client:
        assert_envelope(await post_chat(client), 401, code="invalid_api_key")
    code, out, _ = await keys_cli(capsys, "list")
    assert "alice" not in out and "(none)" in out
    code, _, err = await keys_cli(capsys, "revoke", "alice")
    assert code == 1


async def test_a_cache_flood_does_not_reset_a_keys_rate_limit_or_lose_its_usage(small_redis, gateway) -> None:  # noqa: F811 - fixture
    """Redis bounded as the chart runs it (maxmemory, volatile-lru; here 2 MB) and filled with 8 MB of cached
    answers: the cache entries are evicted, a key's RPM window and usage are not, so its third request in
    the window is still refused and its two answered ones are still counted. Before, the window and usage
    carried a TTL and were evicted: the limit started again from zero."""
    app = gateway(config=make_config(small_redis, auth={"enabled": True}))
    key, _ = await create_key(raw_store(app), "limited", rpm=2)
    async with client_for(app, key) as client:
        assert [(await post_chat(client, temperature=0.5)).status_code for _ in range(2)] == [200, 200]
        await settle(app)
        await flood_cache(raw_store(app), megabytes=8)
        refused = await post_chat(client, temperature=0.5)
    assert_envelope(refused, 429, code="rate_limit_exceeded")
    with redis.Redis.from_url(small_redis) as client:
        assert client.info("stats")["evicted_keys"] > 0
    usage = await raw_store(app).usage_get(digest(key))
    assert [models["tiny"]["requests"] for models in usage.values()] == [2]
