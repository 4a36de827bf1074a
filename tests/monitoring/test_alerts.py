"""The alert rules (helm/serving/files/alerts/serving.yaml): promtool check rules, promtool test rules
(tests/monitoring/alerts_test.yaml fires every alert on synthetic series and shows it silent on healthy
ones), mutations that those unit tests must catch, and the Prometheus config that loads the file."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.monitoring.promql import ALERTS, PROMETHEUS_CONFIG, balanced, known_metric_names, metric_names, promtool

UNIT_TESTS = Path(__file__).with_name("alerts_test.yaml")
REQUIRED = {
    "ServingHighErrorRatio",          # error ratio per model
    "ServingTimeToFirstTokenHigh",    # TTFT p95 over the SLO
    "ServingRequestsQueueing",        # sustained queueing
    "ServingKVCacheSaturated",        # KV cache saturation
    "ServingModelNoHealthyReplica",   # no healthy replica for a model
    "ServingRedisErrors",             # Redis errors
}


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_promtool_check_rules():
    result = run("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_alert_unit_tests_pass():
    result = run("test", "rules", str(UNIT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_required_alerts_are_complete():
    alerts = {r["alert"]: r for r in rules() if "alert" in r}
    assert REQUIRED <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert rule.get("for"), f"{name}: no `for`, it would fire on one bad scrape"
        assert balanced(rule["expr"]), name
        assert metric_names(rule["expr"]) <= known_metric_names(), (name, metric_names(rule["expr"]))


def test_every_alert_is_unit_tested_firing_and_silent():
    cases = [c for t in yaml.safe_load(UNIT_TESTS.read_text())["tests"] for c in t["alert_rule_test"]]
    for rule in rules():
        if "alert" not in rule:
            continue
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c.get("exp_alerts") for c in mine), f"{rule['alert']} never shown firing"
        assert any(not c.get("exp_alerts") for c in mine), f"{rule['alert']} never shown silent"


# Each mutation weakens or breaks one rule; the unit tests must then fail.
MUTATIONS = {
    "error threshold": ("  ) > 0.05\n", "  ) > 0.5\n"),
    "error guard dropped": ("sum by (model) (increase(serving_requests_total[5m])) >= 10",
                            "sum by (model) (increase(serving_requests_total[5m])) >= 0"),
    "4xx counted as errors": ('status=~"5.."', 'status=~"[45].."'),
    "ttft SLO": ("          ) > 2\n", "          ) > 5\n"),
    "ttft per replica": ("sum by (model, le)", "sum by (model, le, WorkerId)"),
    "redis errors counted not rated": ("rate(serving_redis_errors_total[5m])", "serving_redis_errors_total"),
    "queue not averaged": ("avg_over_time(vllm:num_requests_waiting[5m])",
                           "min_over_time(vllm:num_requests_waiting[5m])"),
    "kv threshold": ("(vllm:kv_cache_usage_perc) > 0.9", "(vllm:kv_cache_usage_perc) > 0.99"),
    "replicas not summed": ('sum by (application, deployment) (ray_serve_deployment_replica_healthy'
                            '{deployment=~"model-.+",deployment!~".+-ingress"}) < 1',
                            'min by (application, deployment) (ray_serve_deployment_replica_healthy'
                            '{deployment=~"model-.+",deployment!~".+-ingress"}) < 1'),
    "gateway alert gone": ('ray_serve_deployment_replica_healthy{deployment="gateway"}) < 1',
                           'ray_serve_deployment_replica_healthy{deployment="gateway"}) < 0'),
}


def _unit_tests_on(text: str, work: Path) -> subprocess.CompletedProcess:
    (work / "alerts.yaml").write_text(text)
    tests = yaml.safe_load(UNIT_TESTS.read_text())
    tests["rule_files"] = ["alerts.yaml"]
    (work / "alerts_test.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    assert run("check", "rules", "alerts.yaml", cwd=work).returncode == 0  # still valid, only wrong
    return run("test", "rules", "alerts_test.yaml", cwd=work)


def test_unit_tests_pass_on_an_unmutated_copy(tmp_path):  # the control for the mutations below
    result = _unit_tests_on(ALERTS.read_text(), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_unit_tests_catch_a_broken_rule(mutation, tmp_path):
    old, new = MUTATIONS[mutation]
    text = ALERTS.read_text()
    assert text.count(old) == 1, f"mutation {mutation!r} no longer applies: update it"
    result = _unit_tests_on(text.replace(old, new), tmp_path)
    assert result.returncode != 0, f"the unit tests did not notice: {mutation}"
    assert "FAILED" in result.stdout + result.stderr


def test_prometheus_config_is_valid_and_loads_the_alert_file():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (rule_file,) = config["rule_files"]
    assert (PROMETHEUS_CONFIG.parent / rule_file).resolve() == ALERTS.resolve()  # relative to the config file
    result = run("check", "config", str(PROMETHEUS_CONFIG), cwd=Path("/"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout and f"{len(rules())} rules found" in result.stdout
