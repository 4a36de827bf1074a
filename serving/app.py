"""Configuration -> Ray Serve applications: one per model, plus one for the gateways.

Ray Serve rebuilds a whole application when anything in it changes (on KubeRay's serveConfigV2
path every deployment of an application takes the application's code version, which hashes its
args), so a model shares an application with nothing: changing one model's arguments restarts that
model's replicas only, adding or removing a model touches no other, and the gateway application's
args hold only what the gateways read of each model (`GATEWAY_MODEL_FIELDS`), so engine arguments,
replica counts and resources of a model never roll the gateways.

    application "serving"          (route_prefix "/")  deployment "gateway"      serving.app:gateway_builder
    application "model-<name>"     (no route)          deployment "model-<name>" serving.app:model_builder
                                                       behind "model-<name>-ingress" (no CPU: Ray Serve's rule)
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import SecretStr
from ray import serve

from serving import __version__, raycompat
from serving.config import ModelConfig, ServingConfig
from serving.engine.channel import ChannelClient
from serving.engine.remote import RemoteEngine, ReplicaCounter
from serving.engine.server import ModelIngress, ModelServer

APP_NAME = "serving"  # the gateways' application (the HTTP ingress)
INGRESS_SUFFIX = "-ingress"  # of a model application's ingress deployment (serving.engine.server.ModelIngress)
GATEWAY_IMPORT_PATH = "serving.app:gateway_builder"
MODEL_IMPORT_PATH = "serving.app:model_builder"
# What the gateways read of a model: its names (adapters included), kind, model card, cache scope and
# whether it may scale to zero. Everything else (engine and server arguments, replicas, resources,
# env) is the model's own business: changing it must not roll the gateways. The chart picks the same.
GATEWAY_MODEL_FIELDS = ("name", "source", "kind", "revision", "lora_adapters", "cache", "autoscaling", "batches",
                        "routing", "runtime_adapters")
GATEWAY_SECTIONS = ("gateway", "redis", "cache", "responses", "files", "batches", "auth", "limits")


@serve.ingress()
class Gateway:
    """The ingress deployment; the FastAPI app is built in the replica by create_app.

    `config` is the gateway view of the configuration (`gateway_args`); the model deployments are
    found by name in their own applications, so a model redeployed alone is reached without the
    gateways being rebuilt."""

    def __init__(self, config: dict[str, Any]):
        self.config = ServingConfig.model_validate(config)
        replicas = ReplicaCounter()
        channel = ChannelClient() if self.config.gateway.direct_streams else None
        transport = raycompat.handle_transport()
        self.engines = {
            m.name: RemoteEngine(raycompat.deployment_handle(m.deployment_name, m.app_name).options(**transport),
                                 m.deployment_name, replicas, channel, scales_to_zero=m.scales_to_zero)
            for m in self.config.models}

    def __serve_build_asgi_app__(self):
        from serving.gateway.app import create_app
        from serving.gateway.metrics import GatewayMetrics, RayBackend

        # metrics through Ray's per-node agent (they add up across replicas); Ray Serve's proxy puts
        # x-request-id on every request and response already
        return create_app(self.config, self.engines, metrics=GatewayMetrics(RayBackend()), echo_request_id=False)


def model_deployment_options(model: ModelConfig) -> dict[str, Any]:
    """Ray Serve options of a model's deployment (also what the Helm chart's serveConfigV2 holds)."""
    actor: dict[str, Any] = {"num_cpus": model.resources.cpus, "num_gpus": model.resources.gpus}
    if model.resources.accelerator_type:
        actor["accelerator_type"] = model.resources.accelerator_type
    if model.resources.memory_gib:
        actor["memory"] = int(model.resources.memory_gib * 2**30)
    if model.env:
        actor["runtime_env"] = {"env_vars": dict(model.env)}
    options: dict[str, Any] = {
        "name": model.deployment_name,
        "ray_actor_options": actor,
        "max_ongoing_requests": model.max_ongoing_requests,
        "max_queued_requests": model.max_queued_requests,
        # loading weights and warming up vLLM takes minutes on big models
        "health_check_period_s": 10,
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": 60,
    }
    if model.routing == "affinity":  # prefix and adapter affinity (serving.engine.routing)
        options["request_router_config"] = {
            "request_router_class": "serving.engine.routing:AffinityRouter",
            "request_router_kwargs": {"max_imbalance": model.routing_max_imbalance},
            "request_routing_stats_period_s": 2}
    if model.autoscaling:
        options["autoscaling_config"] = model.autoscaling.model_dump()
    else:
        options["num_replicas"] = model.replicas
    return options


def gateway_deployment_options(config: ServingConfig) -> dict[str, Any]:
    """Ray Serve options of the gateway deployment.

    A replaced gateway replica (a rollout, a scale-down) first stays reachable for Ray Serve's
    draining period while HAProxy takes it out of its backends, then refuses new connections (HAProxy
    retries them on another replica) and finishes the streams it carries; Serve kills it only after
    `graceful_shutdown_timeout_s`, which therefore covers the draining period plus
    `gateway.shutdown_grace_s` (Ray's default of 20 s is shorter than its own 30 s draining period,
    which cut the streams of every replaced gateway)."""
    actor: dict[str, Any] = {"num_cpus": config.gateway.cpus}
    if config.gateway.ray_resource:
        actor["resources"] = {config.gateway.ray_resource: 1}
    return {
        "name": "gateway",
        "num_replicas": config.gateway.replicas,
        "max_ongoing_requests": config.gateway.max_ongoing_requests,
        "ray_actor_options": actor,
        "graceful_shutdown_wait_loop_s": 0.5,
        "graceful_shutdown_timeout_s": raycompat.ingress_draining_period_s() + config.gateway.shutdown_grace_s,
    }


def gateway_args(config: ServingConfig) -> dict[str, Any]:
    """The gateway application's args: the configuration less what only the model replicas read.

    Python mode keeps secrets (API keys, Redis password) that JSON mode would mask."""
    args = config.model_dump(include=set(GATEWAY_SECTIONS))
    args["models"] = [model.model_dump(include=set(GATEWAY_MODEL_FIELDS), exclude_unset=True)
                      for model in config.models]
    return args


def gateway_build_args(config: ServingConfig) -> dict[str, Any]:
    """`gateway_args` less the replica count: what the gateway replicas are built from (a change rolls
    them), as opposed to how many run (a deployment setting, applied in place)."""
    args = gateway_args(config)
    args["gateway"] = {k: v for k, v in args["gateway"].items() if k != "replicas"}
    return args


def _plain(value: Any) -> Any:
    """JSON for what json cannot write itself: a secret's value (the replicas need it), else str()."""
    return value.get_secret_value() if isinstance(value, SecretStr) else str(value)


def _version(*parts: Any) -> str:
    """A deployment version from what its replicas are built from.

    Without one, Ray Serve gives every deployment a random version on each `serve.run`, so
    redeploying an unchanged application would restart its replicas. With it, a redeploy restarts
    only deployments whose own arguments changed; replica counts scale in place. (On KubeRay's
    serveConfigV2 path Serve versions each application by its args instead: the same effect.)"""
    text = json.dumps([__version__, *parts], sort_keys=True, default=_plain)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_version(model: ModelConfig, engine: str = "vllm", fake_options: dict[str, Any] | None = None) -> str:
    """The version of a model's deployment: a change restarts its replicas. Replica counts are
    deployment settings, not replica arguments: changing them scales in place."""
    identity = {k: v for k, v in model.model_dump(mode="json").items() if k not in ("replicas", "autoscaling")}
    return _version(identity, engine, fake_options)


def gateway_version(config: ServingConfig) -> str:
    """The version of the gateway deployment: a change rolls the gateways, one replica at a time.
    The replica count is a deployment setting: changing it scales in place."""
    return _version(gateway_build_args(config))


def build_model_app(model: ModelConfig, *, engine: str = "vllm", fake_options: dict[str, Any] | None = None):
    """One model's Ray Serve application: its ModelServer deployment, behind a ModelIngress (no route, no CPU:
    Ray Serve allows the ModelServer's affinity router only on a deployment that is not the ingress)."""
    version = model_version(model, engine, fake_options)
    server = serve.deployment(ModelServer).options(**raycompat.versioned_deployment(
        {**model_deployment_options(model), "version": version}),
    ).bind(model.model_dump(mode="json"), engine, fake_options)
    return serve.deployment(ModelIngress).options(**raycompat.versioned_deployment(
        {"name": f"{model.deployment_name}{INGRESS_SUFFIX}", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0},
         "version": version}),
    ).bind(server)


def build_gateway_app(config: ServingConfig):
    """The gateways' Ray Serve application (the HTTP ingress)."""
    return serve.deployment(Gateway).options(**raycompat.versioned_deployment(
        {**gateway_deployment_options(config), "version": gateway_version(config)}),
    ).bind(gateway_args(config))


def rollout_plan(old: ServingConfig, new: ServingConfig) -> list[str]:
    """What deploying `new` over a running `old` does, one line per application that changes
    (empty: nothing). The same versions decide it as the deployments carry, so the plan is what
    Ray Serve will do."""
    lines = []
    before = {m.name: m for m in old.models}
    after = {m.name: m for m in new.models}
    for name, model in after.items():
        was = before.get(name)
        if was is None:
            lines.append(f"model {name}: added (starts its replicas; no other model restarts)")
        elif model_version(was) != model_version(model):
            lines.append(f"model {name}: changed, its replicas restart (no other model restarts)")
        elif model_deployment_options(was) != model_deployment_options(model):
            lines.append(f"model {name}: replicas or scaling changed, scales in place")
    lines += [f"model {name}: removed (its replicas stop)" for name in before if name not in after]
    if gateway_version(old) != gateway_version(new):
        lines.append("gateways: changed, they roll one at a time (each finishes its streams first)")
    elif gateway_deployment_options(old) != gateway_deployment_options(new):
        lines.append("gateways: replica count changed, scales in place")
    return lines


def build_apps(config: ServingConfig, *, engine: str = "vllm",
               fake_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every application of a configuration by name: the gateways' first, then one per model.
    `engine="fake"` swaps vLLM for the fake engine."""
    apps = {APP_NAME: build_gateway_app(config)}
    for model in config.models:
        apps[model.app_name] = build_model_app(model, engine=engine, fake_options=fake_options)
    return apps


def deploy(config: ServingConfig, *, engine: str = "vllm", fake_options: dict[str, Any] | None = None,
           wait: bool = True) -> list[str]:
    """Deploy (or update) the platform on the connected Ray cluster; returns the model applications
    removed because the configuration no longer names them.

    Every application is (re)deployed at once; deployment versions keep unchanged ones running, so
    only what changed restarts. `wait`: return once every application is running."""
    from ray.serve import RunTarget

    apps = build_apps(config, engine=engine, fake_options=fake_options)
    targets = [RunTarget(app, name=name, route_prefix="/" if name == APP_NAME else None)
               for name, app in apps.items()]
    # the model applications first: the gateways look their deployments up by name
    serve.run_many(targets[1:] + targets[:1], wait_for_applications_running=wait)
    stale = [name for name in serve.status().applications
             if name.startswith(ModelConfig.APP_PREFIX) and name not in apps]
    for name in stale:
        serve.delete(name, _blocking=wait)
    return stale


# Fixed replica counts travel as Serve's per-deployment overrides, not as application args: Serve
# applies an override in place, while any change of an application's args rebuilds (restarts) it.
# (Autoscaling bounds stay in the args: Serve's override of them interacts with `num_replicas`.)
SCALING_FIELDS = ("replicas",)


def serve_config(config: ServingConfig) -> dict[str, Any]:
    """The Ray Serve config (`serve deploy`, Serve's REST API, KubeRay's serveConfigV2) of a
    configuration, as plain JSON data: what the Helm chart renders from its values.

    Each application's args are what its replicas are built from; fixed replica counts are in its
    `deployments` overrides, so that changing them scales in place. Secrets are in it in clear
    (the chart passes them by environment instead): write it only where they may be."""
    gateway = config.gateway
    args = gateway_build_args(config)
    applications: list[dict[str, Any]] = [
        {"name": APP_NAME, "import_path": GATEWAY_IMPORT_PATH, "route_prefix": "/", "args": args,
         "deployments": [{"name": "gateway", "num_replicas": gateway.replicas}]}]
    for model in config.models:
        application: dict[str, Any] = {
            "name": model.app_name, "import_path": MODEL_IMPORT_PATH, "route_prefix": None,
            "args": model.model_dump(mode="json", exclude_unset=True, exclude=set(SCALING_FIELDS))}
        if not model.autoscaling:
            application["deployments"] = [{"name": model.deployment_name, "num_replicas": model.replicas}]
        applications.append(application)
    config_file = {"proxy_location": "EveryNode", "http_options": {"host": gateway.host, "port": gateway.port},
                   "applications": applications}
    return json.loads(json.dumps(config_file, default=_plain))


def gateway_builder(args: dict[str, Any]):
    """Entry point for Ray Serve config files: the gateways' application (args: `gateway_args`)."""
    from serving.config import load_config

    return build_gateway_app(load_config(data=dict(args)))


def model_builder(args: dict[str, Any]):
    """Entry point for Ray Serve config files: one model's application (args: the model's entry)."""
    return build_model_app(ModelConfig.model_validate(dict(args)))


# A local Ray advertises this many units of `gateway.ray_resource`: its one node is where gateways go,
# however many replicas a later change asks for.
LOCAL_GATEWAY_RESOURCE_UNITS = 10_000


def local_resources(config: ServingConfig) -> dict[str, float]:
    """Custom resources a local Ray (one node) is started with for the configuration."""
    name = config.gateway.ray_resource
    return {name: LOCAL_GATEWAY_RESOURCE_UNITS} if name else {}


def logical_cpus_needed(config: ServingConfig) -> float:
    """Logical CPUs the application reserves; a local Ray is started with at least this many."""
    per_model = sum(
        m.resources.cpus * (m.autoscaling.max_replicas if m.autoscaling else m.replicas) for m in config.models
    )
    return per_model + config.gateway.cpus * config.gateway.replicas + 1  # + the Serve controller
