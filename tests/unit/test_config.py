"""Unit tests of serving.config (load_config, env overrides, every rejection), the vLLM name checks,
`serving config check` and the Ray Serve deployment options built from a model's configuration.

The `check_vllm=True` tests import vllm once (a few seconds); nothing starts an engine or Ray.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.config import ConfigError, ServingConfig, dump_config, load_config
from tests.support import no_serving_env  # noqa: F401 - autouse fixture

MODEL = {"name": "tiny", "source": "/models/tiny"}


def write(tmp_path: Path, text: str, name: str = "serving.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def rejected(data: Any = None, *, path: Path | None = None, check_vllm: bool = False) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, data=data, check_vllm=check_vllm)
    return str(info.value)


FULL_YAML = """\
    models:
      - name: tiny
        source: /models/tiny
        revision: abc123
        engine_args: {max_model_len: 512, enforce_eager: true}
        server_args: {tool_call_parser: hermes, enable_auto_tool_choice: true}
        lora_adapters: {tiny-lora: /adapters/tiny-lora}
        autoscaling: {min_replicas: 0, max_replicas: 4, target_ongoing_requests: 8}
        resources: {gpus: 1, cpus: 2, accelerator_type: H100, memory_gib: 16}
        env: {VLLM_LOGGING_LEVEL: DEBUG}
      - name: org/embedder
        source: sentence-transformers/all-MiniLM-L6-v2
        kind: embed
        replicas: 2
    gateway:
      port: 8001
      request_timeout_s: 30
      max_body_bytes: 2048
"""


# ------------------------------------------------------------------------------------- loading


def test_load_yaml_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL_YAML))
    assert isinstance(config, ServingConfig)
    tiny, embedder = config.models
    assert tiny.name == "tiny" and tiny.kind == "generate" and tiny.revision == "abc123"
    assert tiny.engine_args == {"max_model_len": 512, "enforce_eager": True}
    assert tiny.lora_adapters == {"tiny-lora": "/adapters/tiny-lora"}
    assert tiny.served_names == ["tiny", "tiny-lora"]
    assert tiny.autoscaling is not None and tiny.autoscaling.max_replicas == 4
    assert tiny.autoscaling.target_ongoing_requests == 8
    assert tiny.resources.gpus == 1 and tiny.resources.accelerator_type == "H100"
    assert embedder.kind == "embed" and embedder.replicas == 2 and embedder.autoscaling is None
    assert embedder.deployment_name == "model-org-embedder"
    assert config.gateway.port == 8001 and config.gateway.request_timeout_s == 30
    assert config.gateway.max_body_bytes == 2048
    assert config.gateway.host == "0.0.0.0"  # defaults fill the rest
    assert config.model("tiny-lora") is tiny and config.model("org/embedder") is embedder
    assert config.model("nope") is None


def test_load_data_equals_file(tmp_path: Path) -> None:
    from_file = load_config(write(tmp_path, FULL_YAML))
    from_data = load_config(data=yaml.safe_load(textwrap.dedent(FULL_YAML)))
    assert from_data.model_dump() == from_file.model_dump()


def test_empty_file_and_no_input_give_defaults(tmp_path: Path) -> None:
    empty = load_config(write(tmp_path, ""))
    assert empty.models == [] and empty.gateway.port == 8000
    assert load_config().model_dump() == empty.model_dump()


def test_dump_config_round_trips(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL_YAML))
    again = load_config(data=yaml.safe_load(dump_config(config)))
    assert again.model_dump() == config.model_dump()


def test_file_data_does_not_leak_into_the_next_load(tmp_path: Path) -> None:
    assert len(load_config(write(tmp_path, FULL_YAML)).models) == 2
    assert load_config().models == []
    assert load_config(data={"models": [MODEL]}).model("tiny") is not None
    assert load_config().models == []


# --------------------------------------------------------------------------------- environment


def test_env_overrides_file_nested(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVING_GATEWAY__PORT", "9000")
    config = load_config(write(tmp_path, FULL_YAML))
    assert config.gateway.port == 9000
    assert config.gateway.request_timeout_s == 30  # the file's other gateway fields stay
    assert config.gateway.max_body_bytes == 2048
    assert len(config.models) == 2


def test_env_overrides_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVING_GATEWAY__REQUEST_TIMEOUT_S", "2.5")
    monkeypatch.setenv("SERVING_GATEWAY__REPLICAS", "3")
    config = load_config(data={"gateway": {"request_timeout_s": 30, "port": 8123}})
    assert config.gateway.request_timeout_s == 2.5
    assert config.gateway.replicas == 3
    assert config.gateway.port == 8123


def test_env_json_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVING_MODELS", '[{"name": "from-env", "source": "/env", "kind": "embed"}]')
    monkeypatch.setenv("SERVING_GATEWAY", '{"port": 1234}')
    config = load_config(write(tmp_path, FULL_YAML))
    assert [m.name for m in config.models] == ["from-env"]
    assert config.models[0].kind == "embed"
    assert config.gateway.port == 1234
    assert config.gateway.request_timeout_s == 30


def test_env_values_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVING_GATEWAY__PORT", "not-a-port")
    assert "gateway.port" in rejected({})
    monkeypatch.setenv("SERVING_GATEWAY__PORT", "70000")
    assert "gateway.port" in rejected({})


def test_env_unknown_nested_field_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVING_GATEWAY__PROT", "9000")
    assert "gateway.prot: unknown field" in rejected({})


# ---------------------------------------------------------------------------------- rejections


def with_model(**fields: Any) -> dict:
    return {"models": [{**MODEL, **fields}]}


@pytest.mark.parametrize("data, expected", [
    ({"modles": []}, "modles: unknown field"),
    (with_model(sorce="/x"), "models[0].sorce: unknown field"),
    ({"models": [MODEL, {"name": "b", "source": "/b", "replica": 2}]}, "models[1].replica: unknown field"),
    ({"gateway": {"prot": 1}}, "gateway.prot: unknown field"),
    (with_model(resources={"gpu": 1}), "models[0].resources.gpu: unknown field"),
    (with_model(autoscaling={"target_ongoing_requests": 1, "max": 3}), "models[0].autoscaling.max: unknown field"),
], ids=["top-level", "model", "second-model", "gateway", "resources", "autoscaling"])
def test_unknown_fields(data: dict, expected: str) -> None:
    message = rejected(data)
    assert expected in message
    assert "1 error(s)" in message


def test_duplicate_model_names() -> None:
    message = rejected({"models": [MODEL, {"name": "other", "source": "/o"}, {**MODEL, "source": "/again"}]})
    assert "'tiny' is used twice: models[0] and models[2]" in message


def test_adapter_named_like_another_model() -> None:
    message = rejected({"models": [{**MODEL, "lora_adapters": {"other": "/l"}}, {"name": "other", "source": "/o"}]})
    assert "'other' is used twice: models[0].lora_adapters.other and models[1]" in message


def test_adapter_named_like_another_models_adapter() -> None:
    message = rejected({"models": [{**MODEL, "lora_adapters": {"shared": "/l1"}},
                                   {"name": "other", "source": "/o", "lora_adapters": {"shared": "/l2"}}]})
    assert "models[0].lora_adapters.shared and models[1].lora_adapters.shared" in message


@pytest.mark.parametrize("arg, field", [
    ("model", "source"), ("served_model_name", "name"), ("revision", "revision"),
    ("tokenizer_revision", "revision"), ("enable_lora", "lora_adapters or runtime_adapters"),
    ("lora_modules", "lora_adapters"), ("scheduling_policy", "batches"),
])
def test_reserved_engine_args(arg: str, field: str) -> None:
    message = rejected({"models": [MODEL, {"name": "b", "source": "/b", "engine_args": {arg: "x"}}]})
    assert f"models[1]: engine_args.{arg} is set by the platform: use `{field}` instead" in message


def test_lora_on_embed_model() -> None:
    message = rejected(with_model(kind="embed", lora_adapters={"a": "/a"}))
    assert "models[0]: lora_adapters and runtime_adapters need kind: generate" in message


@pytest.mark.parametrize("name", ["-leading-dash", "has space", "", "x" * 129, "semi;colon", "ümlaut"])
def test_bad_model_name(name: str) -> None:
    assert "models[0].name:" in rejected(with_model(name=name))


def test_name_pattern_accepts_hub_like_names() -> None:
    config = load_config(data={"models": [{"name": "org/Model-7B_v1.5:q4", "source": "/m"},
                                          {"name": "x" * 128, "source": "/x"}]})
    assert config.models[0].deployment_name == "model-org-Model-7B_v1-5-q4"


def test_bad_adapter_name() -> None:
    message = rejected(with_model(lora_adapters={"bad name": "/l"}))
    assert "models[0]: lora_adapters: 'bad name' is not a valid model name" in message


def test_bad_kind() -> None:
    assert "models[0].kind:" in rejected(with_model(kind="chat"))


def test_autoscaling_min_above_max() -> None:
    message = rejected(with_model(autoscaling={"min_replicas": 3, "max_replicas": 2, "target_ongoing_requests": 4}))
    assert "models[0].autoscaling: min_replicas (3) is above max_replicas (2)" in message


def test_autoscaling_needs_target_ongoing_requests() -> None:
    message = rejected(with_model(autoscaling={"min_replicas": 1, "max_replicas": 2}))
    assert "models[0].autoscaling.target_ongoing_requests: Field required" in message


@pytest.mark.parametrize("data, path", [
    (with_model(replicas=0), "models[0].replicas"),
    (with_model(max_ongoing_requests=0), "models[0].max_ongoing_requests"),
    (with_model(source=""), "models[0].source"),
    (with_model(resources={"gpus": -1}), "models[0].resources.gpus"),
    (with_model(resources={"cpus": -0.5}), "models[0].resources.cpus"),
    (with_model(resources={"memory_gib": 0}), "models[0].resources.memory_gib"),
    (with_model(autoscaling={"target_ongoing_requests": 0}), "models[0].autoscaling.target_ongoing_requests"),
    (with_model(autoscaling={"target_ongoing_requests": -2}), "models[0].autoscaling.target_ongoing_requests"),
    (with_model(autoscaling={"target_ongoing_requests": 1, "min_replicas": -1}), "models[0].autoscaling.min_replicas"),
    (with_model(autoscaling={"target_ongoing_requests": 1, "max_replicas": 0, "min_replicas": 0}),
     "models[0].autoscaling.max_replicas"),
    (with_model(autoscaling={"target_ongoing_requests": 1, "upscale_delay_s": -1}),
     "models[0].autoscaling.upscale_delay_s"),
    (with_model(autoscaling={"target_ongoing_requests": 1, "downscale_delay_s": -1}),
     "models[0].autoscaling.downscale_delay_s"),
    ({"gateway": {"port": 0}}, "gateway.port"),
    ({"gateway": {"port": 65536}}, "gateway.port"),
    ({"gateway": {"replicas": 0}}, "gateway.replicas"),
    ({"gateway": {"request_timeout_s": 0}}, "gateway.request_timeout_s"),
    ({"gateway": {"request_timeout_s": -1}}, "gateway.request_timeout_s"),
    ({"gateway": {"max_body_bytes": 100}}, "gateway.max_body_bytes"),
    ({"gateway": {"max_ongoing_requests": 0}}, "gateway.max_ongoing_requests"),
    ({"gateway": {"cpus": -1}}, "gateway.cpus"),
    ({"models": "tiny"}, "models"),
    ({"models": [MODEL], "gateway": "fast"}, "gateway"),
])
def test_out_of_range_and_wrong_types(data: dict, path: str) -> None:
    message = rejected(data)
    assert f"  {path}: " in message, message


def test_every_bad_path_is_reported() -> None:
    message = rejected({"models": [{**MODEL, "replicas": 0}, {"name": "b", "source": "/b", "kind": "x"}],
                        "gateway": {"port": 0, "extra": 1}})
    assert "4 error(s)" in message
    for path in ("models[0].replicas", "models[1].kind", "gateway.port", "gateway.extra: unknown field"):
        assert path in message


def test_errors_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway: {port: 0}\n")
    message = rejected(path=path)
    assert message.startswith(f"{path}: 1 error(s)")
    assert "gateway.port" in message


@pytest.mark.parametrize("text", ["models: [\n", "gateway: {port: 1\n", "a: b: c\n", "models:\n\t- name: x\n"])
def test_invalid_yaml(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    assert str(path) in rejected(path=path)


@pytest.mark.parametrize("text, kind", [("- name: tiny\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_yaml_top_level_not_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = write(tmp_path, text)
    message = rejected(path=path)
    assert str(path) in message
    assert f"the top level must be a mapping, not {kind}" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert str(path) in rejected(path=path)


def test_validate_assignment() -> None:
    config = load_config(data={"models": [MODEL]})
    with pytest.raises(ValueError):
        config.gateway.port = 0
    config.gateway.port = 9001  # what `serving up --port` does
    assert config.gateway.port == 9001


# ---------------------------------------------------------------------- vLLM names (imports vllm)


GOOD_MODEL = {
    "name": "tiny", "source": "/models/tiny",
    "lora_adapters": {"tiny-lora": "/adapters/tiny-lora"},
    "engine_args": {"enforce_eager": True, "max_model_len": 512, "dtype": "float32"},
    "server_args": {"tool_call_parser": "hermes", "enable_auto_tool_choice": True},
}


def vllm_rejected(*models: dict) -> str:
    return rejected({"models": list(models)}, check_vllm=True)


def test_vllm_unknown_engine_arg_with_suggestion() -> None:
    message = vllm_rejected({**MODEL, "engine_args": {"max_modl_len": 512}})
    assert "models[0].engine_args.max_modl_len" in message
    assert "'tiny'" in message
    assert "did you mean max_model_len?" in message


def test_vllm_unknown_arg_names_the_right_model() -> None:
    message = vllm_rejected(GOOD_MODEL, {"name": "second", "source": "/s", "engine_args": {"gpu_mem_util": 0.5}})
    assert "models[1].engine_args.gpu_mem_util" in message
    assert "'second'" in message
    assert "models[0]" not in message


def test_vllm_unknown_server_option_with_suggestion() -> None:
    message = vllm_rejected({**MODEL, "server_args": {"tool_call_parsr": "hermes"}})
    assert "models[0].server_args.tool_call_parsr" in message
    assert "did you mean tool_call_parser?" in message


def test_vllm_server_option_under_engine_args() -> None:
    message = vllm_rejected({**MODEL, "engine_args": {"tool_call_parser": "hermes"}})
    assert "models[0].engine_args.tool_call_parser" in message
    assert "it is a server option: move it" in message


def test_vllm_engine_arg_under_server_args() -> None:
    message = vllm_rejected({**MODEL, "server_args": {"max_model_len": 512}})
    assert "models[0].server_args.max_model_len" in message
    assert "it is an engine argument: move it" in message


def test_vllm_bad_value_type() -> None:
    message = vllm_rejected({**MODEL, "engine_args": {"max_model_len": "abc"}})
    assert "models[0]" in message and "'tiny'" in message
    assert "max-model-len" in message and "'abc'" in message


def test_vllm_bad_choice() -> None:
    message = vllm_rejected({**MODEL, "engine_args": {"dtype": "float33"}})
    assert "models[0]" in message and "dtype" in message and "float33" in message


@pytest.mark.parametrize("args", [{"max_model_len": "abc"}, {"enforce_eager": "yes"}])
def test_vllm_bad_value_names_the_config_path(args: dict) -> None:
    message = vllm_rejected({**MODEL, "engine_args": args})
    assert f"models[0].engine_args.{next(iter(args))}" in message


def test_vllm_unknown_tool_call_parser() -> None:
    message = vllm_rejected({**MODEL, "server_args": {"tool_call_parser": "hermesx", "enable_auto_tool_choice": True}})
    assert "models[0]" in message and "'tiny'" in message
    assert "models[0].server_args.tool_call_parser (model 'tiny'): unknown parser 'hermesx'" in message
    assert "did you mean hermes?" in message


def test_vllm_auto_tool_choice_needs_a_parser() -> None:
    message = vllm_rejected({**MODEL, "server_args": {"enable_auto_tool_choice": True}})
    assert "models[0]" in message and "'tiny'" in message
    assert "--tool-call-parser" in message


def test_vllm_valid_config_and_namespace() -> None:
    from serving.engine.vllm_args import build_namespace

    config = load_config(data={"models": [GOOD_MODEL, {"name": "emb", "source": "/e", "kind": "embed"}]},
                         check_vllm=True)
    ns = build_namespace(config.models[0])
    assert ns.model == "/models/tiny"
    assert ns.served_model_name == ["tiny"]
    assert ns.enable_lora is True
    assert [(m.name, m.path) for m in ns.lora_modules] == [("tiny-lora", "/adapters/tiny-lora")]
    assert ns.enforce_eager is True
    assert ns.max_model_len == 512
    assert ns.dtype == "float32"
    assert ns.tool_call_parser == "hermes"
    assert ns.enable_auto_tool_choice is True
    embed = build_namespace(config.models[1])
    assert embed.runner == "pooling"
    assert embed.served_model_name == ["emb"]
    assert not embed.enable_lora


def test_vllm_false_and_null_values() -> None:
    from serving.engine.vllm_args import build_namespace

    config = load_config(data={"models": [{**MODEL, "revision": "v2",
                                            "engine_args": {"enforce_eager": False, "max_model_len": None}}]},
                         check_vllm=True)
    ns = build_namespace(config.models[0])
    assert ns.enforce_eager is False
    assert ns.max_model_len is None
    assert ns.revision == "v2"


# ------------------------------------------------------------------------- `serving config check`


def test_cli_config_check_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from serving.cli import main

    path = write(tmp_path, FULL_YAML)
    assert main(["config", "check", str(path)]) == 0
    out, err = capsys.readouterr()
    printed = yaml.safe_load(out)
    assert printed == load_config(path).model_dump(mode="json")
    assert printed["models"][0]["engine_args"]["max_model_len"] == 512
    assert printed["gateway"]["host"] == "0.0.0.0"  # the effective configuration, defaults included
    assert "2 model(s)" in err


def test_cli_config_check_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from serving.cli import main

    path = write(tmp_path, "models:\n  - {name: tiny, source: /t, engine_args: {max_modl_len: 5}}\n")
    assert main(["config", "check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ")
    assert "models[0].engine_args.max_modl_len" in err and "did you mean max_model_len?" in err

    path = write(tmp_path, "gateway: {port: 0}\n", name="bad.yaml")
    assert main(["config", "check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and str(path) in err and "gateway.port" in err

    path = write(tmp_path, "models: [\n", name="broken.yaml")
    assert main(["config", "check", str(path)]) == 2
    assert str(path) in capsys.readouterr().err


def test_cli_config_check_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from serving.cli import main

    monkeypatch.setenv("SERVING_GATEWAY__PORT", "9100")
    assert main(["config", "check", str(write(tmp_path, FULL_YAML))]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["gateway"]["port"] == 9100


# --------------------------------------------------------------------- Ray Serve deployment options


def test_deployment_options_fixed_replicas() -> None:
    from serving.app import model_deployment_options

    model = load_config(data={"models": [{"name": "org/m", "source": "/m", "replicas": 3,
                                          "max_ongoing_requests": 32}]}).models[0]
    options = model_deployment_options(model)
    assert options["name"] == "model-org-m"
    assert options["num_replicas"] == 3
    assert "autoscaling_config" not in options
    assert options["max_ongoing_requests"] == 32
    assert options["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 0}


def test_deployment_options_autoscaling_and_resources() -> None:
    from serving.app import model_deployment_options

    model = load_config(data={"models": [{
        "name": "big", "source": "/big", "replicas": 5,
        "autoscaling": {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 16},
        "resources": {"gpus": 2, "cpus": 4, "accelerator_type": "H100", "memory_gib": 1.5},
        "env": {"VLLM_LOGGING_LEVEL": "DEBUG"},
    }]}).models[0]
    options = model_deployment_options(model)
    assert "num_replicas" not in options
    auto = options["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"]) == (0, 4, 16)
    assert model.scales_to_zero  # the gateway lets its requests wait for a replica instead of refusing them
    assert not model.model_copy(update={"autoscaling": None}).scales_to_zero
    actor = options["ray_actor_options"]
    assert actor["num_gpus"] == 2 and actor["num_cpus"] == 4
    assert actor["accelerator_type"] == "H100"
    assert actor["memory"] == int(1.5 * 2**30)
    assert actor["runtime_env"] == {"env_vars": {"VLLM_LOGGING_LEVEL": "DEBUG"}}


@pytest.mark.parametrize("fields", [
    {"replicas": 2},
    {"autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2},
     "resources": {"gpus": 1, "accelerator_type": "A10G", "memory_gib": 8}, "env": {"A": "1"}},
])
def test_ray_accepts_deployment_options(fields: dict) -> None:
    from ray import serve

    from serving.app import model_deployment_options
    from serving.engine.server import ModelServer

    model = load_config(data={"models": [{**MODEL, **fields}]}).models[0]
    deployment = serve.deployment(ModelServer).options(**model_deployment_options(model))
    assert deployment.name == "model-tiny"
    if model.autoscaling:
        assert deployment._deployment_config.autoscaling_config.max_replicas == 3
        assert deployment.ray_actor_options["accelerator_type"] == "A10G"
    else:
        assert deployment.num_replicas == 2


def test_logical_cpus_needed() -> None:
    from serving.app import logical_cpus_needed

    config = load_config(data={"models": [
        {**MODEL, "replicas": 2, "resources": {"cpus": 2}},
        {"name": "b", "source": "/b", "autoscaling": {"max_replicas": 3, "target_ongoing_requests": 1}},
    ], "gateway": {"replicas": 2, "cpus": 0.5}})
    assert logical_cpus_needed(config) == 2 * 2 + 3 * 1 + 2 * 0.5 + 1
