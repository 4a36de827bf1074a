"""Every panel of the Grafana dashboard returns data from a real Prometheus scraping the real platform.

A little load of every kind (chat streamed and not, on a model and its LoRA adapter, completions,
embeddings, a response-cache hit, a 401, 429s), then every panel's PromQL runs against the `prometheus`
fixture (our relabelling, 1 s scrapes): a panel that shows nothing is a bug. The metric names the
dashboard and the alerts use must exist there. At the end loadtests/dashboard_plots.py draws the key
panels; with SERVING_DOCS_PLOTS=docs/img the load runs longer and the PNGs go there (the docs' images).
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from loadtests.dashboard_plots import KEY_PANELS, draw, load_dashboard, panels, substitute
from tests.integration.conftest import API_KEY, NO_CACHE, ROOT, promql
from tests.monitoring.promql import ALERTS, metric_names

pytestmark = pytest.mark.integration

RATE_INTERVAL = "30s"  # $__rate_interval for the instant queries
DOCS_PLOTS = os.environ.get("SERVING_DOCS_PLOTS")  # e.g. docs/img: longer load, PNGs written there
DOCS_LOAD_S = float(os.environ.get("SERVING_DOCS_LOAD_S", "75"))
CHAT_MODELS = ("demo-chat", "demo-chat-lora", "demo-chat-b")
EMBED = "all-minilm-l6-v2"
AUTH = {"authorization": f"Bearer {API_KEY}"}
RUN = uuid.uuid4().hex[:8]
ROUNDS, RARE = 3, 3
# a prompt prefix longer than a KV block (128 tokens on CPU): the engine's prefix cache hits it again
SHARED_PREFIX = "The quick brown fox jumps over the lazy dog while the engine keeps its cache warm. " * 16


def _node_requests(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "ray_serving_requests_total")


def _settled(port: int, quiet_s: float = 2.0) -> float:
    value, since = _node_requests(port), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(0.5)
        now = _node_requests(port)
        if now != value:
            value, since = now, time.monotonic()
    return value


def _stream(http: httpx.Client, path: str, body: dict, headers: dict) -> int:
    with http.stream("POST", path, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                     headers=headers) as response:
        for line in response.iter_lines():
            if line == "data: [DONE]":
                break
        return response.status_code


def _chat(model: str, text: str, max_tokens: int = 12) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0}


def run_small_batch(platform: str) -> None:
    """A batch of two chat lines through the Batch API, waited for."""
    import io
    import json

    import openai

    client = openai.OpenAI(base_url=platform, api_key=API_KEY, max_retries=2)
    lines = [{"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": CHAT_MODELS[0], "messages": [{"role": "user", "content": f"batch {RUN} {i}"}],
                       "max_tokens": 4}} for i in range(2)]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    file = client.files.create(file=("dashboard.jsonl", io.BytesIO(data)), purpose="batch")
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).status != "completed":
        assert time.monotonic() < deadline, "the dashboard's batch did not complete"
        time.sleep(0.25)


def one_round(http: httpx.Client, limited_key: str, n: int) -> int:
    """Every kind of request; returns how many. Each gateway replica exports its own series and rate() sees
    no increase in the scrape that creates one: with 3 rounds a few seconds apart, some replica sees every
    kind in two rounds (2 replicas), so every rate shows."""
    fresh = {**AUTH, **NO_CACHE}
    statuses = []
    for model in CHAT_MODELS:
        statuses.append(http.post("/chat/completions", json=_chat(model, f"dashboard {RUN} {n} {model}"),
                                  headers=fresh).status_code)
        statuses.append(_stream(http, "/chat/completions", _chat(model, f"dashboard stream {RUN} {n}", 16), fresh))
    completion = {"model": "demo-chat", "prompt": f"once upon a time {RUN} {n}", "max_tokens": 12, "temperature": 0}
    statuses.append(http.post("/completions", json=completion, headers=fresh).status_code)
    statuses.append(_stream(http, "/completions", completion, fresh))
    statuses.append(http.post("/embeddings", json={"model": EMBED, "input": f"embed {RUN} {n}"},
                              headers=fresh).status_code)
    # vLLM's prefix cache (not the gateway's response cache): the same long prefix, another question
    statuses.append(http.post("/chat/completions", json=_chat("demo-chat", f"{SHARED_PREFIX} {RUN} {n}?", 4),
                              headers=fresh).status_code)
    # the response cache: no cache-control header; a miss fills it, then a hit and a streamed hit
    cached = [_chat("demo-chat", f"the same question {RUN} {n} {i}", 8) for i in range(RARE)]
    statuses += [http.post("/chat/completions", json=body, headers=AUTH).status_code for body in cached]
    time.sleep(0.5)  # the cache is written after the answer
    statuses += [http.post("/chat/completions", json=body, headers=AUTH).status_code for body in cached]
    statuses += [_stream(http, "/chat/completions", body, AUTH) for body in cached]
    # 401s without a key, and the rpm=1 key: one 200 in the first round, 429s after it
    statuses += [http.post("/chat/completions", json=_chat("demo-chat", "no key")).status_code for _ in range(RARE)]
    limited = {"authorization": f"Bearer {limited_key}", **NO_CACHE}
    statuses += [http.post("/embeddings", json={"model": EMBED, "input": f"limited {n} {i}"},
                           headers=limited).status_code
                 for i in range(RARE + (n == 0))]
    assert statuses.count(401) == RARE and statuses.count(429) == RARE, statuses
    assert all(s in (200, 401, 429) for s in statuses), statuses
    return len(statuses)


def background_load(platform: str, seconds: float, workers: int = 6) -> int:
    """Docs mode: a mixed, concurrent load so that the plots show traffic, not two blips."""
    stop, counts = time.monotonic() + seconds, []
    prompts = [f"popular question {RUN} {i}" for i in range(4)]  # repeated: cache hits

    def work(seed: int) -> None:
        rng, sent = random.Random(seed), 0
        with httpx.Client(base_url=platform, timeout=120) as http:
            while time.monotonic() < stop:
                kind = rng.random()
                model = rng.choice(CHAT_MODELS)
                if kind < 0.07:
                    http.post("/chat/completions", json=_chat("demo-chat", f"{SHARED_PREFIX} {seed} {sent}?", 8),
                              headers={**AUTH, **NO_CACHE})
                elif kind < 0.45:
                    _stream(http, "/chat/completions", _chat(model, f"bg {seed} {sent}", rng.randint(16, 96)),
                            {**AUTH, **NO_CACHE})
                elif kind < 0.6:
                    http.post("/chat/completions", json=_chat(model, f"bg {seed} {sent}", rng.randint(8, 48)),
                              headers={**AUTH, **NO_CACHE})
                elif kind < 0.8:
                    http.post("/chat/completions", json=_chat("demo-chat", rng.choice(prompts), 24), headers=AUTH)
                elif kind < 0.97:
                    http.post("/embeddings", json={"model": EMBED, "input": f"bg {seed} {sent}"},
                              headers={**AUTH, **NO_CACHE})
                else:
                    http.post("/embeddings", json={"model": EMBED, "input": "no key"})
                sent += 1
        counts.append(sent)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts)


async def _limited_key(redis_server) -> str:
    from serving.gateway.auth import create_key
    from serving.gateway.store import RedisStore

    store = RedisStore(redis_server.url)
    try:
        key, _ = await create_key(store, f"dashboard-rpm1-{RUN}", rpm=1)
        return key
    finally:
        await store.close()


@pytest.fixture(scope="module")
def loaded(platform, prometheus, platform_config, redis_server) -> dict:
    """Load of every kind, then wait until Prometheus holds all of it."""
    port = platform_config.gateway.metrics_port
    started = time.time()
    before = _settled(port)
    key = asyncio.run(_limited_key(redis_server))
    sent = 0
    run_small_batch(platform)  # the batch panels' metrics (batch lines are not in serving_requests_total)
    if DOCS_PLOTS:
        sent += background_load(platform, DOCS_LOAD_S)
    with httpx.Client(base_url=platform, timeout=120) as http:
        for n in range(ROUNDS):
            if n:
                time.sleep(2.5)  # a later scrape than the one that created the series
            sent += one_round(http, key, n)
    deadline = time.monotonic() + 30
    while _node_requests(port) < before + sent and time.monotonic() < deadline:
        time.sleep(0.5)
    exported = _node_requests(port)
    assert exported >= before + sent, f"the metrics endpoint counts {exported - before} of {sent} requests"
    deadline = time.monotonic() + 30
    stored = None
    while time.monotonic() < deadline:
        result = promql(prometheus, "sum(serving_requests_total)")
        stored = float(result[0]["value"][1]) if result else None
        if stored == exported:
            break
        time.sleep(0.5)
    assert stored == exported, f"Prometheus holds {stored} requests, the metrics endpoint {exported}"
    time.sleep(2)  # one more scrape for the engines' own metrics
    return {"start": started, "loaded": time.time(), "sent": sent}


def _values(result: list) -> list[float]:
    return [float(r["value"][1]) for r in result]


def _by(result: list, label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in result}


def _query_panels(prometheus: str) -> dict[tuple[str, str], list]:
    dashboard = load_dashboard()
    results = {}
    for p in panels(dashboard):
        for t in p["targets"]:
            results[(p["title"], t["refId"])] = promql(prometheus, substitute(t["expr"], rate_interval=RATE_INTERVAL))
    return results


def test_every_panel_query_returns_data(loaded, prometheus):
    results = _query_panels(prometheus)
    empty = [key for key, result in results.items() if not result]
    assert not empty, f"panels with no data: {empty}"
    no_number = [key for key, result in results.items() if not any(math.isfinite(v) for v in _values(result))]
    assert not no_number, f"panels with only NaN: {no_number}"


def test_panels_show_the_load(loaded, prometheus):
    r = _query_panels(prometheus)
    positive = lambda values: all(v > 0 and math.isfinite(v) for v in values)  # noqa: E731
    requests = _by(r[("Requests/s per model", "A")], "model")
    assert positive([requests.get(m, 0) for m in (*CHAT_MODELS, EMBED, "_unknown")]), requests
    errors = {f"{ref} {row['metric'].get('model')}": float(row["value"][1])
              for ref in "AB" for row in r[("Error ratio per model", ref)]}
    assert errors["A demo-chat"] == 0 and errors["B _unknown"] == 1 and 0 < errors[f"B {EMBED}"] < 1, errors
    replicas = _by(r[("Replicas: healthy per deployment", "A")], "deployment")
    assert replicas == {"gateway": 2, "model-demo-chat": 1, "model-demo-chat-b": 1, f"model-{EMBED}": 1}, replicas
    for title in ("Time to first token p50/p95/p99 (gateway)", "Inter-token latency p50/p95/p99 (gateway)",
                  "Request duration p50/p95/p99 (gateway)", "Time to first token p50/p95/p99 (vLLM engines)",
                  "Inter-token latency p50/p95/p99 (vLLM engines)"):
        label = "model_name" if "vLLM" in title else "model"
        quantiles = [_by(r[(title, ref)], label).get("demo-chat", math.nan) for ref in "ABC"]
        assert positive(quantiles) and quantiles == sorted(quantiles), (title, quantiles)
        assert quantiles[-1] < 60, (title, quantiles)
    tokens = {(ref, row["metric"]["model"]): float(row["value"][1])
              for ref in "AB" for row in r[("Tokens/s per model (gateway)", ref)]}
    assert positive([tokens[(ref, m)] for ref in "AB" for m in CHAT_MODELS] + [tokens[("A", EMBED)]]), tokens
    generation = _by(r[("Tokens/s per model (vLLM engines)", "B")], "model_name")
    assert positive([generation.get("demo-chat", 0), generation.get("demo-chat-b", 0)]), generation
    for title in ("Queue depth per replica", "Running requests per replica", "KV cache use per replica"):
        rows = r[(title, "A")]
        assert {"demo-chat", "demo-chat-b"} <= {row["metric"]["model_name"] for row in rows}, title
        assert all(row["metric"].get("ReplicaId") for row in rows), f"{title}: no ReplicaId label"
        assert all(0 <= v < 1000 for v in _values(rows)), title
    assert all(0 <= v <= 1 for v in _values(r[("KV cache use per replica", "A")]))
    finished = r[("Finished requests/s by reason (vLLM)", "A")]
    assert any(row["metric"]["model_name"] == "demo-chat" and float(row["value"][1]) > 0 for row in finished)
    assert _by(r[("Response cache hit ratio per model", "A")], "model")["demo-chat"] > 0
    assert 0 < _by(r[("Prefix cache hit ratio (vLLM)", "A")], "model_name")["demo-chat"] <= 1
    lookups = _by(r[("Cache lookups/s by result", "A")], "result")
    assert positive([lookups.get("hit", 0), lookups.get("miss", 0), lookups.get("bypass", 0)]), lookups
    assert _by(r[("Rate-limited requests/s per model", "A")], "model").get(EMBED, 0) > 0
    assert _by(r[("Auth failures/s by reason", "A")], "reason").get("missing_api_key", 0) > 0
    assert all(v >= 0 for v in _values(r[("Redis errors/s by operation", "A")]))
    in_flight = _by(r[("In-flight requests per model", "A")], "model")
    assert set(CHAT_MODELS) <= set(in_flight) and all(0 <= v < 100 for v in in_flight.values()), in_flight


def test_dashboard_and_alert_metrics_exist_with_their_labels(loaded, prometheus):
    exprs = [t["expr"] for p in panels(load_dashboard()) for t in p["targets"]]
    exprs += [r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    names = set().union(*(metric_names(e) for e in exprs))
    never_incremented = {"serving_redis_errors_total"}  # Ray exports a counter from its first increment
    missing = sorted(n for n in names - never_incremented if not promql(prometheus, f"count({{__name__=\"{n}\"}})"))
    assert not missing, f"metrics the dashboard or alerts use that Prometheus does not have: {missing}"
    labels = {
        "serving_requests_total": {"model", "route", "status"},
        "serving_time_to_first_token_seconds_bucket": {"model", "route", "le"},
        "serving_cache_requests_total": {"model", "result"},
        "vllm:num_requests_waiting": {"model_name", "ReplicaId"},
        "vllm:kv_cache_usage_perc": {"model_name", "ReplicaId"},
        "vllm:time_to_first_token_seconds_bucket": {"model_name", "le"},
        "vllm:request_success_total": {"model_name", "finished_reason"},
        "ray_serve_deployment_replica_healthy": {"deployment", "application"},
    }
    for name, expected in labels.items():
        series = promql(prometheus, f'{{__name__="{name}"}}')
        assert series and all(expected <= set(s["metric"]) for s in series), (name, series[:1])
    assert not promql(prometheus, '{__name__=~"ray_serving_.*|ray_vllm_.*"}')  # all relabelled


def test_alert_expressions_run_and_stay_silent_on_a_healthy_platform(loaded, prometheus):
    rules = {r["alert"]: r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    for expr in rules.values():
        promql(prometheus, expr)  # asserts status success
    for name in ("ServingHighErrorRatio", "ServingModelNoHealthyReplica", "ServingGatewayNoHealthyReplica",
                 "ServingMetricsAbsent", "ServingMetricsTargetDown", "ServingKVCacheSaturated"):
        assert not promql(prometheus, rules[name]), name
    # what the replica alert sums is there for every model
    models = 'deployment=~"model-.+",deployment!~".+-ingress"'  # not the models' empty ingress deployments
    query = f"sum by (application, deployment) (ray_serve_deployment_replica_healthy{{{models}}})"
    healthy = _by(promql(prometheus, query), "deployment")
    assert healthy == {"model-demo-chat": 1, "model-demo-chat-b": 1, f"model-{EMBED}": 1}, healthy


def test_key_panels_draw_as_pngs(loaded, prometheus, tmp_path):
    from PIL import Image, ImageStat

    out = Path(DOCS_PLOTS) if DOCS_PLOTS else tmp_path
    if not out.is_absolute():
        out = ROOT / out
    end = time.time()
    paths = draw(prometheus, loaded["start"] - 5, end, out, step=1, rate_interval="10s")
    assert sorted(p.stem for p in paths) == sorted(KEY_PANELS)
    for path in paths:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            assert rgb.width >= 600 and rgb.height >= 400, path
            colors = rgb.getcolors(maxcolors=1 << 16)
            assert colors is None or len(colors) > 50, f"{path}: an almost empty image"
            assert max(ImageStat.Stat(rgb).stddev) > 10, path
