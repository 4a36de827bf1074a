"""The chart lints clean, renders every scenario, and every object is valid for its API."""

from __future__ import annotations

import copy

import helm_python as helm
import pytest
from kubernetes_validate import utils as kv

from tests.helm.render import CHART, NAMESPACE, SCENARIOS, k8s, one, scenario_objects, scenario_values
from tests.helm.validate import (
    CRD_KINDS,
    STRUCTURAL_KINDS,
    k8s_errors,
    pod_template_errors,
    rayservice_errors,
)


def test_scenarios_cover_the_issue():
    # default, one 8B model on an H100, two GPU types with a LoRA adapter, CPU demo, external
    # Redis, monitoring, ingress/httproute/networkpolicy
    assert {"default", "h100-8b", "two-gpu-types", "cpu-demo", "external-redis", "monitoring",
            "exposure"} <= set(SCENARIOS)


@pytest.mark.parametrize("values_name", [None, *sorted(SCENARIOS)])
def test_helm_lint_is_clean(values_name):
    values = scenario_values(values_name) if values_name else None
    report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE, kube_version="v1.29.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems
    # only the informational "icon is recommended" may remain
    assert all(m["severity"] == 1 for m in report["messages"]), report["messages"]


def test_every_object_has_a_validator(scenario):
    for obj in scenario_objects(scenario):
        if obj["kind"] in CRD_KINDS | STRUCTURAL_KINDS:
            continue
        try:
            kv.validate(k8s(obj), "1.29.0", strict=True)
        except kv.SchemaNotFoundError:
            pytest.fail(f"{obj['kind']} ({obj['apiVersion']}) from {obj['_template']} has no schema: "
                        "add it to CRD_KINDS/STRUCTURAL_KINDS with a check of its own")
        except kv.ValidationError:
            pass  # reported by the next test


def test_standard_objects_are_valid_kubernetes(scenario):
    errors = [e for obj in scenario_objects(scenario) if obj["kind"] not in CRD_KINDS | STRUCTURAL_KINDS
              for e in k8s_errors(k8s(obj))]
    assert not errors, "\n".join(errors)


def test_rayservice_is_valid_under_kuberays_crd(scenario):
    rayservice = one(scenario_objects(scenario), "RayService")
    errors = rayservice_errors(k8s(rayservice))
    assert not errors, "\n".join(errors)


def test_ray_pod_templates_are_valid_pods(scenario):
    cluster = one(scenario_objects(scenario), "RayService")["spec"]["rayClusterConfig"]
    errors = pod_template_errors(cluster["headGroupSpec"]["template"], "head")
    for group in cluster["workerGroupSpecs"]:
        errors += pod_template_errors(group["template"], group["groupName"])
    assert not errors, "\n".join(errors)


def test_the_validators_can_fail():
    rayservice = k8s(one(scenario_objects("default"), "RayService"))
    typo = copy.deepcopy(rayservice)
    typo["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    assert any("rayStartParam" in e for e in rayservice_errors(typo))
    wrong_type = copy.deepcopy(rayservice)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "two"
    assert any("maxReplicas" in e for e in rayservice_errors(wrong_type))
    bad_container = copy.deepcopy(rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"])
    bad_container["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    assert pod_template_errors(bad_container, "head")
    service = k8s(next(o for o in scenario_objects("default") if o["kind"] == "Service"))
    service["spec"]["ports"][0]["port"] = "redis"
    assert k8s_errors(service)


def test_long_release_names_stay_within_kubernetes_limits():
    from tests.helm.render import render

    release = "a-very-long-release-name-that-helm-still-accepts-53ch"  # Helm's maximum: 53 characters
    assert len(release) == 53
    values = {**scenario_values("monitoring"), **scenario_values("exposure")}
    objects = render(values, name=release)
    # KubeRay derives <name>-raycluster-xxxxx-head-svc and pod names from the RayService name
    assert len(one(objects, "RayService")["metadata"]["name"]) <= 40
    for obj in objects:
        limit = 63 if obj["kind"] in ("Service", "StatefulSet", "Pod") else 253
        assert len(obj["metadata"]["name"]) <= limit, obj["metadata"]["name"]
        if obj["kind"] not in CRD_KINDS | STRUCTURAL_KINDS:
            assert not k8s_errors(k8s(obj))
