"""The same requests to plain vLLM's own OpenAI server and to the platform give the same answers."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.integration.conftest import API_KEY, NO_CACHE
from tests.support import free_port

pytestmark = pytest.mark.integration

PROMPTS = ["Hello, who are you?", "Tell me about the sea.", "List three colours."]
# Anthropic's SDK no longer takes `temperature` as an argument; its API (and vLLM's Messages layer) still does
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def plain_vllm(platform_config, tmp_path_factory):
    """`python -m vllm.entrypoints.openai.api_server` with the exact arguments the platform uses."""
    from serving.engine.vllm_args import serve_argv

    argv, nulls = serve_argv(platform_config.model("demo-chat"))
    assert not nulls
    port = free_port()
    log = (tmp_path_factory.mktemp("plain-vllm") / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", *argv,
                             "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"plain vLLM exited; see {log.name}"
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        pytest.fail("plain vLLM did not start in 300 s")
    yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    proc.terminate()
    proc.wait(timeout=60)
    log.close()


@pytest.mark.parametrize("model", ["demo-chat", "demo-chat-lora"])
def test_chat_same_text_and_tokens(client, plain_vllm, model):
    for prompt in PROMPTS:
        args = dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=20, temperature=0)
        ours, theirs = client.chat.completions.create(**args), plain_vllm.chat.completions.create(**args)
        assert ours.choices[0].message.content == theirs.choices[0].message.content
        assert ours.choices[0].finish_reason == theirs.choices[0].finish_reason
        assert ours.usage.model_dump() == theirs.usage.model_dump()


def test_streamed_chat_same_text_finish_and_usage(client, plain_vllm):
    args = dict(model="demo-chat", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=20, temperature=0,
                stream=True, stream_options={"include_usage": True})

    def streamed(api):
        chunks = list(api.chat.completions.create(**args))
        # chunk boundaries are not part of the contract: vLLM merges deltas when its reader lags
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        return text, finishes, chunks[-1].usage.model_dump()

    ours, theirs = streamed(client), streamed(plain_vllm)
    assert ours[0] and ours == theirs


@pytest.mark.parametrize("stream_options", [None, {"include_usage": True},
                                            {"include_usage": True, "continuous_usage_stats": True}])
def test_streamed_usage_is_what_the_client_asked_for(client, plain_vllm, stream_options):
    """The gateway always asks vLLM for a stream's usage, running and final (token limits must hold for a
    stream cut short too); the client gets the usage it asked for, as from plain vLLM."""
    body = dict(model="demo-chat", messages=[{"role": "user", "content": PROMPTS[2]}], max_tokens=8, temperature=0,
                stream=True, **({"stream_options": stream_options} if stream_options else {}))

    def events(api):
        with httpx.stream("POST", f"{api.base_url}chat/completions", json=body, timeout=120,
                          headers={"authorization": f"Bearer {api.api_key}", **NO_CACHE}) as response:
            assert response.status_code == 200
            return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]

    ours, theirs = events(client), events(plain_vllm)
    for got in (ours, theirs):  # chunk boundaries may differ (vLLM merges deltas when its reader lags)
        with_usage = [e.get("usage") is not None for e in got]
        if stream_options is None:
            assert not any(with_usage) and all(e["choices"] for e in got)
        elif "continuous_usage_stats" in stream_options:
            assert all(with_usage) and got[-1]["choices"] == []
        else:
            assert with_usage == [False] * (len(got) - 1) + [True] and got[-1]["choices"] == []
    assert ours[-1].get("usage") == theirs[-1].get("usage")
    assert {u["prompt_tokens"] for u in (e.get("usage") for e in ours) if u} == \
        {u["prompt_tokens"] for u in (e.get("usage") for e in theirs) if u}
    # the choice chunks have vLLM's fields (the placement of system_fingerprint aside)
    ours_fields, theirs_fields = ({frozenset(e) - {"system_fingerprint"} for e in got if e["choices"]}
                                  for got in (ours, theirs))
    assert ours_fields == theirs_fields


def test_completions_same_text_and_tokens(client, plain_vllm):
    for prompt in PROMPTS:
        args = dict(model="demo-chat", prompt=prompt, max_tokens=16, temperature=0, logprobs=2)
        ours, theirs = client.completions.create(**args), plain_vllm.completions.create(**args)
        assert ours.choices[0].text == theirs.choices[0].text
        assert ours.choices[0].logprobs.tokens == theirs.choices[0].logprobs.tokens
        assert ours.usage.model_dump() == theirs.usage.model_dump()


def test_same_validation_errors_in_openais_types(client, plain_vllm):
    """vLLM's message and param, with OpenAI's error type and a string code instead of vLLM's exception
    name and numeric status (docs/api.md)."""
    errors = {}
    for name, args in (("too long", dict(messages=[{"role": "user", "content": "word " * 3000}])),
                       ("max_tokens", dict(messages=[{"role": "user", "content": "x"}], max_tokens=10**6))):
        for api in (client, plain_vllm):
            with pytest.raises(openai.BadRequestError) as caught:
                api.chat.completions.create(model="demo-chat", **args)
            errors[name, api is client] = caught.value.body
        ours, theirs = errors[name, True], errors[name, False]
        assert (ours["message"], ours["param"]) == (theirs["message"], theirs["param"]), name
        assert theirs["type"] == "BadRequestError" and theirs["code"] == 400
        assert ours["type"] == "invalid_request_error" and ours["code"] == "context_length_exceeded", ours


def test_responses_same_text_and_usage(client, plain_vllm):
    """The Responses API: plain vLLM answers it itself; the platform passes it to the same vLLM layer
    (with the conversation kept by the gateway), so one turn gives the same text and usage."""
    for prompt in PROMPTS[:2]:
        args = dict(model="demo-chat", input=prompt, max_output_tokens=12, temperature=0, store=False)
        ours, theirs = client.responses.create(**args), plain_vllm.responses.create(**args)
        assert ours.output_text == theirs.output_text and ours.output_text
        assert (ours.usage.input_tokens, ours.usage.output_tokens) == \
            (theirs.usage.input_tokens, theirs.usage.output_tokens)


def test_messages_same_text_and_usage(platform, plain_vllm):
    import anthropic

    def messages(base: str):
        claude = anthropic.Anthropic(base_url=base, api_key=API_KEY, max_retries=0, default_headers=NO_CACHE)
        return claude.messages.create(model="demo-chat", max_tokens=12, extra_body=GREEDY,
                                      messages=[{"role": "user", "content": PROMPTS[0]}])

    ours, theirs = messages(platform.removesuffix("/v1")), messages(str(plain_vllm.base_url).removesuffix("/v1/"))
    assert ours.content[0].text == theirs.content[0].text and ours.content[0].text
    assert (ours.usage.input_tokens, ours.usage.output_tokens) == \
        (theirs.usage.input_tokens, theirs.usage.output_tokens)


def test_tokenize_and_detokenize_same(http, plain_vllm):
    root = str(plain_vllm.base_url).removesuffix("/v1/")
    for path, body in (("/tokenize", {"model": "demo-chat", "prompt": PROMPTS[1]}),
                       ("/tokenize", {"model": "demo-chat", "messages": [{"role": "user", "content": PROMPTS[0]}]}),
                       ("/detokenize", {"model": "demo-chat", "tokens": [5, 6, 7, 8]})):
        ours, theirs = http.post(path, json=body), httpx.post(f"{root}{path}", json=body, timeout=60)
        assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text)
        assert ours.json() == theirs.json()
