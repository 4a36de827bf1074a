"""Configuration -> Ray Serve application: one gateway ingress plus one ModelServer per model."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import SecretStr
from ray import serve
from ray.serve.handle import DeploymentHandle

from serving import __version__
from serving.config import ModelConfig, ServingConfig
from serving.engine.channel import ChannelClient
from serving.engine.remote import RemoteEngine, ReplicaCounter
from serving.engine.server import ModelServer

APP_NAME = "serving"


@serve.ingress()
class Gateway:
    """The ingress deployment; the FastAPI app is built in the replica by create_app."""

    def __init__(self, config: dict[str, Any], models: dict[str, DeploymentHandle]):
        self.config = ServingConfig.model_validate(config)
        replicas = ReplicaCounter(APP_NAME)
        channel = ChannelClient() if self.config.gateway.direct_streams else None
        transport = _handle_transport()
        self.engines = {m.name: RemoteEngine(models[m.name].options(**transport), m.deployment_name, replicas, channel,
                                             scales_to_zero=m.scales_to_zero)
                        for m in self.config.models}

    def __serve_build_asgi_app__(self):
        from serving.gateway.app import create_app
        from serving.gateway.metrics import GatewayMetrics, RayBackend

        # metrics through Ray's per-node agent (they add up across replicas); Ray Serve's proxy puts
        # x-request-id on every request and response already
        return create_app(self.config, self.engines, metrics=GatewayMetrics(RayBackend()), echo_request_id=False)


def _handle_transport() -> dict[str, Any]:
    """The handles' transport as this replica's Ray settings choose it (gRPC in throughput mode).

    A handle passed in as an argument keeps the options of the process that made it, and that
    process (the driver, or Serve's controller) may have read Ray's settings before they were set:
    its calls would then go as Ray actor calls (1-2 ms slower each, docs/benchmarks.md)."""
    try:
        from ray.serve._private.constants import RAY_SERVE_USE_GRPC_BY_DEFAULT
    except ImportError:  # Ray moved it: keep the handles as they came
        return {}
    return {"_by_reference": not RAY_SERVE_USE_GRPC_BY_DEFAULT}


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
    if model.autoscaling:
        options["autoscaling_config"] = model.autoscaling.model_dump()
    else:
        options["num_replicas"] = model.replicas
    return options


def _version(*parts: Any) -> str:
    """A deployment version from what its replicas are built from.

    Without one, Ray Serve gives every deployment a random version on each `serve.run`, so any
    change (one model's replica count, a new model) would restart every vLLM engine. With it, a
    redeploy restarts only deployments whose own arguments changed; replica counts scale in place."""
    def reveal(value: Any) -> Any:
        return value.get_secret_value() if isinstance(value, SecretStr) else str(value)

    text = json.dumps([__version__, *parts], sort_keys=True, default=reveal)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_app(config: ServingConfig, *, engine: str = "vllm", fake_options: dict[str, Any] | None = None):
    """The Ray Serve application for a configuration; `engine="fake"` swaps vLLM for the fake engine."""
    models = {}
    for model in config.models:
        args = (model.model_dump(mode="json"), engine, fake_options)
        options = model_deployment_options(model)
        # replica counts are deployment settings, not replica arguments: changing them scales in place
        identity = {k: v for k, v in args[0].items() if k not in ("replicas", "autoscaling")}
        models[model.name] = serve.deployment(ModelServer).options(
            **options, version=_version(identity, engine, fake_options), _internal=True).bind(*args)
    # python mode keeps secrets (API keys, Redis password) that JSON mode would mask
    gateway_args = config.model_dump()
    gateway = serve.deployment(Gateway).options(
        name="gateway",
        num_replicas=config.gateway.replicas,
        max_ongoing_requests=config.gateway.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.gateway.cpus},
        # the gateway holds the whole configuration: any change rolls its replicas, one at a time
        version=_version(gateway_args),
        _internal=True,
    )
    return gateway.bind(gateway_args, models)


def app_builder(args: dict[str, Any]):
    """Entry point for Ray Serve config files (`import_path: serving.app:app_builder`, args = config)."""
    from serving.config import load_config

    return build_app(load_config(data=dict(args)))


def logical_cpus_needed(config: ServingConfig) -> float:
    """Logical CPUs the application reserves; a local Ray is started with at least this many."""
    per_model = sum(
        m.resources.cpus * (m.autoscaling.max_replicas if m.autoscaling else m.replicas) for m in config.models
    )
    return per_model + config.gateway.cpus * config.gateway.replicas + 1  # + the Serve controller
