"""Offline validators for rendered objects: Kubernetes' own schemas and KubeRay's RayService CRD."""

from __future__ import annotations

import functools
from typing import Any

import jsonschema
import yaml
from kubernetes_validate import utils as kv

from tests.helm.render import CRD_PATH

# The chart's floor (Chart.yaml kubeVersion) and the newest Kubernetes the package has schemas for.
KUBE_VERSIONS = ("1.29.0", kv.latest_version())

# Kinds whose schemas are not in kubernetes-validate. RayService is checked against KubeRay's CRD;
# the Prometheus Operator and Gateway API kinds by structural assertions in test_exposure_monitoring.py.
CRD_KINDS = {"RayService"}
STRUCTURAL_KINDS = {"HTTPRoute", "PodMonitor", "ServiceMonitor", "PrometheusRule"}


def k8s_errors(obj: dict[str, Any]) -> list[str]:
    """kubernetes-validate in strict mode (unknown fields are errors) for every version in KUBE_VERSIONS."""
    errors = []
    for version in KUBE_VERSIONS:
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            errors.append(f"k8s {version}: {obj['kind']} {obj['metadata']['name']} at {where}: {exc.message}")
    return errors


def _strict(node: Any) -> Any:
    """A CRD schema that rejects unknown fields, as the API server does with fieldValidation=Strict.

    Structural CRD schemas leave additionalProperties unset (the API server prunes or rejects unknown
    fields itself); plain jsonschema would accept any typo without this.
    """
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@functools.lru_cache(maxsize=None)
def rayservice_validator() -> jsonschema.Validator:
    crd = yaml.load(CRD_PATH.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def rayservice_errors(obj: dict[str, Any]) -> list[str]:
    assert obj["apiVersion"] == "ray.io/v1" and obj["kind"] == "RayService"
    return [
        f"RayService CRD: at {'/'.join(str(p) for p in err.absolute_path)}: {err.message}"
        for err in rayservice_validator().iter_errors(obj)
    ]


def pod_template_errors(template: dict[str, Any], name: str) -> list[str]:
    """A RayService pod template checked as a Pod against Kubernetes' own (strict) schema."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {**template.get("metadata", {}), "name": name},
           "spec": template["spec"]}
    return k8s_errors(pod)
