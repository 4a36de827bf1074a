"""values.yaml is documented on every field; values.schema.json rejects typos and wrong types."""

from __future__ import annotations

import importlib.util
import json

import helm_python as helm
import pytest
import yaml

from serving.config import GatewayConfig, ModelConfig, ServingConfig
from tests.helm.render import CHART, ROOT, render

VALUES = CHART / "values.yaml"
SCHEMA = json.loads((CHART / "values.schema.json").read_text())


def _gen_schema():
    spec = importlib.util.spec_from_file_location("gen_schema", ROOT / "helm" / "gen_schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _walk(node: dict, path: str = ""):
    yield path, node
    for key, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}.*")
    for i, option in enumerate(node.get("anyOf", [])):
        yield from _walk(option, f"{path}<{i}>")


def test_values_yaml_points_editors_at_the_schema():
    assert VALUES.read_text().splitlines()[0] == "# yaml-language-server: $schema=values.schema.json"


def test_schema_is_generated_from_the_current_values_and_configuration_model():
    fresh = (CHART / "values.schema.json").read_text() == _gen_schema().render()
    assert fresh, ("values.schema.json is stale (values.yaml or serving/config.py changed): "
                   "run python helm/gen_schema.py")


def test_configuration_sections_are_the_configuration_models():
    props = SCHEMA["properties"]
    items = props["models"]["items"]
    assert list(items["properties"]) == list(ModelConfig.model_fields)
    assert set(items["required"]) == {n for n, f in ModelConfig.model_fields.items() if f.is_required()}
    assert list(props["gateway"]["properties"]) == list(GatewayConfig.model_fields)
    for name, field in ServingConfig.model_fields.items():
        section = props["redis"]["properties"]["config"] if name == "redis" else props[name]
        if name == "models":
            continue
        secret = {"auth": {"keys"}, "redis": {"url", "password"}}.get(name, set())
        assert set(section["properties"]) == set(field.annotation.model_fields) - secret, name
    # secrets cannot be put into values (they would land in the RayService spec)
    assert "keys" not in props["auth"]["properties"]
    assert not {"url", "password"} & set(props["redis"]["properties"]["config"]["properties"])


def test_every_field_is_described_and_every_object_closed():
    undocumented = [p for p, node in _walk(SCHEMA) if p and "description" not in node and not p.endswith(">")
                    and not p.endswith(".*") and not p.endswith("[]")]
    assert not undocumented, undocumented
    open_objects = [p for p, node in _walk(SCHEMA)
                    if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                    and not p.endswith("env[]")]  # env entries are Kubernetes EnvVar objects
    assert not open_objects, open_objects


def test_every_key_of_values_yaml_has_a_doc_comment():
    docs = _gen_schema().values_descriptions(VALUES.read_text())
    values = yaml.safe_load(VALUES.read_text())

    def keys(node, schema, path=()):
        if not isinstance(node, dict) or "properties" not in schema:
            return  # a free Kubernetes map (nodeSelector, probes, ...) or a scalar
        for key, sub in node.items():
            here = path + (key,)
            yield here
            yield from keys(sub, schema["properties"][key], here)

    missing = [".".join(p) for p in keys(values, SCHEMA) if p not in docs]
    assert not missing, f"values.yaml keys without a `# --` comment: {missing}"


def _model(**extra):
    return {"models": [{"name": "m", "source": "org/m", **extra}]}


REJECTED = [
    ({"gatway": {}}, "gatway"),
    (_model(replica=2), "replica"),
    (_model(resources={"gpu": 1}), "gpu"),
    (_model(replicas="two"), "replicas"),
    (_model(kind="chat"), "kind"),
    (_model(env={"VLLM_CPU_KVCACHE_SPACE": 1}), "VLLM_CPU_KVCACHE_SPACE"),
    ({"models": [{"name": "m"}]}, "source"),
    ({"gateway": {"port": "8000"}}, "port"),
    ({"gateway": {"port": 70000}}, "port"),
    ({"image": {"variant": "tpu"}}, "variant"),
    ({"image": {"tag": 1}}, "tag"),
    ({"redis": {"external": {"url": "http://redis:6379"}}}, "url"),
    ({"redis": {"image": {"tag": "latest"}}}, "tag"),
    ({"redis": {"persistance": {}}}, "persistance"),
    ({"workers": {"groups": {"gpu": {"gpusPerPod": 0}}}}, "gpusPerPod"),
    ({"workers": {"groups": {"gpu": {"nodeSelectors": {}}}}}, "nodeSelectors"),
    ({"workers": {"groups": {"GPU_H100": {}}}}, "GPU_H100"),
    ({"ingress": {"enabled": "yes"}}, "enabled"),
    ({"monitoring": {"podMonitor": {"enabeld": True}}}, "enabeld"),
    ({"apiKeys": {"keys": [{"name": "a", "key": "short"}]}}, "key"),
    ({"tests": {"image": "docker.io/curlimages/curl:latest"}}, "image"),
    ({"tests": {"image": "docker.io/curlimages/curl"}}, "image"),
    ({"service": {"type": "Ingress"}}, "type"),
    ({"auth": {"keys": [{"name": "a", "key": "sk-0123456789abcdef"}]}}, "keys"),
    ({"redis": {"config": {"password": "x"}}}, "password"),
    ({"cache": {"mode": "sometimes"}}, "mode"),
    ({"head": {"shmSize": "lots"}}, "shmSize"),
]


@pytest.mark.parametrize("values,where", REJECTED, ids=[w + str(i) for i, (_, w) in enumerate(REJECTED)])
def test_schema_rejects_typos_and_wrong_types(values, where):
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmValuesError) as err:
            chart.validate_schema(values)
    assert where in str(err.value)
    with pytest.raises(helm.HelmValuesError):
        render(values)  # install/upgrade/template refuse them too


def test_schema_accepts_documented_examples():
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema({})
        chart.validate_schema(_model(revision=None, autoscaling={"target_ongoing_requests": 4}))
        chart.validate_schema({"tests": {"image": "registry:5000/curl@sha256:" + "a" * 64}})
        chart.validate_schema({"redis": {"external": {"url": "rediss://user:pw@host:6380/1"}}})
