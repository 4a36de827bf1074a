"""Attacks on the gateway's front door (issue 13, items 1, 3, 4, 7, 8), each performed against the
gateway on a real Redis with keys on, and seen to fail.

1. Two requests with the same `x-request-id` (two tenants) each get their own answer.
3. The key is checked before the body is read; no input, with or without a key, gets a 5xx
   (huge integers, NaN/Infinity, overflowing floats, lone surrogates, invalid UTF-8, deep nesting,
   values of the wrong JSON type): a hypothesis fuzz over the three POST routes, and the known cases.
4. No redirect is built from the Host header (`POST /v1/chat/completions/` with `Host: evil.example`).
7. The body that reaches the engine carries the caller's prefix-cache salt, never the client's own.
8. `/ready` names models only to a caller whose key may use them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.engine.fake import FakeEngine
from serving.gateway.auth import create_key, digest
from serving.gateway.routes import prefix_salt
from tests.redis.support import CHAT, client_for, make_engines, sse_json

ALICE = "cfg-alice-0123456789abcdef"  # a key from the configuration
SAME = "same-id-1"
ROUTES = {"/v1/chat/completions": "tiny", "/v1/completions": "tiny", "/v1/embeddings": "embedder"}
MODEL_NAMES = ("tiny", "tiny-lora", "other", "embedder")


def keys_on(**extra: Any) -> dict[str, Any]:
    return {"auth": {"enabled": True, "keys": [{"name": "alice", "key": ALICE}]}, **extra}


async def redis_key(app, name: str, **fields: Any) -> str:
    """A key stored in Redis (the `serving keys` path), not in the configuration."""
    key, _ = await create_key(app.state.services.store.store, name, **fields)
    return key


class Recording(FakeEngine):
    """A FakeEngine that keeps every request body it was sent (as JSON)."""

    def __init__(self, name: str, **options: Any):
        super().__init__(name, **options)
        self.bodies: list[dict[str, Any]] = []

    async def generate(self, route, body, request_id, timeout_s=None, **_routing) -> AsyncIterator[Any]:
        self.bodies.append(json.loads(body))
        async for item in super().generate(route, body, request_id, timeout_s):
            yield item


def envelope(response) -> dict[str, Any]:
    """The OpenAI error envelope of an error response; fails on anything else."""
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# ------------------------------------------------------------------------ 1: client request ids


@pytest.mark.parametrize("stream", [True, False])
async def test_same_x_request_id_from_two_keys_gets_each_its_own_answer(gateway, stream: bool) -> None:
    engine = FakeEngine("tiny", itl_s=0.01)  # 12 tokens each: the two requests are in flight together
    app = gateway(engines=make_engines(tiny=engine), **keys_on())
    bob = await redis_key(app, "bob")
    prompts = {ALICE: "alice asks about her own secret", bob: "bob asks something else"}

    async def ask(key: str, client) -> Any:
        body = {"model": "tiny", "messages": [{"role": "user", "content": prompts[key]}], "max_tokens": 12,
                "stream": stream}
        return await client.post("/v1/chat/completions", json=body, headers={"x-request-id": SAME})

    async with client_for(app, ALICE) as a, client_for(app, bob) as b:
        answers = await asyncio.wait_for(asyncio.gather(ask(ALICE, a), ask(bob, b)), timeout=10)
    for key, answer in zip((ALICE, bob), answers, strict=True):
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-request-id"] == SAME  # echoed, nothing more
        if stream:
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in sse_json(answer.text) if c["choices"])
        else:
            text = answer.json()["choices"][0]["message"]["content"]
        assert text == " ".join(FakeEngine._words(prompts[key], 12))  # its own answer
    assert len(set(engine.started)) == 2 and SAME not in engine.started  # two internal ids


# ------------------------------------------------------------- 3: the key before the body; no 5xx


async def raw_post(app, path: str, body: bytes, authorization: str | None) -> tuple[int, dict[bytes, bytes], int]:
    """POST as a raw ASGI client: (status, headers, how often the app asked for the body)."""
    headers = [(b"host", b"test"), (b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if authorization:
        headers.append((b"authorization", authorization.encode()))
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 50000), "server": ("test", 80), "headers": headers}
    reads = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal reads
        reads += 1
        if reads == 1:
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client stays; the app never needs this

    async def send(message: dict) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), 5)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], dict(start["headers"]), reads


HUGE = "9" * 5000


@pytest.mark.parametrize("authorization", [None, "Bearer sk-srv-" + "A" * 43, "Basic x"])
async def test_no_body_is_read_without_a_valid_key(gateway, authorization) -> None:
    """Before: the body was read and parsed first, and a 5,000-digit max_tokens got a 500 without any key."""
    app = gateway(**keys_on())
    body = ('{"model": "tiny", "messages": [], "max_tokens": %s}' % HUGE).encode()
    for path in ROUTES:
        status, _, reads = await raw_post(app, path, body, authorization)
        assert (status, reads) == (401, 0)


BAD_BODIES = {
    "5000-digit integer": '{"model": "tiny", "messages": %s, "max_tokens": %s}' % (json.dumps(CHAT), HUGE),
    "negative 5000-digit integer": '{"model": "tiny", "messages": %s, "max_tokens": -%s}' % (json.dumps(CHAT), HUGE),
    "integer past int64": '{"model": "tiny", "messages": %s, "seed": 9223372036854775808}' % json.dumps(CHAT),
    "float overflowing to inf": '{"model": "tiny", "messages": %s, "temperature": 1e999}' % json.dumps(CHAT),
    "NaN": '{"model": "tiny", "messages": %s, "temperature": NaN}' % json.dumps(CHAT),
    "Infinity": '{"model": "tiny", "messages": %s, "top_p": Infinity}' % json.dumps(CHAT),
    "-Infinity": '{"model": "tiny", "messages": %s, "top_p": -Infinity}' % json.dumps(CHAT),
    "lone surrogate in the model name": '{"model": "tiny\\ud800", "messages": []}',
    "lone surrogate in a message": '{"model": "tiny", "messages": [{"role": "user", "content": "a\\udfffb"}]}',
    "deep nesting past the parser": '{"model": "tiny", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "deep nesting under the parser's limit": '{"model": "tiny", "messages": %s, "response_format": %s}' % (
        json.dumps(CHAT), '{"a":' * 300 + "1" + "}" * 300),
    "stream as a string": '{"model": "tiny", "messages": %s, "stream": "true"}' % json.dumps(CHAT),
    "stream as a number": '{"model": "tiny", "messages": %s, "stream": 1}' % json.dumps(CHAT),
    "n as a string": '{"model": "tiny", "messages": %s, "n": "2"}' % json.dumps(CHAT),
    "stream_options not an object": '{"model": "tiny", "messages": %s, "stream": true, "stream_options": 1}' % (
        json.dumps(CHAT)),
    "include_usage not a boolean": '{"model": "tiny", "messages": %s, "stream": true, '
                                   '"stream_options": {"include_usage": "no"}}' % json.dumps(CHAT),
    "a JSON array": "[1, 2]",
    "empty": "",
    "not JSON": "{model: tiny}",
}
BAD_BYTES = {
    "invalid UTF-8": b'{"model": "tiny", "messages": [], "x": "\xff"}',
    "a UTF-8-encoded surrogate": b'{"model": "tiny", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
    "UTF-16": json.dumps({"model": "tiny", "messages": CHAT}).encode("utf-16"),
}


@pytest.mark.parametrize("case", [*BAD_BODIES, *BAD_BYTES])
async def test_malformed_bodies_are_400_in_the_envelope(gateway, case: str) -> None:
    app = gateway(**keys_on())
    body = BAD_BYTES[case] if case in BAD_BYTES else BAD_BODIES[case].encode()
    async with client_for(app) as anonymous, client_for(app, ALICE) as client:
        for path in ("/v1/chat/completions", "/v1/completions"):
            assert (await anonymous.post(path, content=body)).status_code == 401
            response = await client.post(path, content=body)
            assert response.status_code == 400, response.text
            error = envelope(response)
            assert error["type"] == "invalid_request_error" and len(error["message"]) < 400
    assert app.state.services.registry.engines["tiny"].started == []  # none reached the engine


async def test_edge_values_that_are_valid_still_work(gateway) -> None:
    app = gateway(**keys_on())
    body = {"model": "tiny", "messages": [{"role": "user", "content": "smile \U0001F600"}], "seed": 2**63 - 1,
            "temperature": 1e-300, "response_format": json.loads('{"a":' * 100 + "1" + "}" * 100)}
    async with client_for(app, ALICE) as client:
        response = await client.post("/v1/chat/completions", content=json.dumps(body).encode())  # \ud83d\ude00
    assert response.status_code == 200, response.text


# JSON-ish text, built as text: Python's json cannot even write some of what an attacker sends
_NUMBER = st.one_of(
    st.integers().map(str),
    st.text("0123456789", min_size=18, max_size=6000).map(lambda digits: digits.lstrip("0") or "0"),
    st.floats().map(json.dumps),  # NaN, Infinity, -Infinity included
    st.sampled_from(["1e999", "-1e999", "1e-999", "-0", "0.0", "9223372036854775807", "-9223372036854775809"]),
)
_STRING = st.text(st.characters(exclude_categories=()), max_size=20).map(json.dumps)  # lone surrogates included
_SCALAR = st.one_of(st.sampled_from(["null", "true", "false"]), _NUMBER, _STRING)
_FIELD = st.sampled_from(["model", "messages", "prompt", "input", "max_tokens", "n", "temperature", "stream",
                          "stream_options", "seed", "logit_bias", "tools", "response_format", "cache_salt",
                          "request_id", "encoding_format", "user"])
_KEY = st.one_of(_FIELD.map(json.dumps), _STRING)
_VALUE = st.recursive(_SCALAR, lambda inner: st.one_of(
    st.lists(inner, max_size=4).map(lambda items: "[" + ",".join(items) + "]"),
    st.lists(st.tuples(_KEY, inner), max_size=4).map(lambda pairs: "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"),
), max_leaves=12)
_SENSIBLE = {  # values each route expects: a fuzzed request starts valid, then some fields turn odd
    "/v1/chat/completions": {"model": '"tiny"', "messages": json.dumps(CHAT), "max_tokens": "4"},
    "/v1/completions": {"model": '"tiny-lora"', "prompt": '"one two"', "max_tokens": "4", "n": "2"},
    "/v1/embeddings": {"model": '"embedder"', "input": '["a", "b"]'},
}
_EXTRA = {"stream": st.sampled_from(["true", "false"]), "temperature": st.sampled_from(["0", "0.5"]),
          "seed": st.integers(0, 2**63 - 1).map(str), "user": _STRING,
          "stream_options": st.just('{"include_usage": true}'), "cache_salt": _STRING, "request_id": _STRING}


@st.composite
def bodies(draw, path: str) -> bytes:
    """A request body for `path`: mostly a valid request with some fields (or the model) made odd,
    sometimes deep nesting or any JSON value or bytes at all."""
    kind = draw(st.sampled_from(["request"] * 6 + ["deep", "value", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "value":
        return draw(_VALUE).encode("utf-8", "surrogatepass")
    if kind == "deep":
        depth = draw(st.integers(1, 3000))
        return ('{"model": "tiny", "messages": ' + "[" * depth + "]" * depth + "}").encode()
    fields = {json.dumps(k): v for k, v in _SENSIBLE[path].items()}
    for name in draw(st.lists(st.sampled_from(sorted(_EXTRA)), max_size=3, unique=True)):
        fields[json.dumps(name)] = draw(_EXTRA[name])
    for name in draw(st.lists(_FIELD, max_size=3, unique=True)):  # odd values, the model's included
        fields[json.dumps(name)] = draw(_VALUE)
    if draw(st.booleans()):
        fields[json.dumps("model")] = draw(st.sampled_from(MODEL_NAMES).map(json.dumps))
    return ("{" + ",".join(f"{k}:{v}" for k, v in fields.items()) + "}").encode("utf-8", "surrogatepass")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data(), path=st.sampled_from(sorted(ROUTES)), keyed=st.sampled_from([True, True, True, False]))
async def test_fuzzed_bodies_never_get_a_5xx(gateway, data, path: str, keyed: bool) -> None:
    """Anything a client sends, with or without a key, is answered below 500, in the envelope when refused."""
    body = data.draw(bodies(path), label="body")
    app = fuzz_app(gateway)
    async with client_for(app, ALICE if keyed else None) as client:
        response = await client.post(path, content=body)
    assert response.status_code < 500, (response.status_code, response.text[:500], body[:300])
    if not keyed:
        assert response.status_code == 401
    if response.status_code != 200:
        envelope(response)
    elif response.headers["content-type"].startswith("text/event-stream"):
        sse_json(response.text)
    else:
        assert isinstance(response.json(), dict)


_APPS: dict[int, Any] = {}


def fuzz_app(gateway) -> Any:
    """One app per test (hypothesis calls the test once per example, with the same fixture)."""
    if id(gateway) not in _APPS:
        _APPS.clear()
        _APPS[id(gateway)] = gateway(**keys_on())
    return _APPS[id(gateway)]


async def test_a_body_trickled_byte_by_byte_is_cut_at_the_body_deadline(gateway) -> None:
    """Item 5, the gateway's side: HAProxy's client timeout restarts with every piece of a body, so a body
    sent a byte a second held a gateway slot for as long as the client liked; now 408 at body_timeout_s."""
    app = gateway(**keys_on(gateway={"body_timeout_s": 0.5}))
    headers = [(b"host", b"test"), (b"content-type", b"application/json"), (b"content-length", b"1000"),
               (b"authorization", f"Bearer {ALICE}".encode())]
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000), "server": ("test", 80),
             "headers": headers}
    sent: list[dict] = []

    async def receive() -> dict:
        await asyncio.sleep(0.1)
        return {"type": "http.request", "body": b" ", "more_body": True}  # forever, a byte at a time

    async def send(message: dict) -> None:
        sent.append(message)

    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(app(scope, receive, send), 5)
    assert loop.time() - started < 2
    assert sent[0]["status"] == 408
    error = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["error"]
    assert error["code"] == "body_timeout" and error["type"] == "timeout_error"


# ------------------------------------------------------------------------------- 4: open redirect


@pytest.mark.parametrize("method, path", [
    ("POST", "/v1/chat/completions/"), ("POST", "/v1/completions/"), ("POST", "/v1/embeddings/"),
    ("GET", "/v1/models/"), ("GET", "/health/"), ("GET", "/ready/"), ("GET", "/v1/"), ("GET", "/docs/"),
])
async def test_no_redirect_is_built_from_the_host_header(gateway, method: str, path: str) -> None:
    """Before: POST /v1/chat/completions/ with Host: evil.example answered 307 to http://evil.example/...."""
    app = gateway(**keys_on())
    async with client_for(app, ALICE) as client:
        response = await client.request(method, path, headers={"host": "evil.example"},
                                        json={"model": "tiny", "messages": CHAT} if method == "POST" else None)
    assert not 300 <= response.status_code < 400 and "location" not in response.headers
    assert "evil.example" not in response.text
    assert response.status_code in (404, 405), response.text
    envelope(response)


# ------------------------------------------------------------------------- 7: prefix-cache salt


@pytest.mark.parametrize("path, model, extra", [
    ("/v1/chat/completions", "tiny", {"messages": CHAT}),
    ("/v1/chat/completions", "tiny", {"messages": CHAT, "stream": True}),
    ("/v1/completions", "tiny", {"prompt": "one two"}),
    ("/v1/embeddings", "embedder", {"input": "one two"}),
])
async def test_the_engine_gets_each_keys_own_salt_never_the_clients(gateway, path, model, extra) -> None:
    engines = make_engines(tiny=Recording("tiny"), embedder=Recording("embedder"))
    app = gateway(engines=engines, **keys_on(cache={"mode": "off"}))
    bob = await redis_key(app, "bob")
    # a client that sends a salt (another tenant's, guessed) and a request_id of its own
    sent = {"model": model, **extra, "cache_salt": "guessed-salt", "request_id": "chosen-id"}
    async with client_for(app, ALICE) as a, client_for(app, bob) as b:
        for client in (a, b, a):
            assert (await client.post(path, json=sent)).status_code == 200
    salts = [body["cache_salt"] for body in engines[model].bodies]
    assert salts == [prefix_salt(digest(ALICE)), prefix_salt(digest(bob)), prefix_salt(digest(ALICE))]
    assert salts[0] != salts[1]  # two keys never share cached prefixes; one key always does
    assert all(len(s) == 64 and ALICE not in s and bob not in s for s in salts)
    assert all("request_id" not in body for body in engines[model].bodies)


async def test_shared_prefix_cache_drops_the_clients_salt(gateway) -> None:
    engines = make_engines(tiny=Recording("tiny"))
    app = gateway(engines=engines, **keys_on(cache={"mode": "off", "prefix_salt": "shared"}))
    async with client_for(app, ALICE) as client:
        sent = {"model": "tiny", "messages": CHAT, "cache_salt": "mine"}
        assert (await client.post("/v1/chat/completions", json=sent)).status_code == 200
    assert "cache_salt" not in engines["tiny"].bodies[0]


async def test_the_salt_keeps_the_response_cache_shareable(gateway) -> None:
    """The salt is added after the response cache's key: with `cache.shared`, keys still share answers."""
    engines = make_engines(tiny=Recording("tiny"))
    app = gateway(engines=engines, **keys_on(cache={"shared": True}))
    bob = await redis_key(app, "bob")
    async with client_for(app, ALICE) as a, client_for(app, bob) as b:
        assert (await a.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT, "temperature": 0,
                                                           "cache_salt": "x"})).headers["x-cache"] == "miss"
        await app.state.services.drain()
        hit = await b.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT, "temperature": 0})
    assert hit.headers["x-cache"] == "hit" and len(engines["tiny"].bodies) == 1


# --------------------------------------------------------------------------------- 8: /ready


class NotReady(FakeEngine):
    async def ready(self) -> bool:
        return False


@pytest.mark.parametrize("loading", [False, True])
async def test_ready_names_models_only_to_keys_that_may_use_them(gateway, loading: bool) -> None:
    engines = make_engines(other=NotReady("other")) if loading else make_engines()
    app = gateway(engines=engines, **keys_on())
    only_embedder = await redis_key(app, "embedder-only", models=["embedder"])
    status = 503 if loading else 200
    counts = {"ready": 2 if loading else 3, "total": 3}
    async with client_for(app) as anonymous:
        for headers in ({}, {"authorization": "Bearer sk-srv-wrong"}, {"authorization": "Basic x"}):
            response = await anonymous.get("/ready", headers=headers)
            assert response.status_code == status
            assert {k: response.json()[k] for k in counts} == counts and "models" not in response.json()
            assert not any(name in response.text for name in ("tiny", "other", "embedder"))  # message included
    async with client_for(app, only_embedder) as client:
        scoped = await client.get("/ready")
    async with client_for(app, ALICE) as client:
        full = await client.get("/ready")
    assert scoped.status_code == full.status_code == status
    assert scoped.json()["models"] == {"embedder": True}
    assert "other" not in scoped.text and "tiny" not in scoped.text
    assert full.json()["models"] == {"tiny": True, "other": not loading, "embedder": True}
    if loading:
        assert "other" in full.json()["error"]["message"]
        assert full.headers["retry-after"] == scoped.headers["retry-after"] == "5"


async def test_ready_with_auth_off_names_every_model(gateway) -> None:
    app = gateway()
    async with client_for(app) as client:
        response = await client.get("/ready")
    assert response.json() == {"status": "ready", "ready": 3, "total": 3,
                               "models": {"tiny": True, "other": True, "embedder": True}}
