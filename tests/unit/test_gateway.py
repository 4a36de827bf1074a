"""Unit tests of the gateway (serving.gateway.app): FakeEngines behind create_app, no Ray, no vLLM.

Driven through httpx's ASGI transport and through the official openai SDK pointed at the app. The
ASGI transport buffers whole responses, so the client-disconnect tests drive the ASGI app directly.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import re
import struct
from typing import Any, AsyncIterator

import httpx
import openai
import pytest
import pytest_asyncio

from serving.config import ServingConfig, load_config
from serving.engine.fake import FakeEngine
from serving.engine.protocol import Engine, Reply
from serving.gateway.app import create_app
from tests import support
from tests.support import (
    no_serving_env,  # noqa: F401 - autouse fixture
    sse_json,
    stream_and_hang_up,
    wait_for,
)

MASKED = "The server had an error while processing your request."
HEX_ID = re.compile(r"^[0-9a-f]{32}$")
CHAT = [{"role": "user", "content": "Tell me about the gateway"}]


# --------------------------------------------------------------------------------------- helpers


def make_config(**gateway: Any) -> ServingConfig:
    return load_config(data={
        "models": [
            {"name": "tiny", "source": "/models/tiny", "lora_adapters": {"tiny-lora": "/adapters/tiny-lora"}},
            {"name": "org/other", "source": "hub/other"},
            {"name": "embedder", "source": "/models/embedder", "kind": "embed"},
        ],
        "gateway": gateway,
        # these tests are about routing and relaying: keys, limits and the cache have tests of their own
        "auth": {"enabled": False},
        "cache": {"mode": "off"},
    })


def make_engines(**overrides: Any) -> dict[str, Any]:
    engines: dict[str, Any] = {"tiny": FakeEngine("tiny"), "org/other": FakeEngine("org/other"),
                               "embedder": FakeEngine("embedder")}
    engines.update(overrides)
    return engines


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def sdk_for(app) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", max_retries=0, http_client=client_for(app))


def assert_envelope(response: httpx.Response, status: int, *, code: Any = None, param: Any = None) -> dict:
    """The envelope with its param (None unless given) and an x-request-id."""
    return support.assert_envelope(response, status, code=code, param=param, request_id=True)


@pytest.fixture
def engines() -> dict[str, Any]:
    return make_engines()


@pytest.fixture
def app(engines):
    return create_app(make_config(), engines)


@pytest_asyncio.fixture(loop_scope="function")
async def client(app) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app) as c:
        yield c


# ------------------------------------------------------------------------------ tiny test engines


class ScriptedEngine:
    """Yields a fixed script of items (a Reply first, then SSE strings), then optionally raises."""

    def __init__(self, items: list[Reply | str], raise_after: BaseException | None = None):
        self.items, self.raise_after = items, raise_after
        self.closed = False

    async def ready(self) -> bool:
        return True

    async def load_adapter(self, name: str, source: str) -> None:
        raise ValueError("a scripted engine takes no adapters")

    async def generate(self, route, body, request_id, timeout_s=None, **_routing) -> AsyncIterator[Reply | str]:
        try:
            for item in self.items:
                yield item
            if self.raise_after is not None:
                raise self.raise_after
        except GeneratorExit:
            self.closed = True
            raise


class RaisesBeforeFirstItem:
    async def ready(self) -> bool:
        return True

    async def generate(self, route, body, request_id, timeout_s=None, **_routing) -> AsyncIterator[Reply | str]:
        raise ConnectionError("replica 10.0.0.7 is gone: secret detail")
        yield  # pragma: no cover - makes this an async generator


class GenerateRaises:
    """generate itself (not the iterator) raises: a plain bug in an engine adapter."""

    async def ready(self) -> bool:
        return True

    def generate(self, route, body, request_id, timeout_s=None, **_routing):
        raise KeyError("secret-internal-state")


class NotReady(FakeEngine):
    async def ready(self) -> bool:
        return False


class ReadyRaises(FakeEngine):
    async def ready(self) -> bool:
        raise ConnectionError("replica unreachable")


def error_event(message: str, code: int) -> str:
    kind = "BadRequestError" if code == 400 else "InternalServerError"
    return "data: " + json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}) + "\n\n"


def one_model_app(engine, kind: str = "generate", **gateway: Any):
    config = load_config(data={"models": [{"name": "m", "source": "/m", "kind": kind}], "gateway": gateway,
                               "auth": {"enabled": False}, "cache": {"mode": "off"}})
    return create_app(config, {"m": engine})


def test_fake_engines_implement_the_protocol() -> None:
    assert isinstance(FakeEngine("x"), Engine)
    assert isinstance(ScriptedEngine([]), Engine)


def test_create_app_refuses_a_model_without_engine() -> None:
    with pytest.raises(ValueError, match="embedder"):
        create_app(make_config(), {"tiny": FakeEngine("tiny"), "org/other": FakeEngine("org/other")})


# ----------------------------------------------------------------------------- models, health


async def test_list_models_includes_adapters_with_parent(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    cards = {card["id"]: card for card in body["data"]}
    assert list(cards) == ["tiny", "tiny-lora", "org/other", "embedder"]
    for card in cards.values():
        assert card["object"] == "model"
        assert isinstance(card["created"], int)
    assert cards["tiny-lora"]["parent"] == "tiny"
    assert cards["tiny"]["parent"] is None
    assert cards["tiny"]["root"] == "/models/tiny"
    assert cards["org/other"]["parent"] is None
    assert cards["embedder"]["kind"] == "embed"
    assert cards["tiny"]["kind"] == "generate"


@pytest.mark.parametrize("name, parent", [("tiny", None), ("tiny-lora", "tiny"), ("org/other", None)])
async def test_get_one_model(client: httpx.AsyncClient, name: str, parent: str | None) -> None:
    response = await client.get(f"/v1/models/{name}")
    assert response.status_code == 200
    card = response.json()
    assert card["id"] == name
    assert card["parent"] == parent


async def test_get_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models/nope")
    error = assert_envelope(response, 404, code="model_not_found", param="model")
    assert "nope" in error["message"]


async def test_health(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_ready_when_all_models_ready(client: httpx.AsyncClient) -> None:
    response = await client.get("/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "ready": 3, "total": 3,
                               "models": {"tiny": True, "org/other": True, "embedder": True}}


@pytest.mark.parametrize("engine_cls", [NotReady, ReadyRaises])
async def test_ready_503_names_the_model(engine_cls) -> None:
    app = create_app(make_config(), make_engines(embedder=engine_cls("embedder")))
    async with client_for(app) as client:
        response = await client.get("/ready")
    assert response.status_code == 503
    assert response.headers["retry-after"].isdigit()
    body = response.json()
    assert body["models"] == {"tiny": True, "org/other": True, "embedder": False}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "service_unavailable_error"
    assert "embedder" in error["message"]
    assert "tiny" not in error["message"]


# --------------------------------------------------------------------------------------- routing


async def test_chat_routes_to_its_model(client: httpx.AsyncClient, engines) -> None:
    response = await client.post("/v1/chat/completions", json={"model": "org/other", "messages": CHAT},
                                 headers={"x-request-id": "route-chat-1"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "org/other"
    assert len(engines["org/other"].started) == 1
    assert engines["tiny"].started == [] and engines["embedder"].started == []


async def test_adapter_goes_to_its_base_model_engine(client: httpx.AsyncClient, engines) -> None:
    response = await client.post("/v1/completions", json={"model": "tiny-lora", "prompt": "hello"},
                                 headers={"x-request-id": "adapter-1"})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "tiny-lora"  # the engine sees the adapter name, not the base name
    assert len(engines["tiny"].started) == 1
    assert engines["org/other"].started == []


async def test_embeddings_route_to_embed_model(client: httpx.AsyncClient, engines) -> None:
    response = await client.post("/v1/embeddings", json={"model": "embedder", "input": ["a", "b"]},
                                 headers={"x-request-id": "emb-1"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert len(body["data"][0]["embedding"]) == 8
    assert len(engines["embedder"].started) == 1


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
async def test_unknown_model_is_404(client: httpx.AsyncClient, engines, path: str) -> None:
    response = await client.post(path, json={"model": "gpt-17", "messages": CHAT, "prompt": "x", "input": "x"})
    error = assert_envelope(response, 404, code="model_not_found", param="model")
    assert "gpt-17" in error["message"]
    assert all(not e.started for e in engines.values())


@pytest.mark.parametrize("path, model", [
    ("/v1/chat/completions", "embedder"),
    ("/v1/completions", "embedder"),
    ("/v1/embeddings", "tiny"),
    ("/v1/embeddings", "tiny-lora"),
])
async def test_wrong_route_for_model_kind(client: httpx.AsyncClient, engines, path: str, model: str) -> None:
    response = await client.post(path, json={"model": model, "messages": CHAT, "prompt": "x", "input": "x"})
    error = assert_envelope(response, 400, code="wrong_route", param="model")
    assert model in error["message"]
    assert ("/v1/embeddings" in error["message"]) == (model == "embedder")
    assert all(not e.started for e in engines.values())


# ---------------------------------------------------------------------------- request validation


@pytest.mark.parametrize("raw", [b'{"model": "tiny", ', b"", b"not json", b"\xff\xfe{}",
                                 b"[" * 100_000 + b"]" * 100_000])
async def test_malformed_json_is_400(client: httpx.AsyncClient, raw: bytes) -> None:
    response = await client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_envelope(response, 400)


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"tiny"', b"null", b"3"])
async def test_non_object_json_is_400(client: httpx.AsyncClient, raw: bytes) -> None:
    response = await client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    error = assert_envelope(response, 400)
    assert "object" in error["message"]


@pytest.mark.parametrize("body", [{"messages": CHAT}, {"model": 3, "messages": CHAT}, {"model": None},
                                  {"model": ""}, {"model": ["tiny"]}])
async def test_missing_or_non_string_model_is_400(client: httpx.AsyncClient, body: dict) -> None:
    response = await client.post("/v1/chat/completions", json=body)
    assert_envelope(response, 400, param="model")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
async def test_wrong_content_type_is_415(client: httpx.AsyncClient, engines, content_type: str) -> None:
    response = await client.post("/v1/chat/completions", content=json.dumps({"model": "tiny", "messages": CHAT}),
                                 headers={"content-type": content_type})
    error = assert_envelope(response, 415)
    assert content_type in error["message"]
    assert not engines["tiny"].started


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON", None])
async def test_json_content_types_accepted(client: httpx.AsyncClient, content_type: str | None) -> None:
    raw = json.dumps({"model": "tiny", "messages": CHAT}).encode()
    request = client.build_request("POST", "/v1/chat/completions", content=raw)
    if content_type is None:
        assert "content-type" not in request.headers  # raw bytes: httpx sends no content type
    else:
        request.headers["content-type"] = content_type
    response = await client.send(request)
    assert response.status_code == 200, response.text


def padded_body(size: int) -> bytes:
    """A valid chat request of exactly `size` bytes."""
    base = {"model": "tiny", "messages": [{"role": "user", "content": ""}]}
    raw = json.dumps(base).encode()
    base["messages"][0]["content"] = "x" * (size - len(raw))
    raw = json.dumps(base).encode()
    assert len(raw) == size
    return raw


async def test_body_at_limit_is_accepted() -> None:
    app = create_app(make_config(max_body_bytes=1024), make_engines())
    async with client_for(app) as client:
        response = await client.post("/v1/chat/completions", content=padded_body(1024),
                                     headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


async def test_body_over_limit_with_content_length_is_413() -> None:
    engines = make_engines()
    app = create_app(make_config(max_body_bytes=1024), engines)
    async with client_for(app) as client:
        response = await client.post("/v1/chat/completions", content=padded_body(1025),
                                     headers={"content-type": "application/json"})
    assert response.request.headers["content-length"] == "1025"
    error = assert_envelope(response, 413)
    assert "1024" in error["message"]
    assert not engines["tiny"].started


async def test_body_over_limit_without_content_length_is_413() -> None:
    engines = make_engines()
    app = create_app(make_config(max_body_bytes=1024), engines)
    raw = padded_body(5000)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(raw), 500):
            yield raw[i:i + 500]

    async with client_for(app) as client:
        response = await client.post("/v1/chat/completions", content=chunks(),
                                     headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_envelope(response, 413)
    assert not engines["tiny"].started


@pytest.mark.parametrize("method, path", [("GET", "/nope"), ("POST", "/v1/nope"), ("GET", "/v1/chat"),
                                          ("POST", "/v2/chat/completions")])
async def test_unknown_route_is_404_envelope(client: httpx.AsyncClient, method: str, path: str) -> None:
    response = await client.request(method, path)
    error = assert_envelope(response, 404)
    assert path in error["message"]
    assert "detail" not in response.text


@pytest.mark.parametrize("method, path", [("GET", "/v1/chat/completions"), ("PUT", "/v1/embeddings"),
                                          ("DELETE", "/v1/models"), ("POST", "/health")])
async def test_wrong_method_is_405_envelope(client: httpx.AsyncClient, method: str, path: str) -> None:
    response = await client.request(method, path)
    assert_envelope(response, 405)
    assert "allow" in response.headers
    assert method not in response.headers["allow"]
    assert "detail" not in response.text


async def test_engine_400_passed_through(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages"
    assert "messages" in error["message"]
    response = await client.post("/v1/embeddings", json={"model": "embedder", "input": "x", "encoding_format": "hex"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "encoding_format"
    assert "x-request-id" in response.headers


# ------------------------------------------------------------------------------------- streaming


async def chat(client: httpx.AsyncClient, model: str = "tiny", **extra: Any) -> httpx.Response:
    return await client.post("/v1/chat/completions", json={"model": model, "messages": CHAT, **extra})


async def test_chat_stream_framing_and_content(client: httpx.AsyncClient) -> None:
    whole = (await chat(client, max_tokens=7)).json()
    response = await chat(client, max_tokens=7, stream=True, stream_options={"include_usage": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    chunks = sse_json(response.text)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    assert all("usage" not in c or c["usage"] is None for c in chunks[:-1])
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch.get("finish_reason")]
    assert finishes == [whole["choices"][0]["finish_reason"]] == ["length"]
    text = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert len(text.split()) == 7


async def test_completion_stream_matches_non_stream(client: httpx.AsyncClient) -> None:
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 5}
    whole = (await client.post("/v1/completions", json=body)).json()
    response = await client.post("/v1/completions", json={**body, "stream": True})
    chunks = sse_json(response.text)
    assert "usage" not in chunks[-1]  # no include_usage: no usage chunk
    assert [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]] == ["length"]
    assert "".join(ch["text"] for c in chunks for ch in c["choices"]) == whole["choices"][0]["text"]


async def test_first_stream_event_error_becomes_http_status() -> None:
    engine = ScriptedEngine([Reply(200, None), error_event("max_tokens is too large", 400), "data: [DONE]\n\n"])
    async with client_for(one_model_app(engine)) as client:
        response = await client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "stream": True},
                                     headers={"x-request-id": "first-err"})
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["message"] == "max_tokens is too large"
    assert response.headers["x-request-id"] == "first-err"
    assert engine.closed  # the rest of the engine stream was closed, not left dangling


async def test_error_after_first_event_stays_in_band() -> None:
    engine = FakeEngine("tiny", fail_after=2)
    app = create_app(make_config(), make_engines(tiny=engine))
    async with client_for(app) as client:
        response = await chat(client, stream=True, max_tokens=6)
    assert response.status_code == 200
    chunks = sse_json(response.text)
    assert "error" in chunks[-1]
    # the engine said "engine failed" with code 500: in-band 5xx messages are masked like non-streamed ones,
    # with OpenAI's type and no code (vLLM's integer code is the HTTP status again)
    assert chunks[-1]["error"]["message"] == MASKED and chunks[-1]["error"]["code"] is None
    assert chunks[-1]["error"]["type"] == "server_error"
    assert set(chunks[-1]["error"]) == {"message", "type", "param", "code"}
    assert all("error" not in c for c in chunks[:-1])
    assert "".join(ch["delta"].get("content") or "" for c in chunks[:-1] for ch in c["choices"]).count(" ") == 1
    assert not any(ch.get("finish_reason") for c in chunks[:-1] for ch in c["choices"])


def test_in_band_engine_errors_are_masked_only_for_5xx_and_all_in_openais_types() -> None:
    from serving.gateway.relay import _mask_errors

    data = 'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
    e500 = ('data: {"error": {"message": "CUDA error in /opt/secret/kernel.cu", "type": "InternalServerError", '
            '"param": null, "code": 500}}\n\n')
    e400 = ('data: {"error": {"message": "bad logit_bias", "type": "BadRequestError", "param": "logit_bias", '
            '"code": 400}}\n\n')
    assert _mask_errors(data) is data
    masked = _mask_errors(data + e500)
    assert masked.startswith(data) and masked.endswith("\n\n") and "secret" not in masked
    assert json.loads(masked[len(data) + len("data: "):])["error"] == {
        "message": MASKED, "type": "server_error", "param": None, "code": None}
    # a client error says what was wrong, as vLLM said it, with OpenAI's type (tests/unit/test_field_faults.py)
    assert json.loads(_mask_errors(e400)[len("data: "):])["error"] == {
        "message": "bad logit_bias", "type": "invalid_request_error", "param": "logit_bias", "code": None}


async def test_engine_raising_mid_stream_reports_in_band() -> None:
    chunk = "data: " + json.dumps({"choices": [{"index": 0, "text": "hi", "finish_reason": None}]}) + "\n\n"
    engine = ScriptedEngine([Reply(200, None), chunk, chunk], raise_after=RuntimeError("secret-mid-stream"))
    async with client_for(one_model_app(engine)) as client:
        response = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "stream": True})
    assert response.status_code == 200
    chunks = sse_json(response.text)
    assert len(chunks) == 3
    assert set(chunks[-1]) == {"error"}
    assert chunks[-1]["error"]["code"] == "engine_error"
    assert "secret" not in response.text


async def test_engine_raising_before_any_item_is_503() -> None:
    async with client_for(one_model_app(RaisesBeforeFirstItem())) as client:
        response = await client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT},
                                     headers={"x-request-id": "raise-503"})
    error = assert_envelope(response, 503, code="engine_unavailable")
    assert error["type"] == "service_unavailable_error"
    assert response.headers["retry-after"].isdigit()
    assert "secret" not in response.text and "10.0.0.7" not in response.text
    assert response.headers["x-request-id"] == "raise-503"


@pytest.mark.parametrize("items", [[], [Reply(200, None)], ["data: {}\n\n"]], ids=["nothing", "reply-only", "no-reply"])
async def test_engine_breaking_the_protocol_is_503(items: list) -> None:
    async with client_for(one_model_app(ScriptedEngine(items))) as client:
        response = await client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "stream": True})
    assert response.status_code == 503
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_timeout_before_answer_is_504() -> None:
    engine = FakeEngine("tiny", ttft_s=30)
    app = create_app(make_config(request_timeout_s=0.2), make_engines(tiny=engine))
    async with client_for(app) as client:
        response = await asyncio.wait_for(chat(client), 5)
        stream_response = await asyncio.wait_for(chat(client, stream=True, stream_options={"include_usage": True}), 5)
    assert_envelope(response, 504, code="timeout")
    # a stream whose first token never came: a real status too, and the engine request is aborted
    assert_envelope(stream_response, 504, code="timeout")
    assert stream_response.headers["x-request-id"] in engine.aborted


async def test_stream_stalling_mid_way_times_out_in_band() -> None:
    engine = FakeEngine("tiny", itl_s=30)
    app = create_app(make_config(request_timeout_s=0.3), make_engines(tiny=engine))
    async with client_for(app) as client:
        response = await asyncio.wait_for(chat(client, stream=True, max_tokens=5), 5)
    assert response.status_code == 200
    chunks = sse_json(response.text)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[1]["choices"][0]["delta"]["content"]  # the first word came before the stall
    assert set(chunks[-1]) == {"error"} and chunks[-1]["error"]["code"] == "timeout"
    assert response.headers["x-request-id"] in engine.aborted


async def test_a_streams_deadline_is_one_timer_that_leaves_other_cancellations_alone() -> None:
    """relay.Deadline: past the deadline a wait raises TimeoutError (also one begun after it passed) and the
    task is not left cancelled; a cancellation from elsewhere stays a CancelledError."""
    from serving.gateway.relay import Deadline

    class Tap:
        def reported(self, usage):
            pass

    async def stalls():
        yield "data: {}\n\n"
        await asyncio.sleep(30)
        yield "never"

    loop = asyncio.get_running_loop()
    deadline = Deadline(loop.time() + 0.2)
    stream = stalls()
    assert await deadline.next(stream, Tap()) == "data: {}\n\n"
    with pytest.raises(TimeoutError):
        await deadline.next(stream, Tap())
    assert asyncio.current_task().cancelling() == 0  # the deadline's cancellation was taken back
    with pytest.raises(TimeoutError):  # passed already: at once, no wait
        await asyncio.wait_for(deadline.next(stalls(), Tap()), 1)

    waiting = Deadline(loop.time() + 30)
    task = asyncio.create_task(waiting.next(stalls().__aiter__(), Tap()))
    await asyncio.sleep(0.05)
    assert task.done() and task.result() == "data: {}\n\n"
    stalled = stalls()
    await anext(stalled)
    task = asyncio.create_task(waiting.next(stalled, Tap()))
    await asyncio.sleep(0.05)
    task.cancel()  # the client left: not a timeout
    with pytest.raises(asyncio.CancelledError):
        await task
    waiting.cancel()


# ------------------------------------------------------------------------------------ request ids


async def test_request_id_taken_from_request(client: httpx.AsyncClient, engines) -> None:
    response = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT},
                                 headers={"x-request-id": "abc-123.x:y_z"})
    assert response.headers["x-request-id"] == "abc-123.x:y_z"  # echoed only: the engine gets an internal id
    [internal] = engines["tiny"].started
    assert HEX_ID.match(internal) and response.json()["id"] == f"fake-{internal}"


@pytest.mark.parametrize("given", ["has space", "x" * 129, "semi;colon", "new\tline", ""])
async def test_insane_request_id_replaced(client: httpx.AsyncClient, engines, given: str) -> None:
    response = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT},
                                 headers={"x-request-id": given})
    assert response.status_code == 200
    assert HEX_ID.match(response.headers["x-request-id"])
    assert engines["tiny"].started == [response.headers["x-request-id"]]


async def test_request_id_generated_and_unique(client: httpx.AsyncClient) -> None:
    first, second = await client.get("/health"), await client.get("/health")
    assert HEX_ID.match(first.headers["x-request-id"]) and HEX_ID.match(second.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
    assert len(first.headers.get_list("x-request-id")) == 1


@pytest.mark.parametrize("method, path, body, status", [
    ("GET", "/nope", None, 404),
    ("GET", "/v1/completions", None, 405),
    ("POST", "/v1/chat/completions", b"{", 400),
    ("POST", "/v1/chat/completions", b'{"model": "nope"}', 404),
    ("GET", "/v1/models", None, 200),
    ("GET", "/ready", None, 200),
    ("POST", "/v1/chat/completions", b'{"model": "tiny", "messages": [], "stream": true}', 400),
    ("POST", "/v1/chat/completions", b'{"model": "tiny", "messages": [{"content": "x"}], "stream": true}', 200),
])
async def test_request_id_on_every_response(client: httpx.AsyncClient, method, path, body, status) -> None:
    response = await client.request(method, path, content=body, headers={"x-request-id": "rid-every"})
    assert response.status_code == status
    assert response.headers.get_list("x-request-id") == ["rid-every"]


async def test_request_id_read_but_not_echoed_behind_ray_proxy() -> None:
    # behind Ray Serve's proxy, which sets x-request-id on the response itself
    engines = make_engines()
    app = create_app(make_config(), engines, echo_request_id=False)
    async with client_for(app) as client:
        response = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT},
                                     headers={"x-request-id": "from-proxy"})
    assert response.status_code == 200
    assert "x-request-id" not in response.headers
    [internal] = engines["tiny"].started
    assert HEX_ID.match(internal)  # the proxy's x-request-id is the client's (or Ray's): only logged


async def test_unexpected_exception_is_masked_500_with_request_id() -> None:
    app = one_model_app(GenerateRaises())
    async with client_for(app) as client:
        response = await client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT},
                                     headers={"x-request-id": "boom-1"})
        generated = await client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT})
    error = assert_envelope(response, 500)
    assert error["message"] == MASKED
    assert error["type"] == "server_error"
    assert "secret" not in response.text
    assert response.headers["x-request-id"] == "boom-1"
    assert generated.status_code == 500 and HEX_ID.match(generated.headers["x-request-id"])


async def test_engine_5xx_reply_is_masked() -> None:
    body = json.dumps({"error": {"message": "CUDA error at /src/secret.cu:42", "type": "InternalServerError",
                                 "param": None, "code": 500}}).encode()
    async with client_for(one_model_app(ScriptedEngine([Reply(500, body)]))) as client:
        response = await client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT})
    assert response.status_code == 500
    assert "secret" not in response.text
    assert response.json()["error"]["message"] == MASKED


async def test_engine_5xx_first_stream_event_is_masked() -> None:
    engine = ScriptedEngine([Reply(200, None), error_event("CUDA error at /src/secret.cu:42", 500), "data: [DONE]\n\n"])
    async with client_for(one_model_app(engine)) as client:
        response = await client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "stream": True})
    assert response.status_code == 500
    assert "secret" not in response.text
    assert response.json()["error"]["message"] == MASKED


# ----------------------------------------------------------------------------- client disconnect


async def test_client_hanging_up_aborts_engine_stream() -> None:
    # ASGI 2.3, what uvicorn (and so Ray Serve's proxy) gives: Starlette listens for http.disconnect
    engine = FakeEngine("tiny", itl_s=0.02)
    app = create_app(make_config(), make_engines(tiny=engine))
    sent = await stream_and_hang_up(app, {"model": "tiny", "messages": CHAT, "stream": True, "max_tokens": 500},
                                    request_id="hangup-23", after_chunks=3, spec_version="2.3")
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert not any(m.get("body", b"").endswith(b"[DONE]\n\n") for m in sent)
    assert len(engine.started) == 1
    assert await wait_for(lambda: engine.started[0] in engine.aborted)


async def test_client_hanging_up_aborts_engine_stream_asgi_24() -> None:
    engine = FakeEngine("tiny", itl_s=0.02)
    app = create_app(make_config(), make_engines(tiny=engine))
    gc.disable()  # deterministic: the abort must not depend on when the cyclic GC happens to run
    try:
        await stream_and_hang_up(app, {"model": "tiny", "messages": CHAT, "stream": True, "max_tokens": 500},
                                 request_id="hangup-24", after_chunks=3, spec_version="2.4")
        aborted = await wait_for(lambda: engine.started and engine.started[0] in engine.aborted, timeout=0.5)
    finally:
        gc.enable()
    assert aborted


async def test_client_hanging_up_aborts_a_non_streamed_request() -> None:
    """A non-streamed request waits for the whole answer: the gateway listens for the hang-up meanwhile."""
    from serving.gateway.metrics import GatewayMetrics, PrometheusBackend

    engine = FakeEngine("tiny", ttft_s=5.0)  # the answer would come after 5 s
    metrics = GatewayMetrics(PrometheusBackend())
    app = create_app(make_config(), make_engines(tiny=engine), metrics=metrics)
    loop = asyncio.get_running_loop()
    started = loop.time()
    sent = await stream_and_hang_up(app, {"model": "tiny", "messages": CHAT, "max_tokens": 5},
                                    request_id="hangup-whole", after_s=0.2)
    assert loop.time() - started < 2  # the handler ended with the client, not with the engine
    assert len(engine.started) == 1 and engine.aborted == engine.started and engine.in_flight == 0
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] in ([], [499])
    registry = metrics.backend.registry
    assert registry.get_sample_value("serving_requests_total", {"model": "tiny", "route": "chat", "status": "499"}) == 1
    assert registry.get_sample_value("serving_requests_in_flight", {"model": "tiny"}) == 0


async def test_a_non_streamed_answer_is_not_disturbed_by_the_disconnect_listener(client, engines) -> None:
    engines["tiny"].ttft_s = 0.05
    response = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT, "max_tokens": 3})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
    assert engines["tiny"].aborted == []


# ----------------------------------------------------------------------------------- openai SDK


async def test_sdk_lists_models(app) -> None:
    sdk = sdk_for(app)
    models = [m async for m in sdk.models.list()]
    assert [m.id for m in models] == ["tiny", "tiny-lora", "org/other", "embedder"]
    assert (await sdk.models.retrieve("tiny-lora")).id == "tiny-lora"


async def test_sdk_chat_stream_and_non_stream_agree(app) -> None:
    sdk = sdk_for(app)
    whole = await sdk.chat.completions.create(model="tiny", messages=CHAT, max_tokens=9)
    assert whole.choices[0].finish_reason == "length"
    stream = await sdk.chat.completions.create(model="tiny", messages=CHAT, max_tokens=9, stream=True,
                                               stream_options={"include_usage": True})
    pieces, usage, finishes = [], None, []
    async for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == whole.choices[0].message.content
    assert finishes == ["length"]
    assert usage == whole.usage and usage.completion_tokens == 9


async def test_sdk_chat_on_adapter(app) -> None:
    sdk = sdk_for(app)
    base = await sdk.chat.completions.create(model="tiny", messages=CHAT)
    adapter = await sdk.chat.completions.create(model="tiny-lora", messages=CHAT)
    assert adapter.model == "tiny-lora" and base.model == "tiny"


async def test_sdk_completions_stream_and_non_stream_agree(app) -> None:
    sdk = sdk_for(app)
    whole = await sdk.completions.create(model="org/other", prompt="abc", max_tokens=4)
    stream = await sdk.completions.create(model="org/other", prompt="abc", max_tokens=4, stream=True)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == whole.choices[0].text
    assert len(text.split()) == 4


async def test_sdk_embeddings_float_and_base64_agree(app) -> None:
    sdk = sdk_for(app)
    inputs = ["first text", "second text"]
    floats = await sdk.embeddings.create(model="embedder", input=inputs, encoding_format="float")
    decoded = await sdk.embeddings.create(model="embedder", input=inputs)  # SDK asks for base64, decodes it
    raw = await sdk.embeddings.create(model="embedder", input=inputs, encoding_format="base64")
    assert len(floats.data) == 2
    vectors = [d.embedding for d in floats.data]
    assert all(len(v) == 8 for v in vectors) and vectors[0] != vectors[1]
    assert [d.embedding for d in decoded.data] == vectors
    assert all(isinstance(d.embedding, str) for d in raw.data)
    assert [list(struct.unpack("<8f", base64.b64decode(d.embedding))) for d in raw.data] == vectors


async def test_sdk_sees_errors_as_typed_exceptions(app) -> None:
    sdk = sdk_for(app)
    with pytest.raises(openai.NotFoundError) as not_found:
        await sdk.chat.completions.create(model="gpt-17", messages=CHAT)
    assert not_found.value.code == "model_not_found" and not_found.value.param == "model"
    with pytest.raises(openai.BadRequestError) as wrong_route:
        await sdk.embeddings.create(model="tiny", input="x")
    assert wrong_route.value.code == "wrong_route"


async def test_sdk_raises_on_in_band_stream_error() -> None:
    app = create_app(make_config(), make_engines(tiny=FakeEngine("tiny", fail_after=2)))
    sdk = sdk_for(app)
    stream = await sdk.chat.completions.create(model="tiny", messages=CHAT, stream=True)
    seen = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            seen.append(chunk)
    assert len(seen) == 3  # role chunk + two words, then the error


async def test_openapi_schema_lists_the_api(client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        schema = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema["allOf"][1]["required"] == ["model"]  # vLLM's own request schema, plus `model` required
    assert "get" in paths["/v1/models"] and "get" in paths["/ready"]


# ------------------------------------------------------------------- usage of streams cut short

# what vLLM 0.32 streams for chat with n=2 (captured from plain vLLM on the demo model; ids shortened)
_CHAT_N2 = [
    '{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}',
    '{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":1,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}',
    '{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"u"},"logprobs":null,"finish_reason":null,"token_ids":null}]}',
    '{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"et"},"logprobs":null,"finish_reason":null,"token_ids":null}]}',
    '{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":1,"delta":{"content":"u"},"logprobs":null,"finish_reason":null,"token_ids":null}]}',
]


def _accounting(route: str, prompt_estimate: int = 0) -> tuple[Any, list]:
    from types import SimpleNamespace

    from serving.gateway.metrics import GatewayMetrics, PrometheusBackend
    from serving.gateway.routes import Accounting, Watch

    recorded: list = []

    def settle(model, usage, *, cached):  # the Admission's (serving.gateway.limits)
        recorded.append(usage)

    metrics = GatewayMetrics(PrometheusBackend())
    svc = SimpleNamespace(metrics=metrics, spawn=lambda coro: asyncio.get_running_loop().create_task(coro))
    admission = SimpleNamespace(settle=settle)
    tap = Accounting(svc, admission, "m", route, Watch(metrics, route), cache_key=None,
                     prompt_estimate=prompt_estimate)
    return tap, recorded


def _sent(tap, events: list[str], per_chunk: int = 1) -> list[str]:
    """Feed vLLM's events to the tap (`per_chunk` of them joined, as the relay batches them); what the client gets."""
    out = []
    for i in range(0, len(events), per_chunk):
        chunk = "".join(f"data: {e}\n\n" for e in events[i:i + per_chunk])
        assert tap.chunk(chunk) == chunk  # the tap looks, never rewrites: the client gets vLLM's bytes
        out.append(chunk)
    return out


@pytest.mark.parametrize("per_chunk", [1, 2])
async def test_a_cut_stream_counts_the_reported_prompt_and_one_token_per_event_sent(per_chunk) -> None:
    from serving.engine.protocol import Usage

    tap, recorded = _accounting("chat", prompt_estimate=99)
    tap.reported(Usage(21, 0))  # the engine's counts once the prompt was tokenized
    _sent(tap, _CHAT_N2, per_chunk)
    tap.end()  # the client hung up before the stream's end
    await asyncio.sleep(0)
    # the prompt as the engine counted it (not the estimate); 5 events with output reached the client
    assert recorded == [{"prompt_tokens": 21, "completion_tokens": 5, "total_tokens": 26}]


async def test_a_cut_stream_without_engine_counts_bills_the_prompt_estimate() -> None:
    tap, recorded = _accounting("completion", prompt_estimate=12)
    _sent(tap, _CHAT_N2[2:4])
    tap.end()
    await asyncio.sleep(0)
    assert recorded == [{"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}]


async def test_a_whole_stream_counts_the_engines_final_counts() -> None:
    from serving.engine.protocol import Usage

    tap, recorded = _accounting("chat", prompt_estimate=99)
    tap.reported(Usage(21, 0))
    _sent(tap, _CHAT_N2, per_chunk=3)
    tap.reported(Usage(21, 6, final=True))
    tap.end()
    await asyncio.sleep(0)
    assert recorded == [{"prompt_tokens": 21, "completion_tokens": 6, "total_tokens": 27}]


async def test_a_stream_that_reached_no_output_bills_nothing() -> None:
    tap, recorded = _accounting("chat", prompt_estimate=99)
    tap.end()
    await asyncio.sleep(0)
    assert recorded == [None]


@pytest.mark.parametrize("header", ["x-stainless-read-timeout", "x-stainless-timeout"])
async def test_a_non_streamed_request_ends_when_its_sdk_gives_up(header) -> None:
    """Behind HAProxy a non-streamed request's hang-up is not seen; the SDKs' own timeout header ends
    its engine work at the moment the SDK gives up (and would retry) instead of at max_tokens."""
    engine = FakeEngine("tiny", ttft_s=30)
    app = create_app(make_config(request_timeout_s=60), make_engines(tiny=engine))
    async with client_for(app) as client:
        started = asyncio.get_running_loop().time()
        response = await asyncio.wait_for(client.post("/v1/chat/completions", headers={header: "0.3"},
                                                      json={"model": "tiny", "messages": CHAT}), 10)
        elapsed = asyncio.get_running_loop().time() - started
    assert_envelope(response, 504, code="timeout")
    assert elapsed < 5
    assert response.headers["x-request-id"] in engine.aborted and engine.in_flight == 0


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "soon", "1e400"])
def test_a_client_timeout_that_is_no_number_is_ignored(value) -> None:
    from serving.gateway.routes import client_timeout_s

    assert client_timeout_s({"x-stainless-read-timeout": value}) is None
    assert client_timeout_s({"x-stainless-read-timeout": value, "x-stainless-timeout": "2.5"}) == 2.5
