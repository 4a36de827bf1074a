"""Helpers of the Redis-backed gateway tests: configurations, apps, clients, SSE parsing."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai

from serving.config import ServingConfig, load_config
from serving.engine.fake import FakeEngine

# re-exported for the redis tests (`x as x` marks a re-export)
from tests.support import assert_envelope as assert_envelope
from tests.support import sse_json as sse_json
from tests.support import sse_payloads as sse_payloads
from tests.support import stream_and_hang_up as stream_and_hang_up
from tests.support import wait_for as wait_for

CHAT = [{"role": "user", "content": "one two three four"}]  # 4 prompt tokens for the FakeEngine
PROMPT_TOKENS = 4

MODELS = [
    {"name": "tiny", "source": "/models/tiny", "lora_adapters": {"tiny-lora": "/adapters/tiny-lora"}},
    {"name": "other", "source": "/models/other"},
    {"name": "embedder", "source": "/models/embedder", "kind": "embed"},
]


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def make_config(redis_url: str | None, models: list[dict] | None = None, **sections: Any) -> ServingConfig:
    """Three models on `redis_url`; auth off unless a section says otherwise; the rest as given.

    The Redis timeout is generous (the default 0.25 s can pass on a loaded CI machine, and one timeout
    turns the store off for retry_interval_s); the failure tests set their own short one."""
    data = {"models": models or MODELS, "redis": {"url": redis_url, "timeout_s": 2.0, "retry_interval_s": 0.2},
            "auth": {"enabled": False}}
    return load_config(data=_merge(data, sections))


def make_engines(**overrides: Any) -> dict[str, Any]:
    engines: dict[str, Any] = {"tiny": FakeEngine("tiny"), "other": FakeEngine("other"),
                               "embedder": FakeEngine("embedder")}
    engines.update(overrides)
    return engines


def client_for(app, key: str | None = None, **kwargs: Any) -> httpx.AsyncClient:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", headers=headers,
                             timeout=30, **kwargs)


def sdk_for(app, key: str | None = None, *, max_retries: int = 0, **client_kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key=key or "unused", max_retries=max_retries,
                              http_client=client_for(app, **client_kwargs))


def chat_body(*, model: str = "tiny", max_tokens: int = 6, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": CHAT, "max_tokens": max_tokens, "temperature": 0, **fields}


async def post_chat(client: httpx.AsyncClient, headers: dict[str, str] | None = None, **fields: Any) -> httpx.Response:
    return await client.post("/v1/chat/completions", json=chat_body(**fields), headers=headers or {})


async def settle(app) -> None:
    """Wait for the gateway's bookkeeping after responses (usage, token counts, cache writes)."""
    for _ in range(3):
        await app.state.services.drain()
        await asyncio.sleep(0)


def ratelimit_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("x-ratelimit-")}
