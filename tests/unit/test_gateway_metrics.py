"""Gateway metrics recorded per request (prometheus_client backend, fake engines, in-process store)."""

from __future__ import annotations

import httpx
import pytest

from serving.config import load_config
from serving.engine.fake import FakeEngine
from serving.gateway.app import create_app
from serving.gateway.metrics import GatewayMetrics, PrometheusBackend

KEY = "sk-unit-metrics-0123456789"


@pytest.fixture
def setup():
    config = load_config(data={
        "models": [{"name": "tiny", "source": "/t"}, {"name": "emb", "source": "/e", "kind": "embed"}],
        "auth": {"keys": [{"name": "k", "key": KEY}, {"name": "slow", "key": KEY + "-slow", "rpm": 1}]},
    })
    metrics = GatewayMetrics(PrometheusBackend())
    app = create_app(config, {"tiny": FakeEngine("tiny", itl_s=0.002), "emb": FakeEngine("emb")}, metrics=metrics)
    return app, metrics.backend.registry


def value(registry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_requests_tokens_latency_and_cache_are_counted(setup):
    app, registry = setup
    auth = {"authorization": f"Bearer {KEY}"}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", headers=auth) as c:
        first = await c.post("/v1/chat/completions", json=chat)
        streamed = await c.post("/v1/chat/completions", json={**chat, "stream": True, "max_tokens": 6})
        hit = await c.post("/v1/chat/completions", json=chat)
        missing = await c.post("/v1/chat/completions", json={**chat, "model": "nope"})
        anonymous = await c.post("/v1/embeddings", json={"model": "emb", "input": "x"}, headers={"authorization": ""})
    assert [first.status_code, streamed.status_code, hit.status_code, missing.status_code, anonymous.status_code] == \
        [200, 200, 200, 404, 401]
    assert hit.headers["x-cache"] == "hit"
    assert value(registry, "serving_requests_total", model="tiny", route="chat", status="200") == 3
    assert value(registry, "serving_requests_total", model="_unknown", route="chat", status="404") == 1
    assert value(registry, "serving_auth_failures_total", reason="missing_api_key") == 1
    usage = first.json()["usage"]
    # the cache hit is not engine work: tokens count the miss and the stream only
    assert value(registry, "serving_completion_tokens_total", model="tiny") == usage["completion_tokens"] + 6
    assert value(registry, "serving_prompt_tokens_total", model="tiny") == 2 * usage["prompt_tokens"]
    assert value(registry, "serving_time_to_first_token_seconds_count", model="tiny", route="chat") == 1
    assert value(registry, "serving_inter_token_latency_seconds_count", model="tiny", route="chat") == 1
    assert value(registry, "serving_inter_token_latency_seconds_sum", model="tiny", route="chat") >= 0.002 * 0.5
    assert value(registry, "serving_request_duration_seconds_count", model="tiny", route="chat") == 3
    assert value(registry, "serving_cache_requests_total", model="tiny", result="hit") == 1
    assert value(registry, "serving_cache_requests_total", model="tiny", result="miss") == 2
    assert value(registry, "serving_requests_in_flight", model="tiny") == 0


async def test_rate_limited_and_redis_errors_are_counted(setup):
    app, registry = setup
    auth = {"authorization": f"Bearer {KEY}-slow"}
    body = {"model": "emb", "input": "x"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", headers=auth) as c:
        statuses = [(await c.post("/v1/embeddings", json=body)).status_code for _ in range(3)]
    assert statuses == [200, 429, 429]
    assert value(registry, "serving_rate_limited_requests_total", model="emb") == 2
    assert value(registry, "serving_requests_total", model="emb", route="embedding", status="429") == 2
    services = app.state.services
    services.store.store.cache_get = _broken  # the store fails: counted by operation
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                 headers={"authorization": f"Bearer {KEY}"}) as c:
        response = await c.post("/v1/embeddings", json=body)
    assert response.status_code == 200 and response.headers["x-cache"] == "bypass"
    assert value(registry, "serving_cache_requests_total", model="emb", result="bypass") == 1
    assert value(registry, "serving_redis_errors_total", operation="cache_get") == 1


async def _broken(*args):
    raise ConnectionError("redis is down")
