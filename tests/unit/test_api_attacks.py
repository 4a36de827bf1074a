"""Attacks on the Responses API state, Anthropic's Messages API, the pooling/tokenizer routes and the
accounting of their usage, through the in-process gateway with FakeEngines (no Ray, no vLLM).

Each test says what SHOULD happen (docs/api.md, OpenAI's and Anthropic's API semantics, and the rule that
nothing a client sends decides internal identity: ids, cache keys, routing, store keys)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from serving.config import ServingConfig, load_config
from serving.engine.fake import FakeEngine
from serving.engine.protocol import Reply
from serving.engine.vllm import _receiver
from serving.gateway.app import create_app
from serving.gateway.auth import digest
from serving.gateway.store import MemoryStore
from tests.support import Recording, no_serving_env, wait_for  # noqa: F401 - autouse fixture

KEY, OTHER = "sk-test-one-0123456789abcdef", "sk-test-two-0123456789abcdef"
SCOPED = "sk-test-scoped-0123456789abcdef"  # may use "tiny" only
LIMITED = "sk-test-limited-0123456789abcdef"  # rpm 2
TPM = "sk-test-tpm-0123456789abcdef"  # tpm 400
SINGLE = "sk-test-single-0123456789abcdef"  # max_concurrent 1


def make_config(**extra: Any) -> ServingConfig:
    return load_config(data={
        "models": [{"name": "tiny", "source": "/models/tiny"},
                   {"name": "other", "source": "/models/other"},
                   {"name": "embedder", "source": "/models/embedder", "kind": "embed"},
                   {"name": "embedder2", "source": "/models/embedder2", "kind": "embed"}],
        "auth": {"enabled": True, "keys": [
            {"name": "one", "key": KEY}, {"name": "two", "key": OTHER},
            {"name": "scoped", "key": SCOPED, "models": ["tiny", "embedder"]},
            {"name": "limited", "key": LIMITED, "rpm": 2},
            {"name": "tpm", "key": TPM, "tpm": 400},
            {"name": "single", "key": SINGLE, "max_concurrent": 1}]},
        "cache": {"mode": "off"},
        **extra,
    })


class FailingMessages(FakeEngine):
    """Streams a Messages / Responses answer, then raises after `after` events (an engine that dies)."""

    def __init__(self, name: str, after: int = 4):
        super().__init__(name)
        self.after = after

    async def generate(self, route, body, request_id, timeout_s=None, **_routing):
        sent = 0
        async for item in super().generate(route, body, request_id, timeout_s):
            if isinstance(item, str):
                sent += 1
                if sent > self.after:
                    raise RuntimeError("CUDA error: device-side assert at /opt/secret/path.py:42")
            yield item


@pytest.fixture
def engine() -> Recording:
    return Recording("tiny")


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def app(engine, store):
    return create_app(make_config(), {"tiny": engine, "other": FakeEngine("other"), "embedder": FakeEngine("embedder"),
                                      "embedder2": FakeEngine("embedder2")}, store=store)


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def bearer(key: str = KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def assert_openai_error(response: httpx.Response, status: int, *, code: Any = ..., param: Any = ...) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    if code is not ...:
        assert error["code"] == code, error
    if param is not ...:
        assert error["param"] == param, error
    return error


def assert_anthropic_error(response: httpx.Response, status: int, kind: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert body.get("type") == "error" and set(body) == {"type", "error"}, body
    assert set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == kind, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


async def create(http: httpx.AsyncClient, key: str = KEY, **body: Any) -> httpx.Response:
    return await http.post("/v1/responses", headers=bearer(key), json={"model": "tiny", "max_output_tokens": 2,
                                                                       **body})


def named_events(text: str) -> list[tuple[str, dict]]:
    out = []
    for event in text.split("\n\n"):
        if not event:
            continue
        kind, _, data = event.partition("\ndata: ")
        out.append((kind.removeprefix("event: "), json.loads(data)))
    return out


async def usage_of(store: MemoryStore, key: str, model: str = "tiny") -> dict[str, int]:
    days = await store.usage_get(digest(key))
    total: dict[str, int] = {}
    for models in days.values():
        for name, value in models.get(model, {}).items():
            total[name] = total.get(name, 0) + value
    return total


async def post_and_hang_up(app, path: str, body: dict, *, after_chunks: int, key: str = KEY) -> list[dict]:
    """POST `body` to `path` as a raw ASGI client that goes away after `after_chunks` body chunks."""
    raw = json.dumps(body).encode()
    headers = [(b"host", b"test"), (b"content-type", b"application/json"),
               (b"content-length", str(len(raw)).encode()), (b"authorization", f"Bearer {key}".encode())]
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000), "server": ("test", 80),
        "headers": headers,
    }
    gone = asyncio.Event()
    sent: list[dict] = []
    receive = _receiver(raw, gone)

    async def send(message: dict) -> None:
        if gone.is_set():
            raise OSError("client disconnected")
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            if sum(1 for m in sent if m["type"] == "http.response.body" and m.get("body")) >= after_chunks:
                gone.set()

    try:
        await asyncio.wait_for(app(scope, receive, send), 5)
    except OSError:
        pass
    except Exception as exc:  # noqa: BLE001
        assert type(exc).__name__ == "ClientDisconnect", exc
    return sent


# =============================================================================== Responses: identity and scope


async def test_previous_response_id_of_another_key_is_not_found_and_leaks_nothing(app):
    async with client(app) as http:
        mine = (await create(http, input="my secret plan")).json()
        theirs = await create(http, OTHER, input="tell me", previous_response_id=mine["id"])
        assert_openai_error(theirs, 400, code="previous_response_not_found", param="previous_response_id")
        # the same answer as for an id that never existed: the other key cannot tell that it exists
        never = await create(http, OTHER, input="tell me", previous_response_id="resp_" + "0" * 32)
        assert theirs.json()["error"]["message"].replace(mine["id"], "X") == \
            never.json()["error"]["message"].replace("resp_" + "0" * 32, "X")
        for method, path in (("GET", f"/v1/responses/{mine['id']}"), ("DELETE", f"/v1/responses/{mine['id']}"),
                             ("GET", f"/v1/responses/{mine['id']}/input_items"),
                             ("POST", f"/v1/responses/{mine['id']}/cancel")):
            answer = await http.request(method, path, headers=bearer(OTHER))
            assert_openai_error(answer, 404, code="not_found")
        assert (await http.get(f"/v1/responses/{mine['id']}", headers=bearer())).status_code == 200


@pytest.mark.parametrize("crafted", [
    "../{id}", "*", "{id}*", "resp_*", "{owner}:{id}", "responses:{owner}:{id}", ":{id}", "{id}:", "{id}\x00",
    "{id} ", " {id}", "{ID}", "a" * 10_000,
])
async def test_crafted_previous_response_ids_never_reach_another_owners_record(app, crafted):
    async with client(app) as http:
        mine = (await create(http, input="victim data")).json()
        crafted = crafted.format(id=mine["id"], ID=mine["id"].upper(), owner=digest(KEY))
        attempt = await create(http, OTHER, input="x", previous_response_id=crafted)
        assert_openai_error(attempt, 400, code="previous_response_not_found", param="previous_response_id")
        # and the owner cannot reach its own record under a mangled id either (exact ids only)
        if crafted != mine["id"]:
            own = await create(http, KEY, input="x", previous_response_id=crafted)
            assert_openai_error(own, 400, code="previous_response_not_found")


@pytest.mark.parametrize("value", [123, 1.5, True, ["resp_x"], {"id": "resp_x"}, ""])
async def test_previous_response_id_of_the_wrong_type_is_400(app, value):
    async with client(app) as http:
        answer = await create(http, input="hi", previous_response_id=value)
    assert_openai_error(answer, 400, param="previous_response_id")


async def test_previous_response_id_null_is_no_previous_response(app):
    async with client(app) as http:
        answer = await create(http, input="hi", previous_response_id=None)
    assert answer.status_code == 200 and answer.json()["previous_response_id"] is None


@pytest.mark.parametrize("path", [
    "/v1/responses/..%2F..%2Fkeys", "/v1/responses/%2A", "/v1/responses/resp_x%3Aother",
    "/v1/responses/" + "r" * 8000, "/v1/responses/%00", "/v1/responses/%20",
])
async def test_odd_ids_on_get_delete_and_input_items_are_404_in_openais_envelope(app, path):
    async with client(app) as http:
        await create(http, input="something")
        for method, suffix in (("GET", ""), ("DELETE", ""), ("GET", "/input_items"), ("POST", "/cancel")):
            answer = await http.request(method, path + suffix, headers=bearer())
            assert answer.status_code == 404, (method, path, answer.text)
            assert_openai_error(answer, 404)


async def test_a_client_sent_request_id_or_x_request_id_never_decides_the_response_id(app, engine):
    async with client(app) as http:
        first = await http.post("/v1/responses", headers={**bearer(), "x-request-id": "fixed-id-1"},
                                json={"model": "tiny", "input": "hi", "max_output_tokens": 2,
                                      "request_id": "resp_chosen"})
        second = await http.post("/v1/responses", headers={**bearer(OTHER), "x-request-id": "fixed-id-1"},
                                 json={"model": "tiny", "input": "hi", "max_output_tokens": 2,
                                       "request_id": "resp_chosen"})
    assert first.status_code == 200 and second.status_code == 200, (first.text, second.text)
    ids = {first.json()["id"], second.json()["id"]}
    assert len(ids) == 2 and "resp_chosen" not in ids and not any("fixed" in i for i in ids)
    assert all(b["request_id"] != "resp_chosen" for b in engine.bodies)


async def test_a_client_sent_id_field_is_refused_or_ignored_never_used(app):
    async with client(app) as http:
        answer = await create(http, input="hi", id="resp_mine")
    if answer.status_code == 200:
        assert answer.json()["id"] != "resp_mine"
    else:
        assert_openai_error(answer, 400, param="id")


@pytest.mark.parametrize("value", ["yes", "false", 0, 1, [], {}])
async def test_store_that_is_not_a_boolean_is_400(app, value):
    # OpenAI: `store` is boolean or null. "false" must not silently store a response the client asked not to keep
    async with client(app) as http:
        answer = await create(http, input="hi", store=value)
    assert_openai_error(answer, 400, param="store")


@pytest.mark.parametrize("value", ["true", 1, "yes"])
async def test_background_that_is_not_a_boolean_is_refused_not_passed_to_the_engine(app, engine, value):
    # vLLM's pydantic models coerce "true"/1 to True: the engine would run a background response the gateway
    # never refused (and cannot cancel or store)
    async with client(app) as http:
        answer = await create(http, input="later", background=value)
    assert_openai_error(answer, 400, param="background")
    assert not [b for b in engine.bodies if b["route"] == "responses"]


async def test_background_false_is_accepted(app):
    async with client(app) as http:
        answer = await create(http, input="now", background=False)
    assert answer.status_code == 200, answer.text


# =============================================================================== Responses: chains


async def test_a_chain_of_fifty_turns_keeps_working_and_each_turn_stays_retrievable(app, engine):
    async with client(app) as http:
        previous, ids = None, []
        for turn in range(50):
            answer = await create(http, input=f"q{turn}", previous_response_id=previous, max_output_tokens=1)
            assert answer.status_code == 200, (turn, answer.text)
            previous = answer.json()["id"]
            ids.append(previous)
        assert len(engine.bodies[-1]["input"]) == 2 * 49 + 1
        assert len(set(ids)) == 50
        for response_id in (ids[0], ids[25], ids[-1]):
            assert (await http.get(f"/v1/responses/{response_id}", headers=bearer())).status_code == 200


async def test_a_streamed_turn_then_a_non_streamed_continuation(app, engine):
    async with client(app) as http:
        streamed = await create(http, input="start here", stream=True, max_output_tokens=3)
        assert streamed.status_code == 200
        events = named_events(streamed.text)
        final = events[-1][1]["response"]
        assert events[-1][0] == "response.completed" and final["id"].startswith("resp_")
        assert {e[1]["response"]["id"] for e in events if "response" in e[1]} == {final["id"]}
        nxt = await create(http, input="and then", previous_response_id=final["id"])
        assert nxt.status_code == 200, nxt.text
        assert nxt.json()["previous_response_id"] == final["id"]
        sent = engine.bodies[-1]["input"]
        assert [i.get("role") for i in sent] == ["user", "assistant", "user"]
        assert sent[1]["content"][0]["text"] == final["output"][0]["content"][0]["text"]
        again = await create(http, input="and more", stream=True, previous_response_id=nxt.json()["id"])
        assert again.status_code == 200 and named_events(again.text)[-1][0] == "response.completed"


async def test_deleting_is_idempotently_404_the_second_time_and_continuations_fail(app):
    async with client(app) as http:
        first = (await create(http, input="one")).json()
        deleted = await http.delete(f"/v1/responses/{first['id']}", headers=bearer())
        assert deleted.status_code == 200 and deleted.json() == {"id": first["id"], "object": "response",
                                                                "deleted": True}
        assert_openai_error(await http.delete(f"/v1/responses/{first['id']}", headers=bearer()), 404)
        assert_openai_error(await create(http, input="two", previous_response_id=first["id"]), 400,
                            code="previous_response_not_found")


class SlowRecords(MemoryStore):
    """A store whose writes of records take a moment (as a Redis round trip over a network does)."""

    async def record_put(self, *args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(0.1)
        await super().record_put(*args, **kwargs)


async def test_a_stored_response_can_be_read_the_moment_its_create_call_returned(engine):
    # OpenAI: once POST /v1/responses returned, GET and previous_response_id find the response. The save is
    # spawned in the background, so a fast client (or one on another replica) gets 404 / not_found.
    app = create_app(make_config(), {"tiny": engine, "other": FakeEngine("other"), "embedder": FakeEngine("e"),
                                     "embedder2": FakeEngine("e2")}, store=SlowRecords())
    async with client(app) as http:
        first = await create(http, input="hello")
        assert first.status_code == 200
        got = await http.get(f"/v1/responses/{first.json()['id']}", headers=bearer())
        assert got.status_code == 200, got.text


async def test_a_streamed_stored_response_can_be_continued_the_moment_its_stream_ended(engine):
    app = create_app(make_config(), {"tiny": engine, "other": FakeEngine("other"), "embedder": FakeEngine("e"),
                                     "embedder2": FakeEngine("e2")}, store=SlowRecords())
    async with client(app) as http:
        streamed = await create(http, input="hello", stream=True)
        final = named_events(streamed.text)[-1][1]["response"]
        nxt = await create(http, input="more", previous_response_id=final["id"])
        assert nxt.status_code == 200, nxt.text


# =============================================================================== Responses: input_items


@pytest.mark.parametrize("query", [
    "limit=0", "limit=101", "limit=x", "limit=-1", "limit=1.5", "order=sideways", "order=ASC", "after=msg_nope",
    "after=", "limit=10&limit=x",
])
async def test_input_items_bad_paging_is_400_in_openais_envelope(app, query):
    async with client(app) as http:
        response = (await create(http, input=[{"role": "user", "content": f"p{i}"} for i in range(3)])).json()
        answer = await http.get(f"/v1/responses/{response['id']}/input_items?{query}", headers=bearer())
    error = assert_openai_error(answer, 400)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("query,param", [("limit=0", "limit"), ("order=sideways", "order")])
async def test_input_items_bad_paging_names_the_parameter_as_openai_does(app, query, param):
    async with client(app) as http:
        response = (await create(http, input="hi")).json()
        answer = await http.get(f"/v1/responses/{response['id']}/input_items?{query}", headers=bearer())
    assert_openai_error(answer, 400, param=param)  # OpenAI's SDKs show `param`: "limit", not "query.limit"


async def test_input_items_paging_terminates_when_the_client_gave_items_the_same_id(app):
    # input item ids may come from the client; SDK auto-pagination follows last_id -> after. A cursor that
    # never advances makes `async for item in client.responses.input_items.list(...)` loop forever.
    async with client(app) as http:
        parts = [{"type": "message", "role": "user", "content": f"p{i}", "id": "msg_dup"} for i in range(3)]
        response = await create(http, input=parts)
        assert response.status_code in (200, 400), response.text
        if response.status_code == 400:  # refusing duplicate ids is fine too
            return
        seen, after = [], None
        for _ in range(10):
            query = "limit=1" + (f"&after={after}" if after else "")
            page = (await http.get(f"/v1/responses/{response.json()['id']}/input_items?{query}",
                                   headers=bearer())).json()
            seen += [item["content"][0]["text"] for item in page["data"]]
            if not page["has_more"]:
                break
            after = page["last_id"]
    assert sorted(seen) == ["p0", "p1", "p2"], seen


async def test_input_items_paging_walks_every_item_once(app):
    async with client(app) as http:
        response = (await create(http, input=[{"role": "user", "content": f"p{i}"} for i in range(7)])).json()
        seen, after = [], None
        while True:
            query = "limit=3" + (f"&after={after}" if after else "")
            page = (await http.get(f"/v1/responses/{response['id']}/input_items?{query}", headers=bearer())).json()
            seen += [item["content"][0]["text"] for item in page["data"]]
            if not page["has_more"]:
                break
            after = page["last_id"]
    assert seen == [f"p{i}" for i in reversed(range(7))]


async def test_input_items_without_auth_is_401_not_a_validation_error(app):
    async with client(app) as http:
        answer = await http.get("/v1/responses/resp_x/input_items?limit=0")
    assert_openai_error(answer, 401)


# =============================================================================== Responses: cut streams


async def test_a_cut_responses_stream_stores_nothing_and_bills_what_it_used(app, store, engine):
    sent = await post_and_hang_up(app, "/v1/responses", {
        "model": "tiny", "input": " ".join(["word"] * 200), "max_output_tokens": 50, "stream": True}, after_chunks=3)
    text = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()
    created = [d for k, d in named_events(text) if k == "response.created"]
    assert created, text
    response_id = created[0]["response"]["id"]
    await asyncio.sleep(0.05)
    async with client(app) as http:
        assert_openai_error(await http.get(f"/v1/responses/{response_id}", headers=bearer()), 404)
    assert await wait_for(lambda: bool(store._usage))
    usage = await usage_of(store, KEY)
    assert usage.get("completion_tokens", 0) >= 1
    # the prompt (200 words of input) was read by the engine: a client that hangs up early must still pay for it
    assert usage.get("prompt_tokens", 0) >= 100, usage


async def test_a_cut_messages_stream_bills_its_input_and_output_tokens(app, store):
    await post_and_hang_up(app, "/v1/messages", {
        "model": "tiny", "max_tokens": 50, "stream": True,
        "messages": [{"role": "user", "content": " ".join(["word"] * 200)}]}, after_chunks=4)
    assert await wait_for(lambda: bool(store._usage))
    usage = await usage_of(store, KEY)
    assert usage.get("prompt_tokens") == 200 and usage.get("completion_tokens", 0) >= 1, usage


# =============================================================================== Messages: Anthropic's envelope


async def test_every_messages_error_is_in_anthropics_envelope(app):
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    async with client(app) as http:
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            assert_anthropic_error(await http.post(path, json=body), 401, "authentication_error")
            assert_anthropic_error(await http.post(path, headers={"x-api-key": "sk-wrong-0000000000000000"},
                                                   json=body), 401, "authentication_error")
            auth = {"x-api-key": KEY}
            assert_anthropic_error(await http.post(path, headers=auth, json={**body, "model": "nope"}), 404,
                                   "not_found_error")
            assert_anthropic_error(await http.post(path, headers={**auth, "content-type": "application/json"},
                                                   content=b"{not json"), 400, "invalid_request_error")
            assert_anthropic_error(await http.post(path, headers={**auth, "content-type": "text/plain"},
                                                   content=json.dumps(body)), 415, "invalid_request_error")
            assert_anthropic_error(await http.post(path, headers=auth, json={**body, "stream": "yes"}), 400,
                                   "invalid_request_error")
            assert_anthropic_error(await http.post(path, headers=auth, json={**body, "model": "embedder"}), 400,
                                   "invalid_request_error")
            assert_anthropic_error(await http.post(path, headers=auth, json={**body, "temprature": 1}), 400,
                                   "invalid_request_error")
            assert_anthropic_error(await http.get(path, headers=auth), 405, "invalid_request_error")
            big = {**body, "messages": [{"role": "user", "content": "x" * (9 << 20)}]}
            assert_anthropic_error(await http.post(path, headers=auth, json=big), 413, "request_too_large")
        # a key scoped to other models: Anthropic's not_found_error, never a hint that the model exists
        scoped = await http.post("/v1/messages", headers={"x-api-key": SCOPED}, json={**body, "model": "other"})
        assert_anthropic_error(scoped, 404, "not_found_error")
        # and OpenAI's envelope everywhere else
        assert_openai_error(await http.post("/v1/chat/completions", json=body), 401)
        assert_openai_error(await http.post("/v1/messagesx", headers=auth, json=body), 404)


async def test_rate_limited_messages_are_429_in_anthropics_envelope_with_retry_after(app):
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    async with client(app) as http:
        for _ in range(2):
            assert (await http.post("/v1/messages", headers={"x-api-key": LIMITED}, json=body)).status_code == 200
        refused = await http.post("/v1/messages", headers={"x-api-key": LIMITED}, json=body)
        assert_anthropic_error(refused, 429, "rate_limit_error")
        assert int(refused.headers["retry-after"]) >= 1
        counted = await http.post("/v1/messages/count_tokens", headers={"x-api-key": LIMITED},
                                  json={"model": "tiny", "messages": body["messages"]})
        assert_anthropic_error(counted, 429, "rate_limit_error")
        responses = await create(http, LIMITED, input="hi")
        assert_openai_error(responses, 429, code="rate_limit_exceeded")


async def test_a_messages_stream_that_fails_mid_way_ends_with_an_anthropic_error_event():
    app = create_app(make_config(), {"tiny": FailingMessages("tiny", after=4), "other": FakeEngine("other"),
                                     "embedder": FakeEngine("e"), "embedder2": FakeEngine("e2")}, store=MemoryStore())
    async with client(app) as http:
        answer = await http.post("/v1/messages", headers={"x-api-key": KEY}, json={
            "model": "tiny", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 200
    events = named_events(answer.text)
    kind, data = events[-1]
    assert kind == "error", events
    assert data["type"] == "error" and set(data["error"]) == {"type", "message"}, data
    assert data["error"]["type"] in ("overloaded_error", "api_error")
    assert "secret" not in answer.text and "CUDA" not in answer.text
    assert "message_stop" not in [k for k, _ in events]


async def test_a_responses_stream_that_fails_mid_way_ends_with_an_openai_error_event_and_is_not_stored():
    store = MemoryStore()
    app = create_app(make_config(), {"tiny": FailingMessages("tiny", after=3), "other": FakeEngine("other"),
                                     "embedder": FakeEngine("e"), "embedder2": FakeEngine("e2")}, store=store)
    async with client(app) as http:
        answer = await create(http, input="hi", stream=True, max_output_tokens=10)
        assert answer.status_code == 200
        events = named_events(answer.text)
        kind, data = events[-1]
        assert kind == "error" and data["type"] == "error" and data["code"] == "engine_error", events
        assert "CUDA" not in answer.text
        response_id = events[0][1]["response"]["id"]
        assert (await http.get(f"/v1/responses/{response_id}", headers=bearer())).status_code == 404


async def test_when_x_api_key_and_authorization_disagree_authorization_wins(app, store):
    # documented behaviour: Authorization (OpenAI's SDKs) is read first; x-api-key only without it
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    async with client(app) as http:
        both = await http.post("/v1/messages", headers={"x-api-key": OTHER, **bearer(KEY)}, json=body)
        assert both.status_code == 200
        wrong_bearer = await http.post("/v1/messages", headers={"x-api-key": KEY,
                                                                "authorization": "Bearer sk-wrong-00000000000000"},
                                       json=body)
        assert_anthropic_error(wrong_bearer, 401, "authentication_error")
        basic = await http.post("/v1/messages", headers={"x-api-key": KEY, "authorization": "Basic dXNlcjpwYXNz"},
                                json=body)
        assert_anthropic_error(basic, 401, "authentication_error")
    await asyncio.sleep(0.05)
    assert (await usage_of(store, KEY)).get("requests") == 1
    assert not await usage_of(store, OTHER)


# =============================================================================== rerank, score, tokenize


@pytest.mark.parametrize("path,model,body", [
    ("/v1/rerank", "tiny", {"query": "a", "documents": ["b"]}),
    ("/v1/score", "tiny", {"text_1": "a", "text_2": ["b"]}),
    ("/v1/embeddings", "tiny", {"input": "a"}),
    ("/v1/responses", "embedder", {"input": "a"}),
    ("/v1/chat/completions", "embedder", {"messages": [{"role": "user", "content": "a"}]}),
])
async def test_the_wrong_kind_of_model_is_wrong_route(app, path, model, body):
    async with client(app) as http:
        answer = await http.post(path, headers=bearer(), json={"model": model, **body})
    assert_openai_error(answer, 400, code="wrong_route", param="model")


async def test_messages_and_count_tokens_wrong_route_in_anthropics_envelope(app):
    async with client(app) as http:
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            answer = await http.post(path, headers={"x-api-key": KEY}, json={
                "model": "embedder", "max_tokens": 2, "messages": [{"role": "user", "content": "a"}]})
            assert_anthropic_error(answer, 400, "invalid_request_error")


@pytest.mark.parametrize("path,model,body", [
    ("/v1/rerank", "embedder2", {"query": "a", "documents": ["b"]}),
    ("/v1/score", "embedder2", {"text_1": "a", "text_2": ["b"]}),
    ("/tokenize", "other", {"prompt": "alpha"}),
    ("/detokenize", "other", {"tokens": [1]}),
    ("/v1/responses", "other", {"input": "a"}),
])
async def test_scoped_keys_cannot_reach_other_models_on_any_route(app, path, model, body):
    async with client(app) as http:
        answer = await http.post(path, headers=bearer(SCOPED), json={"model": model, **body})
        assert_openai_error(answer, 404, code="model_not_found")
        unauthenticated = await http.post(path, json={"model": model, **body})
        assert_openai_error(unauthenticated, 401)


# =============================================================================== usage and limits


async def test_tokenize_and_count_tokens_bill_no_tokens(app, store):
    async with client(app) as http:
        for _ in range(3):
            assert (await http.post("/tokenize", headers=bearer(TPM),
                                    json={"model": "tiny", "prompt": "alpha beta gamma"})).status_code == 200
            assert (await http.post("/detokenize", headers=bearer(TPM),
                                    json={"model": "tiny", "tokens": [1, 2, 3]})).status_code == 200
            assert (await http.post("/v1/messages/count_tokens", headers={"x-api-key": TPM}, json={
                "model": "tiny", "messages": [{"role": "user", "content": "one two three"}]})).status_code == 200
    await asyncio.sleep(0.05)
    usage = await usage_of(store, TPM)
    assert usage.get("prompt_tokens", 0) == 0 and usage.get("completion_tokens", 0) == 0, usage
    tokens = store._buckets.get(f"tok:{digest(TPM)}", {})
    assert sum(tokens.values()) == 0, tokens  # nothing left charged to the key's TPM


async def test_a_key_at_its_tpm_can_still_count_tokens(app):
    # counting or tokenizing costs no model tokens: a key whose TPM is used up may still ask (Anthropic rate
    # limits count_tokens separately from Messages)
    async with client(app) as http:
        used = await create(http, TPM, input=" ".join(["w"] * 20), max_output_tokens=330)
        assert used.status_code == 200, used.text
        assert used.json()["usage"]["total_tokens"] == 350
        blocked = await create(http, TPM, input="more", max_output_tokens=300)
        assert_openai_error(blocked, 429)
        text = " ".join(["one"] * 60)  # ~300 bytes of body: ~75 tokens by the reservation's estimate
        counted = await http.post("/v1/messages/count_tokens", headers={"x-api-key": TPM}, json={
            "model": "tiny", "messages": [{"role": "user", "content": text}]})
        assert counted.status_code == 200, counted.text
        assert counted.json() == {"input_tokens": 60}
        tokenized = await http.post("/tokenize", headers=bearer(TPM), json={"model": "tiny", "prompt": text})
        assert tokenized.status_code == 200, tokenized.text


async def test_responses_and_messages_count_against_tpm_and_rpm(app, store):
    async with client(app) as http:
        for _ in range(2):
            assert (await create(http, LIMITED, input="hi")).status_code == 200
        assert_openai_error(await create(http, LIMITED, input="hi"), 429, code="rate_limit_exceeded")
        too_big = await create(http, TPM, input="hi", max_output_tokens=1000)
        assert_openai_error(too_big, 429, code="request_too_large")
        message = await http.post("/v1/messages", headers={"x-api-key": TPM}, json={
            "model": "tiny", "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]})
        assert_anthropic_error(message, 429, "rate_limit_error")
    await asyncio.sleep(0.05)
    assert (await usage_of(store, LIMITED)).get("completion_tokens") == 4


async def test_responses_history_counts_as_prompt_tokens(app, store):
    async with client(app) as http:
        first = (await create(http, input=" ".join(["a"] * 20), max_output_tokens=3)).json()
        second = (await create(http, input="b", previous_response_id=first["id"], max_output_tokens=3)).json()
    assert second["usage"]["input_tokens"] == 20 + 3 + 1
    await asyncio.sleep(0.05)
    usage = await usage_of(store, KEY)
    assert usage["prompt_tokens"] == 20 + 24 and usage["completion_tokens"] == 6


class Answering(FakeEngine):
    """Answers every request with the given items (a Reply, then SSE chunks for a stream)."""

    def __init__(self, name: str, items: list):
        super().__init__(name)
        self.items = items

    async def generate(self, route, body, request_id, timeout_s=None, **_routing):
        for item in self.items:
            yield item


def one_engine_app(engine) -> Any:
    return create_app(make_config(), {"tiny": engine, "other": FakeEngine("other"), "embedder": FakeEngine("e"),
                                      "embedder2": FakeEngine("e2")}, store=MemoryStore())


MESSAGE = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


async def test_engine_errors_on_messages_come_in_anthropics_envelope_5xx_masked():
    internal = {"error": {"message": "Traceback: /opt/secret/engine.py", "type": "InternalServerError",
                          "param": None, "code": 500}}
    app = one_engine_app(Answering("tiny", [Reply(500, json.dumps(internal).encode())]))
    async with client(app) as http:
        answer = await http.post("/v1/messages", headers={"x-api-key": KEY}, json=MESSAGE)
    error = assert_anthropic_error(answer, 500, "api_error")
    assert "secret" not in error["message"]
    bad = {"error": {"message": "max_tokens too large", "type": "BadRequestError", "param": "max_tokens", "code": 400}}
    app = one_engine_app(Answering("tiny", [Reply(400, json.dumps(bad).encode())]))
    async with client(app) as http:
        answer = await http.post("/v1/messages", headers={"x-api-key": KEY}, json=MESSAGE)
    assert assert_anthropic_error(answer, 400, "invalid_request_error")["message"] == "max_tokens too large"


async def test_an_engine_error_event_inside_a_messages_stream_is_masked_and_in_anthropics_types():
    # vLLM's Messages stream converter reports an exception as
    # `event: error` {"type": "error", "error": {"type": "internal_error", "message": str(exc)}}:
    # its text must not reach the client (5xx are masked, docs/api.md), and `internal_error` is no Anthropic type
    start = {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                                  "model": "tiny", "content": [], "stop_reason": None,
                                                  "usage": {"input_tokens": 1, "output_tokens": 0}}}
    failure = {"type": "error", "error": {"type": "internal_error", "message": "CUDA OOM at /opt/secret/x.py:9"}}
    app = one_engine_app(Answering("tiny", [
        Reply(200, None), f"event: message_start\ndata: {json.dumps(start)}\n\n",
        f"event: error\ndata: {json.dumps(failure)}\n\n"]))
    async with client(app) as http:
        answer = await http.post("/v1/messages", headers={"x-api-key": KEY}, json={**MESSAGE, "stream": True})
    kind, data = named_events(answer.text)[-1]
    assert kind == "error"
    assert "secret" not in answer.text and "CUDA" not in answer.text, answer.text
    assert data["error"]["type"] in ("api_error", "overloaded_error"), data


async def test_a_cut_messages_stream_gives_its_concurrency_slot_back(app):
    await post_and_hang_up(app, "/v1/messages", {**MESSAGE, "max_tokens": 40, "stream": True}, after_chunks=3,
                           key=SINGLE)
    await asyncio.sleep(0.05)
    async with client(app) as http:
        again = await http.post("/v1/messages", headers={"x-api-key": SINGLE}, json={**MESSAGE, "stream": True})
        assert again.status_code == 200, again.text


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/responses", {"max_output_tokens": 2, "input": "hi"}),
    ("/v1/messages", {"max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}),
])
async def test_strictly_sequential_requests_of_a_key_with_max_concurrent_1_are_never_refused(app, path, body):
    # one request in flight at a time, each sent after the previous answer arrived: never over the limit.
    # The lease is released by a task spawned after the answer, so the next request can find it still held.
    async with client(app) as http:
        codes = [(await http.post(path, headers=bearer(SINGLE), json={"model": "tiny", **body})).status_code
                 for _ in range(4)]
    assert codes == [200] * 4, codes


async def test_x_api_key_works_on_every_route(app):
    async with client(app) as http:
        auth = {"x-api-key": KEY}
        made = await http.post("/v1/responses", headers=auth, json={"model": "tiny", "input": "hi",
                                                                    "max_output_tokens": 2})
        assert made.status_code == 200
        assert (await http.get(f"/v1/responses/{made.json()['id']}", headers=auth)).status_code == 200
        assert (await http.post("/v1/chat/completions", headers=auth, json={
            "model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})).status_code == 200
        assert (await http.post("/tokenize", headers=auth, json={"model": "tiny", "prompt": "x"})).status_code == 200
        assert (await http.get("/v1/models", headers=auth)).status_code == 200


async def test_a_key_past_its_rpm_is_limited_on_the_stored_response_routes_too(app):
    # docs/api.md: "Every route goes through the same gateway path: the API key ..., its limits (RPM ...)".
    # GET/DELETE/input_items/cancel read the store for the caller: a key past its RPM may hammer them freely.
    async with client(app) as http:
        made = await create(http, LIMITED, input="hi")
        assert (await create(http, LIMITED, input="hi")).status_code == 200
        assert_openai_error(await create(http, LIMITED, input="hi"), 429)
        statuses = [(await http.get(f"/v1/responses/{made.json()['id']}", headers=bearer(LIMITED))).status_code
                    for _ in range(5)]
    assert 429 in statuses, statuses
