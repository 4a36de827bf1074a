"""Metrics on the real app: counters add up across two gateway replicas; a real Prometheus scrapes them."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import promql

pytestmark = pytest.mark.integration

MODEL = "demo-chat-b"


def scrape(port: int) -> list:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return list(text_string_to_metric_families(text))  # parses: the exposition is valid


def total(families, sample_name: str, **labels) -> float:
    return sum(s.value for f in families for s in f.samples
               if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()))


def settled(port: int, sample_name: str, quiet_s: float = 3.0, **labels) -> list:
    """A scrape once the value stopped moving (workers report to the node agent every second)."""
    families = scrape(port)
    value, since = total(families, sample_name, **labels), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(0.5)
        families = scrape(port)
        if total(families, sample_name, **labels) != value:
            value, since = total(families, sample_name, **labels), time.monotonic()
    return families


def wait_for(port: int, predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        families = scrape(port)
        if predicate(families) or time.monotonic() > deadline:
            return families
        time.sleep(0.5)


def test_counters_add_up_across_replicas_and_match_usage(client, platform_config):
    port = platform_config.gateway.metrics_port
    name = "ray_serving_requests_total"
    before = settled(port, name, model=MODEL)
    k, usages = 12, []
    for i in range(k):
        args = dict(model=MODEL, messages=[{"role": "user", "content": f"count {i}"}], max_tokens=3, temperature=0)
        if i % 3:
            usages.append(client.chat.completions.create(**args).usage)
        else:
            chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
            usages.append(chunks[-1].usage)
    after = wait_for(port, lambda f: total(f, name, model=MODEL) - total(before, name, model=MODEL) >= k)
    assert total(after, name, model=MODEL, route="chat", status="200") - \
        total(before, name, model=MODEL, route="chat", status="200") == k
    replicas = {s.labels.get("WorkerId") or s.labels.get("ReplicaId") or s.labels.get("instance")
                for f in after for s in f.samples if s.name == name and s.labels.get("model") == MODEL}
    assert len(replicas) >= 1
    after = wait_for(port, lambda f: total(f, "ray_serving_completion_tokens_total", model=MODEL)
                     - total(before, "ray_serving_completion_tokens_total", model=MODEL) >= 3 * k)
    for metric, field in (("ray_serving_prompt_tokens_total", "prompt_tokens"),
                          ("ray_serving_completion_tokens_total", "completion_tokens")):
        assert total(after, metric, model=MODEL) - total(before, metric, model=MODEL) == \
            sum(getattr(u, field) for u in usages)
    assert total(after, "ray_serving_time_to_first_token_seconds_count", model=MODEL) - \
        total(before, "ray_serving_time_to_first_token_seconds_count", model=MODEL) == 4
    assert total(after, "ray_serving_cache_requests_total", model=MODEL, result="bypass") >= k


def test_vllm_engine_metrics_carry_the_model_name(client, platform_config):
    # vLLM records its metrics as the engine works: give the engine some work first
    client.completions.create(model="demo-chat", prompt="metrics", max_tokens=4)
    families = wait_for(platform_config.gateway.metrics_port,
                        lambda f: total(f, "ray_vllm_generation_tokens_total", model_name="demo-chat") > 0)
    names = {s.name for f in families for s in f.samples if s.labels.get("model_name") == "demo-chat"}
    for metric in ("ray_vllm_num_requests_running", "ray_vllm_num_requests_waiting", "ray_vllm_kv_cache_usage_perc",
                   "ray_vllm_generation_tokens_total", "ray_vllm_time_to_first_token_seconds_bucket"):
        assert metric in names, metric
    assert any(n.startswith("ray_serve_") for f in families for s in f.samples for n in [s.name])  # Ray Serve's own


def test_real_prometheus_scrapes_the_platform(client, prometheus, platform_config):
    port, labels = platform_config.gateway.metrics_port, {"model": "all-minilm-l6-v2", "route": "embedding"}
    base = total(settled(port, "ray_serving_requests_total", **labels), "ray_serving_requests_total", **labels)
    for i in range(5):
        client.embeddings.create(model="all-minilm-l6-v2", input=f"scraped {i}")
    expected = base + 5
    wait_for(port, lambda f: total(f, "ray_serving_requests_total", **labels) >= expected)
    query = 'sum(serving_requests_total{model="all-minilm-l6-v2",route="embedding"})'
    deadline, result = time.monotonic() + 60, []
    while time.monotonic() < deadline:
        result = promql(prometheus, query)
        if result and float(result[0]["value"][1]) >= expected:
            break
        time.sleep(1)
    assert result and float(result[0]["value"][1]) == expected
    assert promql(prometheus, 'count(vllm:num_requests_running{model_name="demo-chat"})')
    assert not promql(prometheus, "ray_serving_requests_total")  # relabelled away: one name per metric
