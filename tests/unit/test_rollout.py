"""One model rolls alone: what each kind of change does to the applications' versions (no Ray).

The same versions decide what Ray Serve restarts on `serving up` (deployment versions) and the
same split into applications decides it on KubeRay's path (each application versioned by its args);
tests/integration/test_faults.py shows both on a running platform."""

from __future__ import annotations

import pytest

from serving.app import (
    APP_NAME,
    GATEWAY_MODEL_FIELDS,
    build_apps,
    gateway_args,
    gateway_version,
    model_version,
    rollout_plan,
    serve_config,
)
from serving.config import ServingConfig, load_config

MODELS = [
    {"name": "chat", "source": "/m/chat", "engine_args": {"max_model_len": 1024}, "lora_adapters": {"chat-lora": "/l"}},
    {"name": "chat.b", "source": "/m/b"},
    {"name": "embed", "source": "/m/e", "kind": "embed", "replicas": 2},
]


def config(**changes) -> ServingConfig:
    data = {"models": [dict(m) for m in MODELS],
            "auth": {"enabled": True, "keys": [{"name": "k", "key": "sk-" + "x" * 30}]}}
    for name, change in changes.items():
        if name in ("gateway", "limits", "cache"):
            data[name] = change
        else:
            index = [m["name"] for m in MODELS].index(name.replace("_", "."))
            data["models"][index] = {**data["models"][index], **change}
    return load_config(data=data)


def versions(c: ServingConfig) -> dict[str, str]:
    return {APP_NAME: gateway_version(c), **{m.app_name: model_version(m) for m in c.models}}


def changed_apps(old: ServingConfig, new: ServingConfig) -> set[str]:
    before, after = versions(old), versions(new)
    return {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}


def test_one_application_per_model_and_one_for_the_gateways():
    apps = build_apps(config())
    assert list(apps) == ["serving", "model-chat", "model-chat-b", "model-embed"]
    applications = serve_config(config())["applications"]
    assert [a["name"] for a in applications] == list(apps)
    assert [a["route_prefix"] for a in applications] == ["/", None, None, None]


def test_the_gateways_args_hold_only_what_they_read_of_each_model():
    args = gateway_args(config())
    assert set(args) == {"gateway", "redis", "cache", "responses", "files", "batches", "auth", "limits", "models"}
    for model in args["models"]:
        assert set(model) <= set(GATEWAY_MODEL_FIELDS)
    assert args["models"][0]["lora_adapters"] == {"chat-lora": "/l"}
    assert "engine_args" not in args["models"][0]
    # what the gateways build from the args is the same routing view
    again = load_config(data=args)
    assert [m.served_names for m in again.models] == [m.served_names for m in config().models]


@pytest.mark.parametrize("change, restarted", [
    ({"chat_b": {"engine_args": {"max_model_len": 512}}}, {"model-chat-b"}),
    ({"chat": {"server_args": {"tool_call_parser": "hermes"}}}, {"model-chat"}),
    ({"embed": {"env": {"X": "1"}}}, {"model-embed"}),
    ({"chat": {"resources": {"cpus": 2}}}, {"model-chat"}),
    ({"embed": {"replicas": 3}}, set()),  # scales in place
    ({"chat": {"autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}}},
     {"serving"}),  # the gateways read it (may it scale to zero?); the model scales in place
    ({"chat": {"lora_adapters": {"chat-lora": "/l", "chat-lora-2": "/l2"}}}, {"model-chat", "serving"}),
    ({"gateway": {"request_timeout_s": 30}}, {"serving"}),
    ({"limits": {"window_s": 10}}, {"serving"}),
    ({"gateway": {"replicas": 3}}, set()),  # scales in place
])
def test_each_kind_of_change_restarts_what_it_must_and_nothing_else(change, restarted):
    assert changed_apps(config(), config(**change)) == restarted


def test_adding_or_removing_a_model_touches_no_other_model():
    three = config()
    two = load_config(data={**three.model_dump(mode="python", exclude={"models", "auth"}),
                            "models": [dict(m) for m in MODELS[:2]]})
    assert changed_apps(three, two) - {"serving"} == {"model-embed"}
    assert "model-embed" not in versions(two)


def test_the_plan_says_what_will_happen():
    old = config()
    new = config(chat_b={"engine_args": {"max_model_len": 512}}, embed={"replicas": 3},
                 gateway={"request_timeout_s": 30})
    plan = rollout_plan(old, new)
    assert plan == ["model chat.b: changed, its replicas restart (no other model restarts)",
                    "model embed: replicas or scaling changed, scales in place",
                    "gateways: changed, they roll one at a time (each finishes its streams first)"]
    assert rollout_plan(old, config()) == []


def test_a_replaced_gateway_is_given_the_draining_period_plus_the_grace(monkeypatch):
    from serving.app import gateway_deployment_options

    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "5")
    options = gateway_deployment_options(config(gateway={"shutdown_grace_s": 40}))
    assert options["graceful_shutdown_timeout_s"] == 45


def test_on_the_serve_config_path_replica_counts_are_overrides_and_args_carry_the_rest():
    """KubeRay's path versions an application by its args: a fixed replica count lives in the
    application's `deployments` override (applied in place), so scaling changes no args."""
    from ray.serve.schema import ServeDeploySchema

    def apps(c: ServingConfig) -> dict[str, dict]:
        document = serve_config(c)
        ServeDeploySchema.model_validate(document)
        return {a["name"]: a for a in document["applications"]}

    base, scaled = apps(config()), apps(config(embed={"replicas": 5}, gateway={"replicas": 3}))
    assert {n: a["args"] for n, a in base.items()} == {n: a["args"] for n, a in scaled.items()}
    assert scaled["model-embed"]["deployments"] == [{"name": "model-embed", "num_replicas": 5}]
    assert scaled["serving"]["deployments"] == [{"name": "gateway", "num_replicas": 3}]
    assert "replicas" not in base["model-embed"]["args"] and "replicas" not in base["serving"]["args"]["gateway"]
    changed = apps(config(chat_b={"engine_args": {"max_model_len": 512}}))
    assert [n for n in base if base[n] != changed[n]] == ["model-chat-b"]


def test_model_names_that_collide_as_application_names_are_refused():
    from serving.config import ConfigError

    with pytest.raises(ConfigError, match=r"models\[1\] \(org\.m\).*model-org-m.*models\[0\]"):
        load_config(data={"models": [{"name": "org/m", "source": "/a"}, {"name": "org.m", "source": "/b"}]})
