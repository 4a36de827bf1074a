"""Four faults seen in the field, each fixed as a kind (FakeEngines behind create_app, no Ray, no vLLM):

1. A response-cache hit replayed the stored answer's own `id` and `created`: two answers shared an id.
2. Fields OpenAI's API accepts (`store`, `metadata`, `service_tier`, ...) were refused as unknown because
   vLLM does not know them; now accepted, and those vLLM does not know are dropped before vLLM.
3. Engine errors reached clients in vLLM's shape (`"type": "BadRequestError"`, `"code": 400`) instead of
   OpenAI's (`"type": "invalid_request_error"`, a string `code` such as "context_length_exceeded").
4. No CORS: a browser page on another origin could not call the API (the preflight got 405).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, AsyncIterator

import anthropic
import httpx
import httpx2
import openai
import pytest

from serving.config import GatewayConfig, ServingConfig, load_config
from serving.engine.fake import FakeEngine
from serving.engine.protocol import Reply
from serving.gateway import schemas
from serving.gateway.app import create_app
from serving.gateway.cache import fresh, new_id, replay
from serving.gateway.cors import EXPOSED_HEADERS, install_cors
from serving.gateway.errors import engine_error_body, error_body
from serving.gateway.relay import _mask_errors
from tests.support import no_serving_env, sse_json  # noqa: F401 - autouse fixture

CHAT = [{"role": "user", "content": "Tell me about the gateway"}]
HEX32 = r"[0-9a-f]{32}"
MASKED = "The server had an error while processing your request."
# vLLM 0.32's messages (vllm/renderers/params.py, vllm/v1/engine/input_processor.py), with the
# " (parameter=..., value=...)" that VLLMValidationError.__str__ appends
CONTEXT_TOO_LONG = ("This model's maximum context length is 4096 tokens. However, your prompt contains 5000 input "
                    "tokens, which exceeds this limit even without any output tokens. Please reduce the length of "
                    "the input prompt. (parameter=input_tokens, value=5000)")
TOO_MANY_TOKENS = "max_tokens=1000000 cannot be greater than max_model_len=4096. Please request fewer output tokens."
PROMPT_TOO_LONG = ("The decoder prompt (length 5000) is longer than the maximum model length of 4096. Make sure "
                   "that `max_model_len` is no smaller than the number of text tokens.")


def config(*, cache: str = "off", **gateway: Any) -> ServingConfig:
    return load_config(data={
        "models": [{"name": "tiny", "source": "/models/tiny"},
                   {"name": "embedder", "source": "/models/embedder", "kind": "embed"}],
        "gateway": gateway, "auth": {"enabled": False}, "cache": {"mode": cache}})


class Recording(FakeEngine):
    """A FakeEngine that keeps every request body it was sent (what vLLM would have got)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.bodies: list[dict[str, Any]] = []

    def generate(self, route, body, request_id, timeout_s=None, **_routing):
        self.bodies.append(json.loads(body))
        return super().generate(route, body, request_id, timeout_s)


class Scripted:
    """Yields a fixed script (a Reply first, then SSE strings): an engine answering what vLLM answers."""

    def __init__(self, items: list[Reply | str]):
        self.items = items

    async def ready(self) -> bool:
        return True

    async def generate(self, route, body, request_id, timeout_s=None, **_routing) -> AsyncIterator[Reply | str]:
        for item in self.items:
            yield item


def app_for(engine=None, *, embedder=None, **kwargs: Any):
    engines = {"tiny": engine or Recording("tiny"), "embedder": embedder or FakeEngine("embedder")}
    return create_app(config(**kwargs), engines)


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def sdk_for(app) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", max_retries=0, http_client=client_for(app))


async def settle(app) -> None:
    """Wait for the bookkeeping after a response (the cache write)."""
    await app.state.services.drain()


def vllm_error(status: int, message: str, kind: str = "BadRequestError", param: str | None = None) -> dict:
    """vLLM's error envelope (vllm.entrypoints.serve.exception_handling.error_response)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


# ----------------------------------------------------------------- 1: a cache hit is a new answer


STORED_CHAT = {"id": "chatcmpl-" + "a" * 32, "object": "chat.completion", "created": 1_600_000_000, "model": "tiny",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "héllo"}, "logprobs": None,
                            "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


def test_fresh_gives_a_cached_answer_a_new_id_and_created() -> None:
    before = int(time.time())
    entry = json.dumps(STORED_CHAT).encode()
    first, second = json.loads(fresh(entry, "chat")), json.loads(fresh(entry, "chat"))
    for answer in (first, second):
        assert re.fullmatch(f"chatcmpl-{HEX32}", answer["id"]) and answer["id"] != STORED_CHAT["id"]
        assert before <= answer["created"] <= int(time.time())
        assert {k: v for k, v in answer.items() if k not in ("id", "created")} == \
            {k: v for k, v in STORED_CHAT.items() if k not in ("id", "created")}
    assert first["id"] != second["id"]


def test_fresh_keeps_each_routes_id_style() -> None:
    completion = {"id": "cmpl-" + "b" * 32, "object": "text_completion", "created": 1, "model": "tiny",
                  "choices": [{"index": 0, "text": "x", "finish_reason": "stop", "logprobs": None}]}
    assert re.fullmatch(f"cmpl-{HEX32}", json.loads(fresh(json.dumps(completion).encode(), "completion"))["id"])
    vllm_embeddings = {"id": "embd-" + "c" * 32, "object": "list", "created": 1, "model": "e", "data": [],
                       "usage": {"prompt_tokens": 1, "total_tokens": 1}}
    renewed = json.loads(fresh(json.dumps(vllm_embeddings).encode(), "embedding"))
    assert re.fullmatch(f"embd-{HEX32}", renewed["id"]) and renewed["created"] > 1
    openai_embeddings = {"object": "list", "model": "e", "data": [], "usage": {"prompt_tokens": 1, "total_tokens": 1}}
    assert json.loads(fresh(json.dumps(openai_embeddings).encode(), "embedding")) == openai_embeddings  # none to renew
    # an entry without an id (or without a prefix) gets the route's vLLM prefix
    assert re.fullmatch(f"chatcmpl-{HEX32}", new_id("chat"))
    assert re.fullmatch(f"cmpl-{HEX32}", new_id("completion", "x"))


def test_replay_gives_every_chunk_the_same_new_id_and_created() -> None:
    before = int(time.time())
    entry = json.dumps(STORED_CHAT).encode()
    events = sse_json("".join(replay(entry, "chat", include_usage=True)))
    again = sse_json("".join(replay(entry, "chat", include_usage=True)))
    assert len(events) == 2 and events[-1]["usage"] == STORED_CHAT["usage"]
    assert len({e["id"] for e in events}) == 1 and len({e["created"] for e in events}) == 1
    assert re.fullmatch(f"chatcmpl-{HEX32}", events[0]["id"]) and events[0]["id"] != STORED_CHAT["id"]
    assert before <= events[0]["created"] <= int(time.time())
    assert again[0]["id"] != events[0]["id"]  # each replay is an answer of its own


async def test_two_cache_hits_are_two_answers() -> None:
    """Needs routes.py's cache-hit branch to send `fresh(entry, route)` (the streamed hits need nothing)."""
    app = app_for(cache="all")
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 4}
    before = int(time.time())
    async with client_for(app) as client:
        miss = await client.post("/v1/chat/completions", json=body)
        await settle(app)
        hits = [await client.post("/v1/chat/completions", json=body) for _ in range(2)]
        streams = [await client.post("/v1/chat/completions", json={**body, "stream": True}) for _ in range(2)]
    assert miss.headers["x-cache"] == "miss"
    assert [r.headers["x-cache"] for r in hits + streams] == ["hit"] * 4
    ids = [miss.json()["id"]] + [r.json()["id"] for r in hits]
    for stream in streams:
        chunks = sse_json(stream.text)
        assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
        assert chunks[0]["created"] >= before
        ids.append(chunks[0]["id"])
    assert len(set(ids)) == 5, ids  # the engine's answer and four answers from its cache entry
    assert all(re.fullmatch(f"fake-{HEX32}", i) for i in ids)  # the engine's own id style (fake-<hex>)
    for hit in hits:
        assert hit.json()["created"] >= before
        assert hit.json()["choices"] == miss.json()["choices"] and hit.json()["usage"] == miss.json()["usage"]
    assert len(app.state.services.registry.engines["tiny"].bodies) == 1


# ------------------------------------------------------------ 2: every field OpenAI's API accepts


def test_shipped_openai_fields_are_the_installed_sdks() -> None:
    # the SDK is generated from OpenAI's API reference; regenerate with schemas.write_reference_fields()
    assert schemas._reference()["routes"] == schemas.sdk_reference_fields()


REFERENCE_ROUTES = ("chat", "completion", "embedding", "responses", "messages", "count_tokens")


def test_every_field_only_the_reference_knows_has_a_decision() -> None:
    only = set().union(*(schemas.reference_only_fields(route) for route in REFERENCE_ROUTES))
    assert only == set(schemas.REFERENCE_ONLY), "each field vLLM does not know needs a line in schemas.REFERENCE_ONLY"
    refused = set().union(*(schemas.reference_fields(r) - schemas.known_fields(r) for r in REFERENCE_ROUTES)) - only
    assert refused == set(schemas.UNSUPPORTED), "every field neither dropped nor passed on is refused, with a reason"
    for route in REFERENCE_ROUTES:
        assert schemas.reference_fields(route) <= schemas.accepted_fields(route)
        assert schemas.known_fields(route) <= schemas.accepted_fields(route)
    assert {"store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier", "verbosity",
            "web_search_options", "function_call", "functions"} <= schemas.reference_only_fields("chat")


def test_drop_reference_only_takes_out_what_vllm_does_not_know() -> None:
    payload = {"model": "m", "messages": CHAT, "store": True, "metadata": {"a": "b"}, "user": "u",
               "max_completion_tokens": 5}
    assert schemas.drop_reference_only("chat", payload) == ["metadata", "store"]
    assert payload == {"model": "m", "messages": CHAT, "user": "u", "max_completion_tokens": 5}


OPENAI_ONLY_CHAT = {
    "store": True, "metadata": {"project": "x"}, "service_tier": "auto", "prompt_cache_key": "k",
    "prompt_cache_retention": "24h", "prompt_cache_options": {"mode": "implicit"}, "safety_identifier": "user-1",
    "modalities": ["text"], "prediction": {"type": "content", "content": "x"}, "verbosity": "low",
    "web_search_options": {}, "moderation": {"model": "omni-moderation-latest"},
    "audio": {"voice": "alloy", "format": "mp3"}, "functions": [{"name": "f", "parameters": {"type": "object"}}],
    "function_call": "auto",
}
# OpenAI fields vLLM knows: they reach vLLM as sent
SHARED_CHAT = {"user": "user-1", "parallel_tool_calls": True, "reasoning_effort": "low", "max_completion_tokens": 5,
               "logit_bias": {"11": -100}}


async def test_openai_fields_are_accepted_and_those_vllm_does_not_know_are_dropped() -> None:
    """Needs routes.py: check_shape against accepted_fields, drop_reference_only after it."""
    engine = Recording("tiny")
    app = app_for(engine)
    assert set(OPENAI_ONLY_CHAT) == schemas.reference_only_fields("chat")  # every one of them, through the gateway
    sdk = sdk_for(app)
    answer = await sdk.chat.completions.create(model="tiny", messages=CHAT, **OPENAI_ONLY_CHAT, **SHARED_CHAT)
    assert answer.choices[0].message.content
    sent = engine.bodies[-1]
    assert not set(OPENAI_ONLY_CHAT) & set(sent), sent
    assert {k: sent[k] for k in SHARED_CHAT} == SHARED_CHAT
    async with client_for(app) as client:
        completion = await client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "best_of": 2,
                                                                "user": "u", "suffix": "!"})
        embedding = await client.post("/v1/embeddings", json={"model": "embedder", "input": "x", "user": "u",
                                                              "encoding_format": "float", "dimensions": 8})
    assert completion.status_code == 200, completion.text
    assert "best_of" not in engine.bodies[-1] and engine.bodies[-1]["suffix"] == "!"
    assert embedding.status_code == 200, embedding.text


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "temprature": 0}),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stroe": True}),
    ("/v1/embeddings", {"model": "embedder", "input": "x", "dimension": 8}),
])
async def test_a_typo_is_still_an_unknown_parameter(route: str, body: dict) -> None:
    typo = next(k for k in body if k not in ("model", "messages", "prompt", "input"))
    async with client_for(app_for()) as client:
        response = await client.post(route, json=body)
    assert response.status_code == 400
    assert response.json()["error"] == {"message": f"Unrecognized request argument supplied: {typo}",
                                        "type": "invalid_request_error", "param": typo, "code": "unknown_parameter"}


# ------------------------------------------------------------------ 3: engine errors, OpenAI's way


@pytest.mark.parametrize("status, vllm, expected", [
    (400, vllm_error(400, CONTEXT_TOO_LONG, param="input_tokens"),
     {"message": CONTEXT_TOO_LONG, "type": "invalid_request_error", "param": "input_tokens",
      "code": "context_length_exceeded"}),
    (400, vllm_error(400, PROMPT_TOO_LONG),
     {"message": PROMPT_TOO_LONG, "type": "invalid_request_error", "param": None, "code": "context_length_exceeded"}),
    (400, vllm_error(400, TOO_MANY_TOKENS, param="max_tokens"),
     {"message": TOO_MANY_TOKENS, "type": "invalid_request_error", "param": "max_tokens",
      "code": "context_length_exceeded"}),
    (400, vllm_error(400, "temperature must be non-negative, got -1.0.", param="temperature"),
     {"message": "temperature must be non-negative, got -1.0.", "type": "invalid_request_error",
      "param": "temperature", "code": None}),
    (404, vllm_error(404, "The model `tiny-x` does not exist.", "NotFoundError"),
     {"message": "The model `tiny-x` does not exist.", "type": "invalid_request_error", "param": None,
      "code": "model_not_found"}),
    (422, vllm_error(422, "unprocessable", "UnprocessableEntityError", param="messages"),
     {"message": "unprocessable", "type": "invalid_request_error", "param": "messages", "code": None}),
    (500, vllm_error(500, "CUDA error at /src/secret.cu:42", "InternalServerError"),
     {"message": MASKED, "type": "server_error", "param": None, "code": None}),
    (503, vllm_error(503, "The request was preempted; retry it.", "ServiceUnavailableError"),
     {"message": "The request was preempted; retry it.", "type": "service_unavailable_error", "param": None,
      "code": "engine_unavailable"}),
    (400, {"detail": "Method Not Allowed"},
     {"message": "Method Not Allowed", "type": "invalid_request_error", "param": None, "code": None}),
], ids=["context", "prompt-length", "max-tokens", "plain-400", "404", "422", "500-masked", "503", "fastapi-detail"])
async def test_non_streamed_engine_errors_get_openais_type_and_code(status: int, vllm: dict, expected: dict) -> None:
    app = app_for(Scripted([Reply(status, json.dumps(vllm).encode())]))
    async with client_for(app) as client:
        response = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT})
    assert response.status_code == status
    assert response.json() == {"error": expected}
    # a 503 is worth retrying: the SDKs' retry logic reads Retry-After
    assert response.headers.get("retry-after") == ("1" if status == 503 else None)


async def test_an_engine_error_that_is_not_json_gets_the_envelope() -> None:
    app = app_for(Scripted([Reply(413, b"<html>too big</html>")]))
    async with client_for(app) as client:
        response = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT})
    assert response.status_code == 413
    assert response.json() == {"error": {"message": "Request Entity Too Large", "type": "invalid_request_error",
                                         "param": None, "code": None}}


async def test_the_openai_sdk_sees_context_length_exceeded() -> None:
    app = app_for(Scripted([Reply(400, json.dumps(vllm_error(400, CONTEXT_TOO_LONG, param="input_tokens")).encode())]))
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk_for(app).chat.completions.create(model="tiny", messages=CHAT)
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.type == "invalid_request_error" and caught.value.param == "input_tokens"


async def test_a_stream_whose_first_event_is_an_error_answers_it_as_openai_does() -> None:
    script = [Reply(200, None), event(vllm_error(400, CONTEXT_TOO_LONG, param="input_tokens")), "data: [DONE]\n\n"]
    async with client_for(app_for(Scripted(script))) as client:
        response = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT, "stream": True})
    assert response.status_code == 400
    assert response.json()["error"] == {"message": CONTEXT_TOO_LONG, "type": "invalid_request_error",
                                        "param": "input_tokens", "code": "context_length_exceeded"}


async def test_in_band_engine_errors_get_openais_type_and_code() -> None:
    chunk = event({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "tiny",
                   "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]})
    script = [Reply(200, None), chunk, event(vllm_error(400, "bad logit_bias", param="logit_bias")), "data: [DONE]\n\n"]
    async with client_for(app_for(Scripted(script))) as client:
        response = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT, "stream": True})
    assert response.status_code == 200
    assert sse_json(response.text)[-1] == {"error": {"message": "bad logit_bias", "type": "invalid_request_error",
                                                     "param": "logit_bias", "code": None}}
    e500 = event(vllm_error(500, "CUDA error in /opt/secret/kernel.cu", "InternalServerError"))
    masked = _mask_errors(chunk + e500)
    assert masked.startswith(chunk) and masked.endswith("\n\n") and "secret" not in masked
    assert sse_json(masked + "data: [DONE]\n\n")[-1] == {"error": {"message": MASKED, "type": "server_error",
                                                                   "param": None, "code": None}}


def test_engine_error_body_keeps_the_gateways_own_codes_and_speaks_anthropic() -> None:
    timed_out = {"error": {"message": "The request timed out.", "type": "timeout_error", "param": None,
                           "code": "timeout"}}  # serving.engine.vllm's own
    assert engine_error_body(504, timed_out)["error"]["code"] == "timeout"
    loading = {"error": {"message": "model 'tiny' is still loading", "type": "service_unavailable", "param": None,
                         "code": 503}}
    assert engine_error_body(503, loading)["error"] == {"message": "model 'tiny' is still loading",
                                                       "type": "service_unavailable_error", "param": None,
                                                       "code": "model_not_ready"}
    vllm_anthropic = {"type": "error", "error": {"type": "BadRequestError", "message": CONTEXT_TOO_LONG}}
    assert engine_error_body(400, vllm_anthropic, dialect="anthropic") == \
        {"type": "error", "error": {"type": "invalid_request_error", "message": CONTEXT_TOO_LONG}}
    assert error_body(500, "x", dialect="anthropic") == {"type": "error", "error": {"type": "api_error",
                                                                                   "message": MASKED}}


# --------------------------------------------------------------------------------------- 4: CORS

ORIGIN = "https://app.example.com"


def preflight(origin: str, headers: str = "authorization, content-type") -> dict[str, str]:
    return {"origin": origin, "access-control-request-method": "POST", "access-control-request-headers": headers}


def sent_headers(call, http: Any = httpx) -> set[str]:
    """The header names an official SDK sends (lowercase), from one call through a recording transport
    of `http` (httpx, or httpx2 for Anthropic's SDK)."""
    seen: list[Any] = []

    def record(request):
        seen.append(request)
        return http.Response(500, json={})

    call(http.Client(transport=http.MockTransport(record)))
    return {name.lower() for name in seen[0].headers}


# Headers a browser sets itself (forbidden to scripts, never in a preflight) or that CORS always allows.
_BROWSER_OWN = {"host", "connection", "content-length", "accept-encoding", "accept", "content-type"}


def test_default_cors_headers_cover_what_the_official_sdks_send() -> None:
    def openai_call(http: httpx.Client) -> None:
        client = openai.OpenAI(base_url="http://test/v1", api_key="k", max_retries=0, http_client=http,
                               organization="org", project="proj")
        with pytest.raises(openai.APIError):
            client.chat.completions.create(model="m", messages=CHAT, timeout=30)

    def anthropic_call(http) -> None:
        client = anthropic.Anthropic(base_url="http://test", api_key="k", max_retries=0, http_client=http)
        with pytest.raises(anthropic.APIError):
            client.messages.create(model="m", max_tokens=5, messages=CHAT, timeout=30)  # type: ignore[arg-type]

    allowed = set(GatewayConfig().cors_allowed_headers)
    for call, http in ((openai_call, httpx), (anthropic_call, httpx2)):
        needed = sent_headers(call, http) - _BROWSER_OWN
        assert any(h.startswith("x-stainless-") for h in needed)
        assert needed <= allowed, sorted(needed - allowed)


async def test_cors_preflight_from_an_allowed_origin() -> None:
    """Needs app.py: install_cors(app, config.gateway) in create_app."""
    app = app_for(cors_allowed_origins=[ORIGIN])
    asked = "authorization, content-type, x-stainless-os, x-stainless-timeout, openai-organization"
    async with client_for(app) as client:
        allowed = await client.options("/v1/chat/completions", headers=preflight(ORIGIN, asked))
        other = await client.options("/v1/chat/completions", headers=preflight("https://evil.example.net", asked))
        post = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT},
                                 headers={"origin": ORIGIN})
        refused = await client.post("/v1/chat/completions", json={"model": "nope", "messages": CHAT},
                                    headers={"origin": ORIGIN})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert {"GET", "POST"} <= set(allowed.headers["access-control-allow-methods"].split(", "))
    assert set(asked.split(", ")) <= set(allowed.headers["access-control-allow-headers"].lower().split(", "))
    assert "access-control-allow-credentials" not in allowed.headers  # bearer tokens, no cookies
    assert "access-control-allow-origin" not in other.headers and other.status_code != 200
    # the answer itself (and an error too) tells the browser the page may read it and its headers
    for response in (post, refused):
        assert response.headers["access-control-allow-origin"] == ORIGIN
        assert set(EXPOSED_HEADERS) <= set(response.headers["access-control-expose-headers"].split(", "))
    assert post.status_code == 200 and refused.status_code == 404


async def test_cors_is_off_by_default() -> None:
    assert GatewayConfig().cors_allowed_origins == []
    async with client_for(app_for()) as client:
        response = await client.options("/v1/chat/completions", headers=preflight(ORIGIN))
        post = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT},
                                 headers={"origin": ORIGIN})
    assert response.status_code == 405
    assert "access-control-allow-origin" not in response.headers and "access-control-allow-origin" not in post.headers


async def test_install_cors_adds_nothing_without_origins() -> None:
    from fastapi import FastAPI

    app = FastAPI()
    install_cors(app, GatewayConfig())
    assert app.user_middleware == []
    install_cors(app, GatewayConfig(cors_allowed_origins=["*"]))
    assert len(app.user_middleware) == 1


@pytest.mark.parametrize("origin", ["https://app.example.com/", "app.example.com", "https://a.example.com/path"])
def test_an_origin_with_a_path_or_without_a_scheme_is_refused(origin: str) -> None:
    # a browser's Origin never has a path: such an entry would match nothing
    with pytest.raises(ValueError, match="not an origin"):
        GatewayConfig(cors_allowed_origins=[origin])
    assert GatewayConfig(cors_allowed_origins=["HTTPS://App.Example.com:8443"]).cors_allowed_origins == \
        ["https://app.example.com:8443"]
