"""Keys, limits, usage and the cache on the real app: two gateway replicas sharing one Redis."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from serving.gateway.auth import create_key, digest
from serving.gateway.store import RedisStore
from tests.integration.conftest import API_KEY, NO_CACHE

pytestmark = pytest.mark.integration


def _store(redis_server) -> RedisStore:
    return RedisStore(redis_server.url)


async def _new_key(redis_server, name: str, **limits) -> str:
    store = _store(redis_server)
    try:
        key, _ = await create_key(store, name, **limits)
        return key
    finally:
        await store.close()


async def _usage_of(redis_server, key: str, requests: int) -> dict:
    """The key's recorded usage of demo-chat once `requests` requests are in (usage is recorded after the answer)."""
    store = _store(redis_server)
    try:
        deadline = time.monotonic() + 10
        counts: dict = {}
        while time.monotonic() < deadline:
            counts = next(iter((await store.usage_get(digest(key))).values()), {}).get("demo-chat", {})
            if counts.get("requests") == requests:
                break
            await asyncio.sleep(0.1)
        return counts
    finally:
        await store.close()


def test_api_requires_a_key(platform):
    response = httpx.get(f"{platform}/models")
    assert response.status_code == 401 and response.json()["error"]["code"] == "missing_api_key"
    wrong = httpx.get(f"{platform}/models", headers={"authorization": "Bearer sk-srv-not-a-key"})
    assert wrong.status_code == 401


def test_gateway_runs_two_replicas():
    from ray import serve

    gateway = serve.status().applications["serving"].deployments["gateway"]
    assert gateway.replica_states.get("RUNNING") == 2


async def test_rate_limit_holds_across_gateway_replicas(platform, redis_server):
    n = 6
    key = await _new_key(redis_server, "limited-six", rpm=n)
    body = {"model": "all-minilm-l6-v2", "input": "count me"}
    headers = {"authorization": f"Bearer {key}", **NO_CACHE}
    async with httpx.AsyncClient(base_url=platform, timeout=60, headers=headers) as http:
        responses = await asyncio.gather(*(http.post("/embeddings", json=body) for _ in range(3 * n)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * n + [429] * (2 * n)
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    # both replicas recorded usage into the same Redis: exactly the admitted requests, with real tokens
    store = _store(redis_server)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            usage = await store.usage_get(digest(key))
            counts = next(iter(usage.values()), {}).get("all-minilm-l6-v2", {})
            if counts.get("requests") == n:
                break
            await asyncio.sleep(0.1)
    finally:
        await store.close()
    assert counts["requests"] == n and counts["prompt_tokens"] > 0


async def test_a_stream_cut_short_counts_its_prompt_tokens(platform, redis_server):
    """A client that hangs up after the first tokens of a long prompt's stream still pays for the prompt:
    the gateway takes it from vLLM's running usage, which the client did not ask for and does not see."""
    key = await _new_key(redis_server, "cuts-short", tpm=10**6)
    body = {"model": "demo-chat", "messages": [{"role": "user", "content": "count my prompt " * 60}],
            "max_tokens": 1500, "ignore_eos": True, "stream": True}
    headers = {"authorization": f"Bearer {key}", **NO_CACHE}
    async with httpx.AsyncClient(base_url=platform, timeout=60, headers=headers) as http:
        received = 0
        async with http.stream("POST", "/chat/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    assert '"usage"' not in line
                    received += 1
                    if received == 4:
                        break  # leaving the block closes the connection: the client hangs up
        whole = await http.post("/chat/completions", json={**body, "stream": False, "max_tokens": 1})
    assert whole.status_code == 200
    prompt = whole.json()["usage"]["prompt_tokens"]
    assert prompt > 100
    counts = await _usage_of(redis_server, key, 2)
    assert counts["requests"] == 2
    assert counts["prompt_tokens"] == 2 * prompt  # the cut stream's prompt is counted, as the whole request's
    # the cut stream's tokens: what the client got (the role chunk and 3 or more tokens), not its 1,500
    assert 3 <= counts["completion_tokens"] - 1 < 1000


async def test_a_whole_stream_is_billed_what_vllm_counts_without_usage_in_its_chunks(platform, redis_server):
    """The replica counts a stream's tokens as vLLM does for its usage and sends the counts beside the chunks:
    a stream whose client asked for no usage is billed exactly what the same request answered whole reports,
    for every choice (n=2) and every prompt of a completions request, and its chunks carry no usage."""
    key = await _new_key(redis_server, "billed-streams", tpm=10**6)
    headers = {"authorization": f"Bearer {key}", **NO_CACHE}
    chat = {"model": "demo-chat", "messages": [{"role": "user", "content": "bill me " * 20}], "n": 2,
            "max_tokens": 7, "ignore_eos": True, "temperature": 0.5}
    completion = {"model": "demo-chat", "prompt": ["one prompt", "and another, longer prompt"], "max_tokens": 5,
                  "ignore_eos": True}
    async with httpx.AsyncClient(base_url=platform, timeout=60, headers=headers) as http:
        whole = [(await http.post(path, json=body)).json()["usage"]
                 for path, body in (("/chat/completions", chat), ("/completions", completion))]
        for path, body in (("/chat/completions", chat), ("/completions", completion)):
            async with http.stream("POST", path, json={**body, "stream": True}) as response:
                assert response.status_code == 200
                lines = [line async for line in response.aiter_lines() if line.startswith("data: {")]
            assert lines and not any('"usage"' in line for line in lines)
    counts = await _usage_of(redis_server, key, 4)
    assert counts["requests"] == 4
    assert whole[0]["completion_tokens"] == 14 and whole[1]["completion_tokens"] == 10
    # each stream billed as its whole twin: the totals are twice the whole answers'
    assert counts["prompt_tokens"] == 2 * (whole[0]["prompt_tokens"] + whole[1]["prompt_tokens"])
    assert counts["completion_tokens"] == 2 * (14 + 10)


async def test_a_beam_search_stream_is_not_billed_its_internal_requests(platform, redis_server):
    """vLLM runs beam search as one engine request per beam and step; the replica sends no counts for it, so
    the stream is metered from what it shows (its prompt estimated from the body), not from those requests."""
    key = await _new_key(redis_server, "beam-stream", tpm=10**6)
    body = {"model": "demo-chat", "messages": [{"role": "user", "content": "search " * 30}], "max_tokens": 8,
            "use_beam_search": True, "n": 2, "stream": True}
    async with httpx.AsyncClient(base_url=platform, timeout=60,
                                 headers={"authorization": f"Bearer {key}", **NO_CACHE}) as http:
        async with http.stream("POST", "/chat/completions", json=body) as response:
            assert response.status_code == 200
            events = [line async for line in response.aiter_lines() if line.startswith("data: {")]
        whole = (await http.post("/chat/completions", json={**body, "stream": False, "use_beam_search": False,
                                                            "n": 1, "max_tokens": 1})).json()["usage"]
    assert events and not any('"error"' in event for event in events)
    counts = await _usage_of(redis_server, key, 2)
    streamed_prompt = counts["prompt_tokens"] - whole["prompt_tokens"]
    # 8 steps x 2 beams would bill 16 prompts; the estimate from the body is within a small factor of one
    assert 0 < streamed_prompt < 3 * whole["prompt_tokens"]
    assert 0 < counts["completion_tokens"] - whole["completion_tokens"] <= len(events)


def test_streamed_request_replays_the_cached_answer(platform):
    client = openai.OpenAI(base_url=platform, api_key=API_KEY, max_retries=0)
    args = dict(model="demo-chat", messages=[{"role": "user", "content": f"cache me {time.time()}"}],
                max_tokens=12, temperature=0)
    first = client.chat.completions.with_raw_response.create(**args)
    assert first.headers["x-cache"] == "miss"
    answer = first.parse()
    raw = client.chat.completions.with_raw_response.create(**args, stream=True, stream_options={"include_usage": True})
    assert raw.headers["x-cache"] == "hit"
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.model_dump() == answer.usage.model_dump()


def test_redis_stopped_mid_traffic_then_restarted(platform, redis_server):
    """Runs last in this module: it restarts the session's Redis (keys in Redis are lost; config keys stay)."""
    headers = {"authorization": f"Bearer {API_KEY}"}
    body = {"model": "all-minilm-l6-v2", "input": "still here"}
    timings = []
    with httpx.Client(base_url=platform, timeout=30, headers=headers) as http:
        for i in range(16):
            if i == 5:
                redis_server.stop()
            started = time.monotonic()
            response = http.post("/embeddings", json=body)
            timings.append(time.monotonic() - started)
            assert response.status_code == 200, response.text
        assert max(timings[5:]) < 2.0  # nobody waits on the dead Redis (timeout 0.2 s, then skipped)
        redis_server.start()
        key = None
        deadline = time.monotonic() + 20
        while key is None and time.monotonic() < deadline:
            try:
                key = asyncio.run(_new_key(redis_server, "after-restart", rpm=2))
            except Exception:  # noqa: BLE001 - Redis still coming up
                time.sleep(0.2)
        limited = {"authorization": f"Bearer {key}", **NO_CACHE}
        statuses = []
        deadline = time.monotonic() + 20
        while 429 not in statuses and time.monotonic() < deadline:  # limits are enforced again
            statuses.append(http.post("/embeddings", json=body, headers=limited).status_code)
            time.sleep(0.2)
    assert 429 in statuses and statuses.count(200) >= 2
