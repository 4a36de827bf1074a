"""Render the chart in-process with the real Helm v4 SDK (helm-python-sdk); no helm binary, no cluster."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import helm_python as helm  # the test extra installs it; a missing SDK must fail, not skip
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "serving"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
SCENARIOS = {p.name.removesuffix("-values.yaml"): p for p in CI_VALUES}
RELEASE, NAMESPACE = "demo", "llm"
CRD_PATH = Path(__file__).parent / "schemas" / "ray.io_rayservices.yaml"


def scenario_values(name: str) -> dict[str, Any]:
    return yaml.safe_load(SCENARIOS[name].read_text()) or {}


@functools.lru_cache(maxsize=None)
def _chart():
    return helm.Chart.load(str(CHART))


def render_files(values: dict[str, Any] | None = None, *, name: str = RELEASE,
                 namespace: str = NAMESPACE) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` produces (schema checked, NOTES included)."""
    return _chart().render(values or {}, name=name, namespace=namespace)


def render(values: dict[str, Any] | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders (NOTES.txt left out), helm test hooks included."""
    objects = []
    for path, text in sorted(render_files(values, **kwargs).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("_template", path)  # where it came from, for messages
                objects.append(doc)
    return objects


@functools.lru_cache(maxsize=None)
def _render_scenario(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(render(scenario_values(name)))


def scenario_objects(name: str) -> list[dict[str, Any]]:
    """Rendered objects of a ci/*-values.yaml scenario (cached: each scenario renders once)."""
    import copy

    return copy.deepcopy(list(_render_scenario(name)))


def k8s(obj: dict[str, Any]) -> dict[str, Any]:
    """The object without the test's bookkeeping key."""
    return {k: v for k, v in obj.items() if k != "_template"}


def one(objects: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def serve_config(rayservice: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def applications(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The serveConfigV2 applications by name, in their order (the gateways' first)."""
    return {app["name"]: app for app in serve_config(rayservice)["applications"]}


def gateway_args(rayservice: dict[str, Any]) -> dict[str, Any]:
    """Args of the gateways' application (`serving`): the configuration less the models' own fields."""
    return applications(rayservice)["serving"]["args"]


def model_args(rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    """Args of each model's application (its values entry), in values order."""
    return [app["args"] for name, app in applications(rayservice).items() if name != "serving"]


def application_texts(rayservice: dict[str, Any]) -> dict[str, str]:
    """Each application's entry in serveConfigV2 exactly as rendered (text), by name."""
    text = rayservice["spec"]["serveConfigV2"]
    _, found, apps = text.partition("\napplications:\n")
    assert found, text
    out = {}
    for block in re.split(r"(?m)^(?=  - name: )", apps):
        if block.strip():
            (app,) = yaml.safe_load(block)
            out[app["name"]] = block
    return out


def worker_groups(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
