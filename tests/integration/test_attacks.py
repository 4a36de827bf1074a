"""Attacks of docs/security.md performed against the running platform (HAProxy, two gateway replicas,
direct streams, real vLLM engines, a real Redis), as an attacker would: each must fail."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.integration.conftest import API_KEY, NO_CACHE
from tests.integration.test_gateway_redis import _new_key

pytestmark = pytest.mark.integration

PROMPTS = ["Tell me about the sea.", "List three colours."]


async def _stream(http: httpx.AsyncClient, key: str, prompt: str, request_id: str | None) -> tuple[str, str]:
    headers = {"authorization": f"Bearer {key}", **NO_CACHE}
    if request_id:
        headers["x-request-id"] = request_id
    body = {"model": "demo-chat", "messages": [{"role": "user", "content": prompt}], "max_tokens": 40,
            "temperature": 0, "stream": True}
    async with http.stream("POST", "/chat/completions", json=body, headers=headers) as response:
        assert response.status_code == 200
        text = "".join([chunk async for chunk in response.aiter_text()])
        return text, response.headers["x-request-id"]


def _content(sse: str) -> str:
    import json

    pieces = []
    for event in sse.split("\n\n"):
        if event.startswith("data: {"):
            for choice in json.loads(event[6:]).get("choices", []):
                pieces.append(choice.get("delta", {}).get("content") or "")
    return "".join(pieces)


async def test_one_x_request_id_on_two_tenants_requests_routes_nothing(platform, redis_server):
    """Two keys send streams with the same x-request-id at the same time, many times: each gets the
    answer to its own prompt (direct streams route by the gateway's own ids), and its id is echoed."""
    other = await _new_key(redis_server, "attack-ids")
    async with httpx.AsyncClient(base_url=platform, timeout=120) as http:
        alone = [_content((await _stream(http, key, prompt, None))[0]) for key, prompt in
                 ((API_KEY, PROMPTS[0]), (other, PROMPTS[1]))]
        assert alone[0] != alone[1]
        for attempt in range(5):
            shared = f"collide-{attempt}"
            results = await asyncio.gather(_stream(http, API_KEY, PROMPTS[0], shared),
                                           _stream(http, other, PROMPTS[1], shared))
            assert [_content(text) for text, _ in results] == alone
            assert [echoed for _, echoed in results] == [shared, shared]


def test_no_key_gets_401_before_any_body_is_parsed(platform):
    huge = b'{"model": "demo-chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": ' + b"9" * 5000 + b"}"
    for headers in ({}, {"authorization": "Bearer sk-srv-not-a-key"}):
        response = httpx.post(f"{platform}/chat/completions", content=huge,
                              headers={"content-type": "application/json", **headers})
        assert response.status_code == 401, response.text
    keyed = httpx.post(f"{platform}/chat/completions", content=huge,
                       headers={"content-type": "application/json", "authorization": f"Bearer {API_KEY}"})
    assert keyed.status_code == 400 and keyed.json()["error"]["message"]


def test_no_redirect_is_built_from_the_host_header(platform):
    response = httpx.post(f"{platform}/chat/completions/", json={"model": "demo-chat"}, follow_redirects=False,
                          headers={"host": "evil.example", "authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 404 and "location" not in response.headers
    assert "evil.example" not in response.text


def test_ready_names_no_model_to_a_caller_without_a_key(platform):
    root = platform.removesuffix("/v1")
    anonymous = httpx.get(f"{root}/ready", timeout=10)
    keyed = httpx.get(f"{root}/ready", timeout=10, headers={"authorization": f"Bearer {API_KEY}"})
    assert anonymous.status_code == keyed.status_code == 200
    assert "models" not in anonymous.json() and anonymous.json()["ready"] == anonymous.json()["total"] == 3
    assert set(keyed.json()["models"]) == {"demo-chat", "demo-chat-b", "all-minilm-l6-v2"}
