"""The Grafana dashboard (helm/serving/files/dashboards/serving.json): structure, variables, and every
panel query parsed by Prometheus' own parser and checked against the metric names the platform exports.
tests/integration/test_dashboard.py runs the same queries against a Prometheus scraping the real platform."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from loadtests.dashboard_plots import KEY_PANELS, load_dashboard, panel, panels, substitute
from tests.monitoring.promql import (
    DASHBOARD,
    balanced,
    gateway_metric_names,
    known_metric_names,
    metric_names,
    promtool_parse,
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# what the dashboard must show (docs/observability.md and the issue): a title per need
REQUIRED = {
    "requests/s per model": r"Requests/s per model",
    "error ratio per model": r"Error ratio per model",
    "TTFT percentiles": r"Time to first token p50/p95/p99 \(gateway\)",
    "ITL percentiles": r"Inter-token latency p50/p95/p99 \(gateway\)",
    "vLLM TTFT": r"Time to first token p50/p95/p99 \(vLLM",
    "vLLM ITL": r"Inter-token latency p50/p95/p99 \(vLLM",
    "tokens/s": r"Tokens/s per model \(gateway\)",
    "queue depth": r"Queue depth per replica",
    "KV cache": r"KV cache use per replica",
    "running requests": r"Running requests per replica",
    "cache hit ratio": r"Response cache hit ratio",
    "rate limited": r"Rate-limited requests",
    "auth failures": r"Auth failures",
    "redis errors": r"Redis errors",
    "replicas": r"Replicas",
    "in flight": r"In-flight requests",
}
# panels about things that have no model label
NO_MODEL_FILTER = {"Replicas: healthy per deployment", "Auth failures/s by reason", "Redis errors/s by operation"}


@pytest.fixture(scope="module")
def dashboard():
    return json.loads(DASHBOARD.read_text())  # valid JSON


def queries(dashboard):
    return [(p, t) for p in panels(dashboard) for t in p["targets"]]


def test_dashboard_is_grafana_10_without_inputs(dashboard):
    assert dashboard["schemaVersion"] >= 36
    assert "__inputs" not in dashboard and "${DS_" not in DASHBOARD.read_text()
    assert dashboard["uid"] and dashboard["title"]
    assert load_dashboard() == dashboard


def test_variables(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    assert model["type"] == "query" and model["datasource"] == DATASOURCE
    assert model["query"]["query"] == model["definition"] == "label_values(serving_requests_total, model)"
    assert model["includeAll"] and model["allValue"] == ".*" and model["multi"]


def test_panels_have_unique_ids_datasource_and_queries(dashboard):
    every = [p for p in dashboard["panels"]] + [c for p in dashboard["panels"] for c in p.get("panels", [])]
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    assert len({p["title"] for p in panels(dashboard)}) == len(panels(dashboard)), "duplicate panel titles"
    assert len(panels(dashboard)) >= len(REQUIRED)
    for p in panels(dashboard):
        assert p["datasource"] == DATASOURCE, p["title"]
        assert p["targets"], p["title"]
        assert p["type"] in {"timeseries", "stat", "gauge", "bargauge", "table"}, p["title"]
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t.get("datasource", DATASOURCE) == DATASOURCE, p["title"]


def test_required_panels_exist(dashboard):
    titles = [p["title"] for p in panels(dashboard)]
    missing = [need for need, pattern in REQUIRED.items() if not any(re.search(pattern, t) for t in titles)]
    assert not missing, f"panels missing for: {missing}"
    for titles_ in KEY_PANELS.values():  # what loadtests/dashboard_plots.py draws for the docs
        for title in titles_:
            panel(dashboard, title)


def test_percentile_panels_show_p50_p95_p99(dashboard):
    for p in panels(dashboard):
        if "p50/p95/p99" in p["title"]:
            quantiles = sorted(re.search(r"histogram_quantile\(([\d.]+),", t["expr"]).group(1) for t in p["targets"])
            assert quantiles == ["0.5", "0.95", "0.99"], p["title"]
            for t in p["targets"]:
                assert "sum by (le, " in t["expr"], "aggregate the buckets of every replica, keep le"


def test_queries_use_known_metrics_and_the_model_variable(dashboard):
    known, gateway = known_metric_names(), gateway_metric_names()
    used = set()
    for p, t in queries(dashboard):
        expr = t["expr"]
        assert balanced(expr), (p["title"], expr)
        names = metric_names(expr)
        assert names and names <= known, (p["title"], names - known)
        used |= names
        if p["title"] not in NO_MODEL_FILTER:
            assert ('model=~"$model"' in expr) or ('model_name=~"$model"' in expr), p["title"]
        # every replica exports its own series: a query of raw series would show one line per process
        assert re.match(r"^\(?\s*(sum|max|histogram_quantile)\b", expr), (p["title"], expr)
        substituted = substitute(expr)
        assert "$" not in substituted, (p["title"], substituted)
    # every gateway metric has a panel (the _sum/_count of histograms are not needed)
    assert {n for n in gateway if not n.endswith(("_sum", "_count"))} <= used


def test_zero_is_data_for_the_usually_quiet_counters(dashboard):
    # a Ray counter never incremented is not exported: "No data" would hide a healthy zero
    for title in ("Rate-limited requests/s per model", "Auth failures/s by reason", "Redis errors/s by operation"):
        (target,) = panel(dashboard, title)["targets"]
        assert target["expr"].endswith("or on() vector(0)"), title


def test_every_query_parses_with_prometheus_parser(dashboard, tmp_path):
    exprs = {f"panel{p['id']}_{t['refId']}": substitute(t["expr"]) for p, t in queries(dashboard)}
    exprs["model_variable"] = "count by (model) (serving_requests_total)"
    result = promtool_parse(exprs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_the_parse_check_catches_a_broken_query(tmp_path):
    result = promtool_parse({"broken": 'sum by (model) (rate(serving_requests_total{model=~".*"}[30s])'}, tmp_path)
    assert result.returncode != 0


def test_substitute_fills_grafana_variables():
    expr = 'sum(rate(x{model=~"$model"}[$__rate_interval])) / ${model} $__interval $__range'
    assert substitute(expr, model="a|b", rate_interval="30s", interval="5s", range_="1h") == \
        'sum(rate(x{model=~"a|b"}[30s])) / a|b 5s 1h'
    with pytest.raises(KeyError):
        substitute("${nope}")


def test_engine_and_ray_serve_names_exist_in_their_sources():
    import importlib.util

    from tests.monitoring.promql import OTHER, VLLM_COUNTERS, VLLM_GAUGES, VLLM_HISTOGRAMS, vllm_source_names

    serve_dir = Path(next(iter(importlib.util.find_spec("ray").submodule_search_locations))) / "serve"  # no import
    serve_source = "".join(p.read_text() for p in (serve_dir / "_private").glob("*.py"))
    for name in OTHER:
        if name.startswith("ray_serve_"):
            assert f'"{name.removeprefix("ray_")}"' in serve_source, name  # Ray adds the ray_ prefix
    defined = vllm_source_names()
    if defined is None:
        pytest.skip("vllm is not installed (the cpu or gpu extra)")
    missing = {f"vllm:{n}" for n in VLLM_GAUGES + VLLM_COUNTERS + VLLM_HISTOGRAMS} - defined
    assert not missing, missing
