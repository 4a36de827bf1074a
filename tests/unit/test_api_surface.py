"""The Responses API (state in the gateway's store), Anthropic's Messages API, rerank, score, tokenize and
detokenize through the gateway, with the official openai and anthropic SDKs against FakeEngines (no Ray,
no vLLM). The same routes on the real platform: tests/integration/test_api_surface.py."""

from __future__ import annotations

import anthropic
import httpx
import httpx2
import openai
import pytest

from serving.config import ServingConfig, load_config
from serving.engine.fake import FakeEngine
from serving.gateway.app import create_app
from serving.gateway.store import MemoryStore
from tests.support import Recording, no_serving_env  # noqa: F401 - autouse fixture

KEY, OTHER = "sk-test-one-0123456789abcdef", "sk-test-two-0123456789abcdef"


def make_config() -> ServingConfig:
    return load_config(data={
        "models": [{"name": "tiny", "source": "/models/tiny"},
                   {"name": "embedder", "source": "/models/embedder", "kind": "embed"}],
        "auth": {"enabled": True, "keys": [{"name": "one", "key": KEY}, {"name": "two", "key": OTHER}]},
        "cache": {"mode": "off"},
    })


@pytest.fixture
def engine() -> Recording:
    return Recording("tiny")


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def app(engine, store):
    return create_app(make_config(), {"tiny": engine, "embedder": FakeEngine("embedder")}, store=store)


def transport(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def openai_sdk(app, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key=key, max_retries=0, http_client=transport(app))


def anthropic_sdk(app, key: str = KEY) -> anthropic.AsyncAnthropic:
    # Anthropic's SDK speaks through httpx2 (its own fork of httpx), which has the same ASGI transport
    client = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test")
    return anthropic.AsyncAnthropic(base_url="http://test", api_key=key, max_retries=0, http_client=client)


# ------------------------------------------------------------------------------- Responses API


async def test_a_response_is_stored_retrieved_listed_and_deleted(app, engine):
    sdk = openai_sdk(app)
    response = await sdk.responses.create(model="tiny", input="Hello there", max_output_tokens=5)
    assert response.id.startswith("resp_") and response.status == "completed"
    assert response.output_text and len(response.output_text.split()) == 5
    assert response.store is True and response.previous_response_id is None
    assert response.usage is not None and response.usage.output_tokens == 5
    # the engine stored nothing itself and got the gateway's id, never a client's
    assert engine.bodies[-1]["store"] is False and engine.bodies[-1]["request_id"] == response.id
    again = await sdk.responses.retrieve(response.id)
    assert again.id == response.id and again.output_text == response.output_text
    items = await sdk.responses.input_items.list(response.id)
    assert [i.type for i in items.data] == ["message"]
    assert items.data[0].id.startswith("msg_") and items.data[0].content[0].text == "Hello there"
    deleted = await sdk.responses.delete(response.id)
    assert deleted is None  # the SDK returns nothing for a 200 delete
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.retrieve(response.id)


async def test_a_chain_of_turns_sends_the_whole_history_each_time(app, engine):
    sdk = openai_sdk(app)
    previous, inputs, ids = None, [], []
    for turn in range(5):
        response = await sdk.responses.create(model="tiny", input=f"turn {turn} question",
                                              previous_response_id=previous, max_output_tokens=3)
        assert response.previous_response_id == previous
        inputs.append(response.usage.input_tokens)
        seen = engine.bodies[-1]["input"]
        # every earlier question and answer, oldest first, then this turn's question
        assert len(seen) == 2 * turn + 1 and "previous_response_id" not in engine.bodies[-1]
        assert [item.get("role") for item in seen] == ["user", "assistant"] * turn + ["user"]
        previous = response.id
        ids.append(response.id)
    assert inputs == sorted(inputs) and len(set(inputs)) == 5  # the prompt grows with the history
    for response_id in ids:
        assert (await sdk.responses.retrieve(response_id)).id == response_id


async def test_another_key_cannot_see_or_continue_a_response(app):
    mine = await openai_sdk(app).responses.create(model="tiny", input="secret", max_output_tokens=2)
    theirs = openai_sdk(app, OTHER)
    with pytest.raises(openai.NotFoundError):
        await theirs.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        await theirs.responses.delete(mine.id)
    with pytest.raises(openai.BadRequestError) as refused:
        await theirs.responses.create(model="tiny", input="more", previous_response_id=mine.id)
    assert refused.value.code == "previous_response_not_found" and refused.value.param == "previous_response_id"
    assert (await openai_sdk(app).responses.retrieve(mine.id)).id == mine.id  # still there for its owner


async def test_store_false_keeps_nothing_and_a_deleted_turn_breaks_its_chain(app):
    sdk = openai_sdk(app)
    unstored = await sdk.responses.create(model="tiny", input="once", store=False, max_output_tokens=2)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.retrieve(unstored.id)
    first = await sdk.responses.create(model="tiny", input="one", max_output_tokens=2)
    second = await sdk.responses.create(model="tiny", input="two", previous_response_id=first.id, max_output_tokens=2)
    await sdk.responses.delete(first.id)
    with pytest.raises(openai.BadRequestError) as broken:
        await sdk.responses.create(model="tiny", input="three", previous_response_id=second.id)
    assert broken.value.code == "previous_response_not_found"


async def test_a_streamed_response_is_patched_stored_and_billed(app, store):
    sdk = openai_sdk(app)
    first = await sdk.responses.create(model="tiny", input="start", max_output_tokens=2)
    events = [e async for e in await sdk.responses.create(model="tiny", input="go on", stream=True,
                                                           previous_response_id=first.id, max_output_tokens=4)]
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 4
    final = events[-1].response
    assert final.store is True and final.previous_response_id == first.id
    assert events[0].response.previous_response_id == first.id  # every response object the client sees
    stored = await sdk.responses.retrieve(final.id)
    assert stored.output_text == final.output_text and stored.usage.input_tokens == final.usage.input_tokens
    usage = await store.usage_get(_subject(KEY))
    counted = next(iter(usage.values()))["tiny"]
    assert counted["completion_tokens"] == 2 + 4 and counted["requests"] == 2


async def test_what_the_platform_does_not_do_is_refused_clearly(app):
    sdk = openai_sdk(app)
    with pytest.raises(openai.BadRequestError) as background:
        await sdk.responses.create(model="tiny", input="later", background=True)
    assert background.value.param == "background"
    done = await sdk.responses.create(model="tiny", input="now", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError) as cancel:
        await sdk.responses.cancel(done.id)
    assert cancel.value.code == "not_cancellable"
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.cancel("resp_unknown")
    with pytest.raises(openai.BadRequestError) as wrong:
        await sdk.responses.create(model="embedder", input="x")
    assert wrong.value.code == "wrong_route"


async def test_input_items_page_in_both_orders(app):
    sdk = openai_sdk(app)
    parts = [{"role": "user", "content": f"part {i}"} for i in range(5)]
    response = await sdk.responses.create(model="tiny", input=parts, max_output_tokens=2)
    newest = await sdk.responses.input_items.list(response.id, limit=2)
    assert [i.content[0].text for i in newest.data] == ["part 4", "part 3"] and newest.has_more
    rest = await sdk.responses.input_items.list(response.id, limit=10, after=newest.last_id)
    assert [i.content[0].text for i in rest.data] == ["part 2", "part 1", "part 0"] and not rest.has_more
    oldest = await sdk.responses.input_items.list(response.id, order="asc", limit=1)
    assert oldest.data[0].content[0].text == "part 0"


# ------------------------------------------------------------------------------- Anthropic Messages


async def test_messages_with_the_anthropic_sdk_and_its_x_api_key(app, engine):
    sdk = anthropic_sdk(app)
    message = await sdk.messages.create(model="tiny", max_tokens=6, messages=[{"role": "user", "content": "Hi"}])
    assert message.type == "message" and message.role == "assistant" and message.stop_reason == "max_tokens"
    assert len(message.content[0].text.split()) == 6 and message.usage.output_tokens == 6
    assert "cache_salt" in engine.bodies[-1]  # the per-key prefix-cache salt reaches this route too
    async with sdk.messages.stream(model="tiny", max_tokens=3, messages=[{"role": "user", "content": "Hi"}]) as s:
        text = await s.get_final_text()
        final = await s.get_final_message()
    assert len(text.split()) == 3 and final.usage.output_tokens == 3
    counted = await sdk.messages.count_tokens(model="tiny", messages=[{"role": "user", "content": "one two"}])
    assert counted.input_tokens == 2


async def test_messages_errors_come_in_anthropics_envelope(app):
    with pytest.raises(anthropic.AuthenticationError) as unauthenticated:
        await anthropic_sdk(app, "sk-wrong-key-000000000000").messages.create(
            model="tiny", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    assert unauthenticated.value.body == {"type": "error", "error": {
        "type": "authentication_error", "message": unauthenticated.value.body["error"]["message"]}}
    with pytest.raises(anthropic.NotFoundError) as unknown:
        await anthropic_sdk(app).messages.create(model="nope", max_tokens=2,
                                                 messages=[{"role": "user", "content": "Hi"}])
    assert unknown.value.body["type"] == "error" and unknown.value.body["error"]["type"] == "not_found_error"
    async with transport(app) as http:
        bad = await http.post("/v1/messages", headers={"x-api-key": KEY},
                              json={"model": "tiny", "max_tokens": 2, "messages": "not a list"})
    assert bad.status_code == 400 and bad.json()["type"] == "error"
    assert bad.json()["error"]["type"] == "invalid_request_error"


# ------------------------------------------------------------------------------- rerank, score, tokenize


async def test_rerank_score_tokenize_and_detokenize(app):
    async with transport(app) as http:
        auth = {"authorization": f"Bearer {KEY}"}
        rerank = await http.post("/v1/rerank", headers=auth, json={
            "model": "embedder", "query": "red cat", "documents": ["blue sky", "a red cat", "cat"]})
        assert rerank.status_code == 200
        assert [r["index"] for r in rerank.json()["results"]] == [1, 2, 0]
        score = await http.post("/v1/score", headers=auth, json={"model": "embedder", "text_1": "red cat",
                                                                  "text_2": ["red cat", "dog"]})
        assert [d["score"] for d in score.json()["data"]] == [1.0, 0.0]
        tokens = await http.post("/tokenize", headers=auth, json={"model": "tiny", "prompt": "alpha beta"})
        assert tokens.json()["tokens"] == [0, 1] and tokens.json()["count"] == 2
        text = await http.post("/detokenize", headers=auth, json={"model": "tiny", "tokens": [0, 1]})
        assert text.json()["prompt"] == "alpha beta"
        for path, model in (("/v1/rerank", "tiny"), ("/v1/responses", "embedder"), ("/v1/messages", "embedder")):
            wrong = await http.post(path, headers=auth, json={"model": model, "query": "x", "documents": ["y"]})
            assert wrong.status_code == 400, path
            body = wrong.json()
            assert (body["error"].get("code") == "wrong_route") or body["type"] == "error", body
        unauthenticated = await http.post("/tokenize", json={"model": "tiny", "prompt": "x"})
        assert unauthenticated.status_code == 401


async def test_the_openapi_document_lists_every_route(app):
    async with transport(app) as http:
        paths = (await http.get("/openapi.json")).json()["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
                 "/v1/responses/{response_id}", "/v1/responses/{response_id}/cancel",
                 "/v1/responses/{response_id}/input_items", "/v1/messages", "/v1/messages/count_tokens",
                 "/v1/rerank", "/v1/score", "/tokenize", "/detokenize"):
        assert path in paths, path
    assert "delete" in paths["/v1/responses/{response_id}"] and "get" in paths["/v1/responses/{response_id}"]


def _subject(key: str) -> str:
    from serving.gateway.auth import digest

    return digest(key)


async def test_fields_of_each_reference_are_accepted_dropped_or_refused_by_name(app, engine):
    sdk = openai_sdk(app)
    await sdk.responses.create(model="tiny", input="hi", max_output_tokens=2, safety_identifier="user-7",
                               prompt_cache_retention="24h", metadata={"project": "x"})
    sent = engine.bodies[-1]
    assert "safety_identifier" not in sent and "prompt_cache_retention" not in sent
    assert sent["metadata"] == {"project": "x"}  # vLLM knows it: passed on
    with pytest.raises(openai.BadRequestError) as conversation:
        await sdk.responses.create(model="tiny", input="hi", conversation="conv_123")
    assert conversation.value.code == "unsupported_parameter" and conversation.value.param == "conversation"
    with pytest.raises(openai.BadRequestError) as typo:
        await sdk.responses.create(model="tiny", input="hi", extra_body={"max_output_tokenz": 3})
    assert typo.value.code == "unknown_parameter" and typo.value.param == "max_output_tokenz"
    await anthropic_sdk(app).messages.create(
        model="tiny", max_tokens=2, service_tier="auto",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hi",
                                                 "cache_control": {"type": "ephemeral"}}]}])
    assert "service_tier" not in engine.bodies[-1]


async def test_each_model_card_names_the_routes_that_serve_it(app):
    cards = {m.id: m async for m in openai_sdk(app).models.list()}
    assert cards["tiny"].model_extra["routes"] == [
        "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens",
        "/tokenize", "/detokenize"]
    assert cards["embedder"].model_extra["routes"] == [
        "/v1/embeddings", "/v1/rerank", "/v1/score", "/tokenize", "/detokenize"]
