"""The response cache on a real Redis: what is cached, x-cache, Cache-Control, streamed and non-streamed
answers sharing an entry (replayed as SSE the openai SDK parses), modes, TTL, size, failures, tenants."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

import openai
import pytest

from serving.engine.fake import FakeEngine
from serving.engine.protocol import Reply
from serving.gateway.auth import create_key
from serving.gateway.store import MemoryStore
from tests.redis.support import (
    CHAT,
    PROMPT_TOKENS,
    chat_body,
    client_for,
    make_engines,
    post_chat,
    sdk_for,
    settle,
    sse_json,
    stream_and_hang_up,
    wait_for,
)


def cache_keys(redis_client) -> list[bytes]:
    return list(redis_client.scan_iter("serving:cache:*"))


def engine(app, name: str = "tiny") -> FakeEngine:
    return app.state.services.registry.engines[name]


def store_for(backend: str):
    return MemoryStore() if backend == "memory" else None  # None: the RedisStore from the configuration


def assert_same_answer(hit: dict, stored: dict) -> None:
    """A cache hit is the stored answer as a new one: the same but for its own `id` and `created`."""
    assert {k: v for k, v in hit.items() if k not in ("id", "created")} == \
        {k: v for k, v in stored.items() if k not in ("id", "created")}
    if "id" in stored:
        assert hit["id"] != stored["id"] and hit["created"] >= stored["created"]


# --------------------------------------------------------------------------------- what is cached


@pytest.mark.parametrize("fields, cached", [
    ({"temperature": 0}, True),
    ({"temperature": 0.8, "seed": 7}, True),
    ({"seed": 0}, True),
    ({"temperature": 0.8}, False),
    ({}, False),  # the OpenAI default temperature is 1
    ({"temperature": 0.0001}, False),
    ({"temperature": 1, "seed": "7"}, False),  # not an integer seed
])
async def test_reproducible_mode_caches_only_reproducible_requests(gateway, fields, cached) -> None:
    app = gateway()
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 5, **fields}
    async with client_for(app) as client:
        first = await client.post("/v1/chat/completions", json=body)
        await settle(app)
        second = await client.post("/v1/chat/completions", json=body)
    assert first.status_code == second.status_code == 200
    if cached:
        assert [first.headers["x-cache"], second.headers["x-cache"]] == ["miss", "hit"]
        assert_same_answer(second.json(), first.json())
        assert len(engine(app).started) == 1
    else:
        assert [first.headers["x-cache"], second.headers["x-cache"]] == ["bypass", "bypass"]
        assert len(engine(app).started) == 2


async def test_embeddings_and_completions_are_cached(gateway, redis_client) -> None:
    app = gateway()
    async with client_for(app) as client:
        embeds = []
        completions = []
        for _ in range(2):
            embeds.append(await client.post("/v1/embeddings", json={"model": "embedder", "input": ["a b", "c"]}))
            completions.append(await client.post("/v1/completions", json={"model": "tiny", "prompt": "p q",
                                                                         "max_tokens": 4, "temperature": 0}))
            await settle(app)
        other_input = await client.post("/v1/embeddings", json={"model": "embedder", "input": ["a b"]})
        await settle(app)
    assert [r.headers["x-cache"] for r in embeds] == ["miss", "hit"]
    assert_same_answer(embeds[1].json(), embeds[0].json())
    assert [r.headers["x-cache"] for r in completions] == ["miss", "hit"]
    assert_same_answer(completions[1].json(), completions[0].json())
    assert other_input.headers["x-cache"] == "miss"
    assert len(engine(app, "embedder").started) == 2
    assert len(cache_keys(redis_client)) == 3


async def test_fields_that_do_not_change_the_answer_share_the_entry(gateway) -> None:
    app = gateway()
    async with client_for(app) as client:
        assert (await post_chat(client)).headers["x-cache"] == "miss"
        await settle(app)
        assert (await post_chat(client, user="someone")).headers["x-cache"] == "hit"
        streamed = await post_chat(client, stream=True, stream_options={"include_usage": True})
        assert streamed.headers["x-cache"] == "hit"
        # but a field that changes the answer does not
        assert (await post_chat(client, max_tokens=7)).headers["x-cache"] == "miss"
        assert (await post_chat(client, stop=["x"])).headers["x-cache"] == "miss"


# ----------------------------------------------------------------------------------- Cache-Control


async def test_no_cache_skips_the_read_and_rewrites_the_entry(gateway, redis_client) -> None:
    app = gateway()
    async with client_for(app) as client:
        first = await post_chat(client, headers={"x-request-id": "first"})
        await settle(app)
        fresh = await post_chat(client, headers={"x-request-id": "fresh", "cache-control": "no-cache"})
        await settle(app)
        hit = await post_chat(client, headers={"x-request-id": "third"})
    # an answer's id is the engine's (fake-<internal request id>): it tells which request produced an answer
    assert first.headers["x-cache"] == "miss" and first.json()["id"] == f"fake-{engine(app).started[0]}"
    # no-cache: the engine answers (the cache is not read; the gateway says bypass, as nginx does)...
    assert fresh.headers["x-cache"] == "bypass" and fresh.json()["id"] == f"fake-{engine(app).started[1]}"
    assert len(engine(app).started) == 2
    # ...and its answer replaced the entry (a hit is a new answer: an id of its own)
    [key] = cache_keys(redis_client)
    assert json.loads(redis_client.get(key))["id"] == fresh.json()["id"]
    assert hit.headers["x-cache"] == "hit" and hit.json()["id"] not in (first.json()["id"], fresh.json()["id"])


async def test_no_store_skips_the_write(gateway, redis_client) -> None:
    app = gateway()
    async with client_for(app) as client:
        first = await post_chat(client, headers={"cache-control": "no-store"})
        await settle(app)
        assert cache_keys(redis_client) == []
        second = await post_chat(client)
        await settle(app)
        third = await post_chat(client, headers={"cache-control": "no-store"})  # reading is still allowed
        both = await post_chat(client, headers={"cache-control": "No-Cache, no-store"})
        await settle(app)
    assert [r.headers["x-cache"] for r in (first, second, third, both)] == ["miss", "miss", "hit", "bypass"]
    assert len(engine(app).started) == 3
    assert len(cache_keys(redis_client)) == 1


async def test_stream_no_store_is_not_written(gateway, redis_client) -> None:
    app = gateway()
    async with client_for(app) as client:
        response = await post_chat(client, stream=True, headers={"cache-control": "no-store"})
        await settle(app)
    assert response.headers["x-cache"] == "miss"
    assert cache_keys(redis_client) == []


# ------------------------------------------------------------------ streamed and non-streamed share


def streamed_text(events: list[dict]) -> str:
    return "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])


@pytest.mark.parametrize("backend", ["redis", "memory"])
async def test_stream_hits_what_a_non_streamed_request_stored(gateway, backend) -> None:
    app = gateway(store=store_for(backend))
    sdk = sdk_for(app)
    raw = await sdk.chat.completions.with_raw_response.create(**chat_body(max_tokens=8))
    assert raw.headers["x-cache"] == "miss"
    answer = raw.parse()
    await settle(app)

    async with client_for(app) as client:
        plain = await post_chat(client, max_tokens=8, stream=True)
        with_usage = await post_chat(client, max_tokens=8, stream=True, stream_options={"include_usage": True})
    for response in (plain, with_usage):
        assert response.headers["x-cache"] == "hit"
        assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_json(plain.text)  # valid framing, ends with [DONE]
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == "tiny" for e in events)
    assert streamed_text(events) == answer.choices[0].message.content
    assert all("usage" not in e for e in events)
    usage_events = [e for e in sse_json(with_usage.text) if e.get("usage")]
    assert len(usage_events) == 1 and usage_events[0]["choices"] == []
    assert usage_events[0]["usage"] == answer.usage.model_dump(exclude_none=True)

    # what the official SDK makes of the replay
    stream = await sdk.chat.completions.create(**chat_body(max_tokens=8, stream=True,
                                                           stream_options={"include_usage": True}))
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == answer.choices[0].message.content
    assert finish == [answer.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage == answer.usage
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(engine(app).started) == 1


@pytest.mark.parametrize("backend", ["redis", "memory"])
async def test_non_streamed_request_hits_what_a_stream_stored(gateway, backend) -> None:
    app = gateway(store=store_for(backend))
    sdk = sdk_for(app)
    # a streamed miss (without include_usage) is assembled while it streams, then stored
    stream = await sdk.chat.completions.create(**chat_body(max_tokens=8, stream=True))
    chunks = [c async for c in stream]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert all(c.usage is None for c in chunks)
    await settle(app)

    raw = await sdk.chat.completions.with_raw_response.create(**chat_body(max_tokens=8))
    assert raw.headers["x-cache"] == "hit"
    cached = raw.parse()
    assert len(engine(app).started) == 1
    # the same as an answer straight from the engine
    fresh = await sdk.chat.completions.with_raw_response.create(
        **chat_body(max_tokens=8), extra_headers={"cache-control": "no-cache, no-store"})
    assert fresh.headers["x-cache"] == "bypass"
    direct = fresh.parse()
    assert cached.object == direct.object == "chat.completion"
    assert cached.model == direct.model == "tiny"
    assert cached.choices[0].message.content == direct.choices[0].message.content == streamed
    assert cached.choices[0].message.role == "assistant"
    assert cached.choices[0].finish_reason == direct.choices[0].finish_reason == "length"
    assert cached.usage == direct.usage  # the gateway asked the engine for usage on the stream
    assert cached.usage.prompt_tokens == PROMPT_TOKENS and cached.usage.completion_tokens == 8

    # and a streamed request replays the assembled entry
    replayed = [c async for c in await sdk.chat.completions.create(
        **chat_body(max_tokens=8, stream=True, stream_options={"include_usage": True}))]
    assert "".join(c.choices[0].delta.content or "" for c in replayed if c.choices) == streamed
    assert replayed[-1].usage == direct.usage


async def test_streamed_completions_share_the_entry(gateway) -> None:
    app = gateway()
    sdk = sdk_for(app)
    body = {"model": "tiny", "prompt": "x y z", "max_tokens": 5, "seed": 3}
    miss = [c async for c in await sdk.completions.create(**body, stream=True)]
    await settle(app)
    raw = await sdk.completions.with_raw_response.create(**body)
    assert raw.headers["x-cache"] == "hit"
    answer = raw.parse()
    assert answer.choices[0].text == "".join(c.choices[0].text for c in miss if c.choices)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 5
    async with client_for(app) as client:
        replay = await client.post("/v1/completions", json={**body, "stream": True})
    assert replay.headers["x-cache"] == "hit"
    events = sse_json(replay.text)
    assert all(e["object"] == "text_completion" for e in events)
    assert "".join(e["choices"][0]["text"] for e in events) == answer.choices[0].text
    assert len(engine(app).started) == 1


# ------------------------------------------------------------------------- modes, TTL, entry size


async def test_cache_mode_per_model(gateway) -> None:
    models = [
        {"name": "tiny", "source": "/models/tiny", "cache": "off"},
        {"name": "other", "source": "/models/other", "cache": "all"},
        {"name": "embedder", "source": "/models/embedder", "kind": "embed"},  # the default: cache.mode
    ]
    app = gateway(models=models, cache={"mode": "off"})
    async with client_for(app) as client:
        results: dict[str, list[str]] = {}
        for _ in range(2):
            for label, body in (("tiny t=0", chat_body(model="tiny")),
                                ("other t=0.9", chat_body(model="other", temperature=0.9)),
                                ("other t=0", chat_body(model="other"))):
                response = await client.post("/v1/chat/completions", json=body)
                results.setdefault(label, []).append(response.headers["x-cache"])
            response = await client.post("/v1/embeddings", json={"model": "embedder", "input": "e"})
            results.setdefault("embedder", []).append(response.headers["x-cache"])
            await settle(app)
    assert results == {"tiny t=0": ["bypass", "bypass"], "other t=0.9": ["miss", "hit"],
                       "other t=0": ["miss", "hit"], "embedder": ["bypass", "bypass"]}


async def test_global_mode_all_caches_sampled_requests(gateway) -> None:
    app = gateway(cache={"mode": "all"})
    async with client_for(app) as client:
        first = await post_chat(client, temperature=1.3)
        await settle(app)
        second = await post_chat(client, temperature=1.3)
    assert [first.headers["x-cache"], second.headers["x-cache"]] == ["miss", "hit"]


async def test_entries_expire_after_ttl(gateway, redis_client) -> None:
    app = gateway(cache={"ttl_s": 1})
    async with client_for(app) as client:
        assert (await post_chat(client)).headers["x-cache"] == "miss"
        await settle(app)
        (key,) = cache_keys(redis_client)
        assert 0 < redis_client.pttl(key) <= 1000
        assert (await post_chat(client)).headers["x-cache"] == "hit"
        await asyncio.sleep(1.1)
        assert (await post_chat(client)).headers["x-cache"] == "miss"


async def test_entries_over_max_entry_bytes_are_not_stored(gateway, redis_client) -> None:
    app = gateway(cache={"max_entry_bytes": 1024})
    async with client_for(app) as client:
        small = [await post_chat(client, max_tokens=3)]
        big = [await post_chat(client, max_tokens=300)]
        big_stream = [await post_chat(client, max_tokens=250, stream=True)]
        await settle(app)
        small.append(await post_chat(client, max_tokens=3))
        big.append(await post_chat(client, max_tokens=300))
        big_stream.append(await post_chat(client, max_tokens=250, stream=True))
    assert len(small[0].content) < 1024 < len(big[0].content)
    assert [r.headers["x-cache"] for r in small] == ["miss", "hit"]
    assert [r.headers["x-cache"] for r in big] == ["miss", "miss"]
    assert [r.headers["x-cache"] for r in big_stream] == ["miss", "miss"]
    assert len(cache_keys(redis_client)) == 1


# ------------------------------------------------------------------- failed generations are not kept


async def test_stream_failing_mid_way_is_not_stored(gateway, redis_client) -> None:
    app = gateway(engines=make_engines(tiny=FakeEngine("tiny", fail_after=2)))
    async with client_for(app) as client:
        broken = await post_chat(client, stream=True)
        await settle(app)
        again = await post_chat(client, stream=True)
        await settle(app)
    assert broken.status_code == 200
    assert any("error" in e for e in sse_json(broken.text))
    assert again.headers["x-cache"] == "miss"
    assert cache_keys(redis_client) == []
    assert len(engine(app).started) == 2


async def test_engine_error_is_not_stored(gateway, redis_client) -> None:
    app = gateway()
    async with client_for(app) as client:
        bad = [await post_chat(client, max_tokens=-1) for _ in range(2)]
        await settle(app)
    assert [r.status_code for r in bad] == [400, 400]
    assert cache_keys(redis_client) == []
    assert len(engine(app).started) == 2


class NoFinishEngine:
    """A stream that ends with [DONE] but never says why it finished: not a whole answer."""

    def __init__(self):
        self.started = []

    async def ready(self) -> bool:
        return True

    async def generate(self, route, body, request_id, timeout_s=None, **_routing) -> AsyncIterator[Reply | str]:
        self.started.append(request_id)
        yield Reply(200, None)
        chunk = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "tiny",
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": "partial"}, "finish_reason": None}]}
        yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"


async def test_stream_without_finish_reason_is_not_stored(gateway, redis_client) -> None:
    app = gateway(engines=make_engines(tiny=NoFinishEngine()))
    async with client_for(app) as client:
        response = await post_chat(client, stream=True)
        await settle(app)
    assert response.status_code == 200 and "partial" in response.text
    assert cache_keys(redis_client) == []


async def test_client_hanging_up_mid_stream_is_not_stored(gateway, redis_client) -> None:
    tiny = FakeEngine("tiny", itl_s=0.01)
    app = gateway(engines=make_engines(tiny=tiny))
    sent = await stream_and_hang_up(app, chat_body(max_tokens=40, stream=True), after_chunks=3)
    assert sent[0]["status"] == 200
    assert not any(m.get("body", b"").endswith(b"[DONE]\n\n") for m in sent)
    assert await wait_for(lambda: len(tiny.aborted) == 1)
    await settle(app)
    assert cache_keys(redis_client) == []
    async with client_for(app) as client:
        response = await post_chat(client, max_tokens=40, stream=True)
    assert response.headers["x-cache"] == "miss"


# -------------------------------------------------------------------------------- tenants and names


async def alice_and_bob(app) -> tuple[str, str]:
    """Two tenants: an API key each in the app's store."""
    store = app.state.services.store.store
    return (await create_key(store, "alice"))[0], (await create_key(store, "bob"))[0]


@pytest.mark.parametrize("backend", ["redis", "memory"])
async def test_answers_never_cross_keys(gateway, backend) -> None:
    app = gateway(store=store_for(backend), auth={"enabled": True})
    alice, bob = await alice_and_bob(app)
    async with client_for(app, alice) as a, client_for(app, bob) as b:
        first = await post_chat(a, headers={"x-request-id": "alice-1"})
        await settle(app)
        alice_again = await post_chat(a)
        bob_first = await post_chat(b, headers={"x-request-id": "bob-1"})
        await settle(app)
        bob_again = await post_chat(b)
        bob_stream = await post_chat(b, stream=True)
    assert [first.headers["x-cache"], alice_again.headers["x-cache"]] == ["miss", "hit"]
    bob_id = bob_first.json()["id"]  # the engine's id of bob's answer (fake-<internal request id>)
    # bob's first request missed: alice's entry is not his to read; his hits are new answers from his own
    assert bob_first.headers["x-cache"] == "miss" and bob_id != first.json()["id"]
    assert bob_again.headers["x-cache"] == "hit" and bob_again.json()["id"] not in (bob_id, first.json()["id"])
    assert bob_stream.headers["x-cache"] == "hit"
    assert len({e["id"] for e in sse_json(bob_stream.text)}) == 1 and sse_json(bob_stream.text)[0]["id"] != bob_id
    assert_same_answer(alice_again.json(), first.json())
    assert len(engine(app).started) == 2


async def test_shared_cache_crosses_keys_when_configured(gateway) -> None:
    app = gateway(auth={"enabled": True}, cache={"shared": True})
    alice, bob = await alice_and_bob(app)
    async with client_for(app, alice) as a, client_for(app, bob) as b:
        first = await post_chat(a, headers={"x-request-id": "alice-1"})
        await settle(app)
        bob_hit = await post_chat(b)
    assert first.headers["x-cache"] == "miss"
    assert bob_hit.headers["x-cache"] == "hit"
    assert_same_answer(bob_hit.json(), first.json())


async def test_model_and_adapter_names_are_in_the_key(gateway) -> None:
    app = gateway()
    async with client_for(app) as client:
        base = await post_chat(client, model="tiny")
        await settle(app)
        adapter = await post_chat(client, model="tiny-lora")
        await settle(app)
        adapter_again = await post_chat(client, model="tiny-lora")
        other = await post_chat(client, model="other")
    assert [r.headers["x-cache"] for r in (base, adapter, adapter_again, other)] == ["miss", "miss", "hit", "miss"]
    assert adapter_again.json()["model"] == "tiny-lora"
    assert base.json()["model"] == "tiny"


async def test_replicas_share_entries_of_the_same_revision_only(gateway) -> None:
    def models(revision: str) -> list[dict[str, Any]]:
        return [{"name": "tiny", "source": "hub/tiny", "revision": revision},
                {"name": "embedder", "source": "/models/embedder", "kind": "embed"}]

    engines = {"tiny": FakeEngine("tiny"), "embedder": FakeEngine("embedder")}
    replica_a = gateway(models=models("v1"), engines=engines)
    replica_b = gateway(models=models("v1"), engines=engines)
    upgraded = gateway(models=models("v2"), engines=engines)
    async with client_for(replica_a) as a, client_for(replica_b) as b, client_for(upgraded) as c:
        assert (await post_chat(a)).headers["x-cache"] == "miss"
        await settle(replica_a)
        assert (await post_chat(b)).headers["x-cache"] == "hit"  # another gateway replica, the same Redis
        assert (await post_chat(c)).headers["x-cache"] == "miss"  # a new revision never gets the old answer


async def test_sdk_sees_identical_answers_for_miss_and_hit(gateway) -> None:
    app = gateway()
    sdk = sdk_for(app)
    first = await sdk.chat.completions.with_raw_response.create(**chat_body())
    await settle(app)
    second = await sdk.chat.completions.with_raw_response.create(**chat_body())
    assert [first.headers["x-cache"], second.headers["x-cache"]] == ["miss", "hit"]
    assert_same_answer(second.parse().model_dump(), first.parse().model_dump())
    with pytest.raises(openai.NotFoundError):
        await sdk.chat.completions.create(**chat_body(model="missing"))
