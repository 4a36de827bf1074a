"""Property-based: schemathesis drives every route of the gateway's OpenAPI document.

No answer may be a 5xx, and every error uses the OpenAI envelope (Anthropic's on its Messages API). The request
schemas in the document are vLLM's own (serving/gateway/schemas), so generated bodies look like real requests.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from serving.config import load_config
from serving.engine.fake import FakeEngine
from serving.gateway.app import create_app

KEY = "sk-schemathesis-0123456789"

config = load_config(data={
    "models": [{"name": "tiny", "source": "/t", "lora_adapters": {"tiny-lora": "/l"}},
               {"name": "emb", "source": "/e", "kind": "embed"}],
    "auth": {"keys": [{"name": "fuzz", "key": KEY}]},
})
app = create_app(config, {"tiny": FakeEngine("tiny"), "emb": FakeEngine("emb")})
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_every_error_is_an_envelope(case):
    case.headers = {**(case.headers or {}), "authorization": f"Bearer {KEY}"}
    response = case.call()
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        body = response.json()
        if case.path.startswith("/v1/messages"):  # Anthropic's Messages API answers in Anthropic's envelope
            assert body["type"] == "error" and set(body["error"]) == {"type", "message"} and body["error"]["message"]
            return
        error = body["error"]
        assert set(error) >= {"message", "type", "param", "code"} and error["message"]


def test_the_document_describes_the_real_request_bodies():
    document = app.openapi()
    chat = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    ref = chat["allOf"][0]["$ref"]  # vLLM's ChatCompletionRequest, among the document's components
    assert ref == "#/components/schemas/ChatCompletionRequest"
    request = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert request["properties"]["messages"] and "tools" in request["properties"]
    assert "ChatCompletionToolsParam" in str(document["components"]["schemas"].keys()) or \
        len(document["components"]["schemas"]) > 20


@pytest.mark.parametrize("route", ["chat", "completion", "embedding", "responses", "messages", "count_tokens",
                                   "rerank", "score", "tokenize", "detokenize"])
def test_shipped_schemas_match_the_installed_vllm(route):
    from serving.engine.openapi import generate
    from serving.gateway import schemas

    assert generate()["routes"][route] == schemas.load()["routes"][route], \
        "regenerate with: python -m serving.engine.openapi"
