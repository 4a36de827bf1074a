"""Unit tests for serving.demo: the offline tiny model and LoRA builder.

No vLLM or Ray here; transformers/torch/peft check what vLLM will load.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from serving import demo  # noqa: E402

SPECIALS = ["<s>", "</s>", "<unk>", "<pad>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One build per seed, shared by the tests: builds take seconds, not zero."""
    root = tmp_path_factory.mktemp("demo")
    model = demo.build_demo_model(root / "model", seed=0)
    return {
        "root": root,
        "model": model,
        "model_again": demo.build_demo_model(root / "model-again", seed=0),
        "model_seed7": demo.build_demo_model(root / "model-seed7", seed=7),
        "lora": demo.build_demo_lora(model, root / "lora"),
    }


@pytest.fixture(scope="module")
def tokenizer(built: dict[str, Path]):
    return transformers.AutoTokenizer.from_pretrained(built["model"])


def test_model_files_exist(built: dict[str, Path]) -> None:
    model = built["model"]
    for name in ("config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "generation_config.json"):
        assert (model / name).is_file(), name
    tok_config = json.loads((model / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]


def test_no_temporary_directories_left(built: dict[str, Path]) -> None:
    leftovers = [p.name for p in built["root"].iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_same_seed_is_byte_identical(built: dict[str, Path]) -> None:
    a, b = built["model"], built["model_again"]
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_different_seed_changes_weights_not_tokenizer(built: dict[str, Path]) -> None:
    a, c = built["model"], built["model_seed7"]
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    wa, wc = load_file(a / "model.safetensors"), load_file(c / "model.safetensors")
    assert not torch.equal(wa["model.embed_tokens.weight"], wc["model.embed_tokens.weight"])
    assert not torch.equal(wa["lm_head.weight"], wc["lm_head.weight"])


def test_config_shape(built: dict[str, Path], tokenizer) -> None:
    config = transformers.AutoConfig.from_pretrained(built["model"])
    assert config.model_type == "llama"
    assert config.head_dim == 64
    assert config.hidden_size // config.num_attention_heads == 64
    assert config.vocab_size == len(tokenizer)
    assert config.tie_word_embeddings is False
    assert config.bos_token_id == tokenizer.bos_token_id
    assert config.eos_token_id == tokenizer.eos_token_id
    assert config.pad_token_id == tokenizer.pad_token_id
    weights = load_file(built["model"] / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())


def test_tokenizer_round_trips_text(tokenizer) -> None:
    for text in ["The cat reads a long letter.", "Hello wörld! 42 {\"a\": 1}\n日本", ""]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    # Merges were learned: common words take fewer tokens than bytes.
    assert len(tokenizer.encode(" the weather")) < len(" the weather")


def test_special_tokens_are_single_ids(tokenizer) -> None:
    ids = [tokenizer.encode(tok, add_special_tokens=False) for tok in SPECIALS]
    assert all(len(i) == 1 for i in ids), ids
    assert len({i[0] for i in ids}) == len(SPECIALS)
    vocab = tokenizer.get_vocab()
    assert "<tool_call>" in vocab and "</tool_call>" in vocab  # hermes parser
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    assert (tokenizer.pad_token, tokenizer.unk_token) == ("<pad>", "<unk>")


def test_chat_template_renders_chatml(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n")
    assert text.endswith("<|im_start|>user\nBye.<|im_end|>\n<|im_start|>assistant\n")
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert no_prompt.endswith("Bye.<|im_end|>\n")


def test_chat_template_renders_tools(tokenizer) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "20 C"},
    ]
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n")
    assert '"name": "get_weather"' in text.split("<|im_end|>")[0]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n20 C\n</tool_response><|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


def _greedy(model_dir: Path, prompt: str, lora_dir: Path | None = None) -> str:
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if lora_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, lora_dir)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:])


def test_greedy_output_varies_and_is_printable(built: dict[str, Path]) -> None:
    outputs = [_greedy(built["model"], p) for p in ("The cat reads", "What is the weather in Paris?")]
    assert outputs[0] != outputs[1]
    assert all(o and o.isascii() and o.isprintable() for o in outputs), outputs


def test_lora_files_and_effect(built: dict[str, Path]) -> None:
    lora = built["lora"]
    config = json.loads((lora / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    weights = load_file(lora / "adapter_model.safetensors")
    assert any("lora_A" in k for k in weights) and any("lora_B" in k for k in weights)
    assert all(t.abs().sum() > 0 for t in weights.values())  # B is not zero-initialised
    prompt = "The cat reads"
    assert _greedy(built["model"], prompt, lora) != _greedy(built["model"], prompt)


def test_lora_is_reproducible(built: dict[str, Path], tmp_path: Path) -> None:
    again = demo.build_demo_lora(built["model"], tmp_path / "lora")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (again / name).read_bytes() == (built["lora"] / name).read_bytes(), name


def test_overwrite_flag(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    demo.build_demo_model(out, seed=0, overwrite=False)
    assert (out / "stale.txt").exists() and not (out / "config.json").exists()
    demo.build_demo_model(out, seed=0)
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_ensure_demo_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVING_CACHE_DIR", str(tmp_path))
    model_dir, lora_dir = demo.ensure_demo()
    assert model_dir.parent == tmp_path.resolve() and lora_dir.parent == tmp_path.resolve()
    assert (model_dir / "config.json").is_file()
    assert (lora_dir / "adapter_config.json").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in (model_dir / "model.safetensors",
                                                lora_dir / "adapter_model.safetensors")}

    def no_rebuild(*args, **kwargs):
        raise AssertionError("ensure_demo rebuilt an existing demo")

    monkeypatch.setattr(demo, "build_demo_model", no_rebuild)
    monkeypatch.setattr(demo, "build_demo_lora", no_rebuild)
    assert demo.ensure_demo(tmp_path) == (model_dir, lora_dir)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_shaped_model_has_the_shape_the_demo_tokenizer_and_no_weights(tmp_path: Path) -> None:
    out = demo.build_shaped_model(tmp_path / "llama-8b", "llama-8b")
    config = json.loads((out / "config.json").read_text())
    for key, value in demo.SHAPES["llama-8b"].items():
        if key != "rope_theta":  # transformers files it under rope_parameters
            assert config[key] == value, key
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert config["vocab_size"] == len(tokenizer) and tokenizer.chat_template
    assert not list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    with torch.device("meta"):  # no memory: only the parameters' shapes
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(str(out)))
    assert 6.9e9 < model.num_parameters() < 7.1e9  # Llama 3 8B's layers; its 128k-token embeddings are not here
    with pytest.raises(ValueError, match="unknown model shape"):
        demo.build_shaped_model(tmp_path / "x", "llama-9000b")
