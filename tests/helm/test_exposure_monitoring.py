"""Ingress, HTTPRoute, NetworkPolicies, PDBs and the monitoring objects.

HTTPRoute and the Prometheus Operator kinds have no schema in kubernetes-validate: their structure
is asserted here field by field (validate.STRUCTURAL_KINDS).
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.helm.render import CHART, NAMESPACE, RELEASE, ROOT, one, render, scenario_objects
from tests.helm.validate import STRUCTURAL_KINDS

FULLNAME = f"{RELEASE}-serving"
RAY_PODS = {"app.kubernetes.io/name": "serving", "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": "ray"}


def test_optional_pieces_are_off_by_default():
    kinds = {o["kind"] for o in scenario_objects("default")}
    # NetworkPolicies are on by default (tests/helm/test_security.py), and so is the files' claim
    # (tests/helm/test_file_storage.py)
    assert kinds == {"RayService", "Secret", "Service", "StatefulSet", "PodDisruptionBudget", "Pod", "NetworkPolicy",
                     "PersistentVolumeClaim"}


def test_the_gateway_service_is_kuberays_serve_service():
    service = one(scenario_objects("default"), "RayService")["spec"]["serveService"]
    assert service["metadata"]["name"] == FULLNAME
    assert service["spec"] == {"type": "ClusterIP", "ports": [{"name": "serve", "port": 8000}]}
    # KubeRay sets the selector itself (the active cluster); one of ours would be ignored
    assert "selector" not in service["spec"]


def test_ingress_routes_to_the_gateway_service():
    ingress = one(scenario_objects("exposure"), "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "llm.example.com"
    (path,) = rule["http"]["paths"]
    assert path["backend"] == {"service": {"name": FULLNAME, "port": {"number": 8000}}}
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert ingress["spec"]["tls"] == [{"secretName": "llm-example-com-tls", "hosts": ["llm.example.com"]}]


def test_httproute_structure():
    route = one(scenario_objects("exposure"), "HTTPRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert set(route) - {"_template"} == {"apiVersion", "kind", "metadata", "spec"}
    assert set(route["spec"]) == {"parentRefs", "hostnames", "rules"}
    assert route["spec"]["parentRefs"] == [{"name": "public-gateway", "namespace": "gateway-system",
                                            "sectionName": "https"}]
    (rule,) = route["spec"]["rules"]
    assert rule == {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "backendRefs": [{"name": FULLNAME, "port": 8000}],
                    "timeouts": {"request": "600s"}}


def test_network_policies_open_only_the_gateway_and_keep_redis_to_ray():
    objects = scenario_objects("exposure")
    ray = one(objects, "NetworkPolicy", "-ray")
    assert ray["spec"]["podSelector"] == {"matchLabels": RAY_PODS}
    rules = ray["spec"]["ingress"]
    assert rules[0] == {"from": [{"podSelector": {"matchLabels": RAY_PODS}}]}  # Ray to Ray, any port
    assert rules[1]["from"][0]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}
    assert rules[1]["ports"] == [{"port": 8265, "protocol": "TCP"}, {"port": 8000, "protocol": "TCP"}]
    gateway = next(r for r in rules if r.get("ports") == [{"port": 8000, "protocol": "TCP"}])
    peers = gateway["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}} in peers
    assert {"podSelector": {"matchLabels": {**RAY_PODS, "app.kubernetes.io/component": "test"}}} in peers
    ports = sorted(p["port"] for r in rules[2:] for p in r.get("ports", []))
    assert ports == [8000, 8080, 8265]  # gateway, metrics, dashboard (dashboardFrom) — nothing else from outside
    redis = one(objects, "NetworkPolicy", "-redis")
    heads = [{"key": "ray.io/node-type", "operator": "In", "values": ["head", "redis-cleanup"]}]
    ray_pods = {"podSelector": {"matchLabels": RAY_PODS, "matchExpressions": heads}}
    assert redis["spec"]["ingress"] == [{"from": [ray_pods], "ports": [{"port": 6379, "protocol": "TCP"}]}]


def test_pod_disruption_budgets_cover_the_head_and_each_group():
    objects = scenario_objects("two-gpu-types")
    budgets = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "PodDisruptionBudget"}
    assert budgets[f"{FULLNAME}-head"] == {"maxUnavailable": 0,
                                           "selector": {"matchLabels": {**RAY_PODS, "ray.io/node-type": "head"}}}
    for group in ("gpu-h100", "gpu-l4"):
        assert budgets[f"{FULLNAME}-{group}"] == {"maxUnavailable": 1,
                                                  "selector": {"matchLabels": {**RAY_PODS, "ray.io/group": group}}}
    assert len(budgets) == 3


def _structural(obj: dict, api: str, spec_keys: set[str]) -> dict:
    assert obj["apiVersion"] == api and obj["kind"] in STRUCTURAL_KINDS
    assert set(obj) - {"_template"} == {"apiVersion", "kind", "metadata", "spec"}
    assert set(obj["spec"]) == spec_keys, obj["spec"].keys()
    return obj["spec"]


def _relabelling_of_the_local_prometheus() -> list[dict]:
    path = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    if not path.exists():
        pytest.skip(f"{path} (the observability work's scrape config) is not in this checkout")
    config = yaml.safe_load(path.read_text())
    (job,) = config["scrape_configs"]
    return [{"sourceLabels": r["source_labels"], "regex": r["regex"], "targetLabel": r["target_label"],
             "replacement": r["replacement"]} for r in job["metric_relabel_configs"]]


def test_pod_monitor_scrapes_every_ray_pod():
    monitor = one(scenario_objects("monitoring"), "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = _structural(monitor, "monitoring.coreos.com/v1", {"selector", "podMetricsEndpoints"})
    assert spec["selector"] == {"matchLabels": RAY_PODS}
    (endpoint,) = spec["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics" and endpoint["interval"] == "15s"
    assert {r["targetLabel"] for r in endpoint["relabelings"]} == {"ray_node_type", "ray_group", "ray_cluster"}
    # the gateway's serving_* and vLLM's vllm:* names come back as in the local Prometheus setup
    assert endpoint["metricRelabelings"] == _relabelling_of_the_local_prometheus()


def test_service_monitor_scrapes_a_headless_metrics_service():
    objects = scenario_objects("monitoring")
    service = one(objects, "Service", "-metrics")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == RAY_PODS
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics"}]
    spec = _structural(one(objects, "ServiceMonitor"), "monitoring.coreos.com/v1", {"selector", "endpoints"})
    assert all(service["metadata"]["labels"][k] == v for k, v in spec["selector"]["matchLabels"].items())
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["interval"] == "30s"


def test_prometheus_rule_holds_the_alert_files_as_they_are():
    spec = _structural(one(scenario_objects("monitoring"), "PrometheusRule"), "monitoring.coreos.com/v1", {"groups"})
    expected = [g for path in sorted((CHART / "files" / "alerts").glob("*.yaml"))
                for g in yaml.safe_load(path.read_text())["groups"]]
    assert expected and spec["groups"] == expected
    for group in spec["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
            assert rule["expr"]


def test_grafana_dashboards_configmap_holds_the_dashboard_files_as_they_are():
    configmap = one(scenario_objects("monitoring"), "ConfigMap", "-dashboards")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "LLM serving"}
    files = sorted((CHART / "files" / "dashboards").glob("*.json"))
    assert files and set(configmap["data"]) == {p.name for p in files}
    for path in files:
        assert json.loads(configmap["data"][path.name]) == json.loads(path.read_text())


def test_monitoring_files_live_only_in_files():
    # one copy: the observability work writes files/; templates only load them
    json_files = {str(p.relative_to(CHART)) for p in CHART.rglob("*.json")}
    assert json_files - {"values.schema.json"} == {
        str(p.relative_to(CHART)) for p in (CHART / "files" / "dashboards").glob("*.json")}
    templates = "".join(p.read_text() for p in (CHART / "templates").rglob("*") if p.is_file())
    for path in (CHART / "files" / "alerts").glob("*.yaml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            assert group["name"] not in templates
            for rule in group["rules"]:
                assert rule.get("alert", rule.get("record")) not in templates


def test_a_broken_alert_file_fails_the_render(tmp_path):
    import shutil

    import helm_python as helm

    broken = tmp_path / "serving"
    shutil.copytree(CHART, broken)
    (broken / "files" / "alerts" / "zz-broken.yaml").write_text("not: [rules\n")
    with helm.Chart.load(str(broken)) as chart, pytest.raises(helm.HelmRenderError) as err:
        chart.render({"monitoring": {"prometheusRule": {"enabled": True}}}, name=RELEASE, namespace=NAMESPACE)
    assert "zz-broken.yaml" in str(err.value)


def test_custom_metrics_port_reaches_ray_and_the_monitors():
    objects = render({"gateway": {"metrics_port": 9090}, "monitoring": {"serviceMonitor": {"enabled": True}},
                      "networkPolicy": {"enabled": True}})
    cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["metrics-export-port"] == "9090"
    for group in cluster["workerGroupSpecs"]:
        assert group["rayStartParams"]["metrics-export-port"] == "9090"
        assert {"name": "metrics", "containerPort": 9090} in group["template"]["spec"]["containers"][0]["ports"]
    assert one(objects, "Service", "-metrics")["spec"]["ports"][0]["port"] == 9090
    ports = [p["port"] for r in one(objects, "NetworkPolicy", "-ray")["spec"]["ingress"] for p in r.get("ports", [])]
    assert 9090 in ports and 8080 not in ports


def test_notes_tell_how_to_reach_the_api():
    from tests.helm.render import render_files

    notes = render_files({})["serving/templates/NOTES.txt"]
    assert f"kubectl -n {NAMESPACE} port-forward svc/{FULLNAME} 8000:8000" in notes
    assert "/v1/models" in notes and "test-key" in notes
    assert f"serving status --namespace {NAMESPACE} --name {FULLNAME}" in notes
    ingress_notes = render_files({"ingress": {"enabled": True}})["serving/templates/NOTES.txt"]
    assert "http://serving.example.com/v1" in ingress_notes
