"""What the dashboard and alert tests share: the metric names the platform exports (as Prometheus stores
them after our relabelling), a metric-name extractor for PromQL and a real PromQL parse through promtool."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_FILES = ROOT / "helm" / "serving" / "files"
DASHBOARD = CHART_FILES / "dashboards" / "serving.json"
ALERTS = CHART_FILES / "alerts" / "serving.yaml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"

# vLLM's engine metrics the dashboard and alerts use, as Prometheus stores them: vLLM's Ray stat logger
# names them vllm_<name>, Ray exports ray_vllm_<name>[_total|_bucket|...], we relabel to vllm:<name>...
VLLM_GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
VLLM_COUNTERS = ("prompt_tokens", "generation_tokens", "prefix_cache_queries", "prefix_cache_hits",
                 "request_success", "num_preemptions")
VLLM_HISTOGRAMS = ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                   "request_queue_time_seconds")
# Ray Serve's own (ray_serve_* keep their names) and Prometheus' own
OTHER = ("ray_serve_deployment_replica_healthy", "up")


def _histogram(name: str) -> set[str]:
    return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}


def gateway_metric_names() -> set[str]:
    """The serving_* names, from the gateway's own metric definitions (a rename there shows up here)."""
    from serving.gateway.metrics import GatewayMetrics, PrometheusBackend

    backend = PrometheusBackend()
    GatewayMetrics(backend)
    names: set[str] = set()
    for family in backend.registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= _histogram(family.name)
        else:
            names.add(family.name)
    return names


def vllm_metric_names() -> set[str]:
    names = {f"vllm:{n}" for n in VLLM_GAUGES} | {f"vllm:{n}_total" for n in VLLM_COUNTERS}
    for n in VLLM_HISTOGRAMS:
        names |= _histogram(f"vllm:{n}")
    return names


def known_metric_names() -> set[str]:
    return gateway_metric_names() | vllm_metric_names() | set(OTHER)


def vllm_source_names() -> set[str] | None:
    """Metric names vLLM's stat loggers define (read from its source, without importing vllm), or None."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = (Path(next(iter(spec.submodule_search_locations))) / "v1" / "metrics" / "loggers.py").read_text()
    return set(re.findall(r'name="(vllm:\w+)"', source))


_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "Inf", "NaN", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (identifiers that are neither functions nor keywords)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'", '""', expr)  # string literals
    s = re.sub(r"\{[^{}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges, subqueries
    s = _GROUPING.sub(" ", s)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        before = s[match.start() - 1] if match.start() else " "
        after = s[match.end():].lstrip()[:1]
        if before.isdigit() or before == "." or after == "(" or match.group() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def balanced(expr: str) -> bool:
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for ch in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                return False
    return not stack


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: apt-get install prometheus (Debian's package ships promtool)")
    return path


def promtool_parse(exprs: dict[str, str], work: Path) -> subprocess.CompletedProcess:
    """Parse every expression with Prometheus' own parser: as recording rules under `promtool check rules`
    (Prometheus 2.42 has no /api/v1/parse_query)."""
    rules = [{"record": f"check:{re.sub(r'[^A-Za-z0-9_]', '_', name)}", "expr": expr} for name, expr in exprs.items()]
    path = work / "exprs.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    return subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
