"""Tiny, deterministic, fully offline demo model and LoRA adapter.

The platform's tests, examples and CPU deployments need a model that vLLM can
really serve without downloading anything from a model hub.  This module builds
one from scratch in a few seconds: a byte-level BPE tokenizer trained on a
corpus generated in code, a 2-layer random-weight Llama, and a random LoRA
adapter for it.  The files are a pure function of the seed (the adapter's
config also records the base model's path), so two machines or two test runs
get byte-identical files.

Heavy libraries (torch, transformers, tokenizers, peft) are imported inside the
functions so that light code (the CLI, the gateway) can import this module
cheaply.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast

# Bump when the generated files change, so caches built by an older version
# are not mistaken for the current one.
DEMO_VERSION = "v1"
DEMO_MODEL_DIRNAME = f"demo-model-{DEMO_VERSION}"
DEMO_LORA_DIRNAME = f"demo-lora-{DEMO_VERSION}"
DEMO_MODEL_SEED = 0
DEMO_LORA_SEED = 1
DEMO_LORA_RANK = 8

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
# Order fixes their ids (0..7), which keeps them stable across corpus changes.
SPECIAL_TOKENS = [BOS, EOS, UNK, PAD, IM_START, IM_END, TOOL_CALL_START, TOOL_CALL_END]
VOCAB_SIZE = 320

# ChatML, as Qwen2.5/Hermes use it, so vLLM's `hermes` tool parser understands
# what the model is prompted with.  Content may be None (assistant turns that
# only call tools), hence the `or ''` guards.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0].role == 'system' %}"
    "{{- (messages[0].content or '') + '\\n\\n' }}"
    "{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages and messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + (messages[0].content or '') + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in (message.tool_calls or []) %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}"
    "{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    # Consecutive tool results share one user turn, like the Qwen template.
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + (message.content or '') + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_SUBJECTS = [
    "The cat", "A small dog", "My neighbor", "The teacher", "Our team", "The old man",
    "A young girl", "The robot", "Every student", "The weather service", "She", "He",
    "They", "We", "The server", "The model",
]
_VERBS = [
    "reads", "writes", "finds", "likes", "builds", "answers", "watches", "opens",
    "sends", "checks", "cleans", "paints", "carries", "explains", "remembers",
]
_OBJECTS = [
    "a long letter", "the blue door", "an old book", "the quiet garden", "a fast car",
    "the weather report", "a simple question", "the red apple", "some fresh bread",
    "the city map", "a short story", "the new computer", "three green boxes",
]
_TAILS = [
    "every morning.", "before dinner.", "in the park.", "at the station.", "with great care.",
    "on Monday.", "after the rain.", "near the river.", "for a friend.", "in London.",
    "today.", "while it is sunny.",
]
_QUESTIONS = [
    "What is the weather in {city} today?", "How far is {city} from here?",
    "Can you tell me a story about {city}?", "Why do people love {city}?",
    "Where can I buy bread in {city}?", "Who lives in {city}?",
]
_CITIES = ["Paris", "Berlin", "Tokyo", "Lima", "Cairo", "Oslo", "Madrid", "Sydney", "Toronto"]


def _corpus() -> Iterator[str]:
    """Varied English, chat-ish and JSON-ish lines; no RNG, so it never drifts."""
    n_s, n_v, n_o, n_t = len(_SUBJECTS), len(_VERBS), len(_OBJECTS), len(_TAILS)
    for i in range(360):
        # Co-prime strides walk the word lists in many different combinations.
        subject, verb = _SUBJECTS[i % n_s], _VERBS[(i * 7) % n_v]
        yield f"{subject} {verb} {_OBJECTS[(i * 5) % n_o]} {_TAILS[(i * 11) % n_t]}"
    for i, city in enumerate(_CITIES):
        for j, question in enumerate(_QUESTIONS):
            yield question.format(city=city)
            temp = (i * 7 + j * 3) % 35
            yield f"It is {temp} degrees and {'sunny' if (i + j) % 2 else 'cloudy'} in {city}."
            yield f'{{"name": "get_weather", "arguments": {{"city": "{city}", "unit": "celsius"}}}}'
    for n in range(40):
        yield f"Step {n}: add {n * 3} and {n + 17} to get {n * 4 + 17}. Done!"


def _build_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer and save it in transformers format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))  # byte-level: nothing is unknown
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_corpus()), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS[4:],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    # Keep the template inside tokenizer_config.json (not chat_template.jinja)
    # so tools that only read the config still find it.
    hf_tok.save_pretrained(str(out_dir), save_jinja_files=False)
    return hf_tok


def _build_weights(out_dir: Path, tokenizer: PreTrainedTokenizerFast, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in
           (("bos", BOS), ("eos", EOS), ("pad", PAD), ("im_end", IM_END))}
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,  # vLLM's CPU attention backend rejects head sizes like 16
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        tie_word_embeddings=False,
        # The default 0.02 makes logits nearly flat, and greedy decoding of a
        # random model then repeats one token for every prompt.
        initializer_range=0.5,
    )
    config.dtype = "float32"
    # fork_rng keeps the caller's global RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        # A zero lm_head row pins that token's logit at 0, far below the top
        # random logits, so greedy output is printable ASCII: no lone UTF-8
        # bytes, control characters, EOS or stray <tool_call> markers.
        model.lm_head.weight[~_printable_token_mask(tokenizer)] = 0.0
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"],
        # ChatML turns end with <|im_end|>; vLLM stops on any of these.
        eos_token_id=[ids["eos"], ids["im_end"]],
        pad_token_id=ids["pad"],
    )
    model.save_pretrained(str(out_dir))


def _printable_token_mask(tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    import torch

    special = set(tokenizer.all_special_ids)
    keep = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        keep.append(token_id not in special and text.isascii() and text.isprintable())
    return torch.tensor(keep, dtype=torch.bool)


def build_demo_model(out_dir: str | Path, seed: int = 0, *, overwrite: bool = True) -> Path:
    """Build the tiny random Llama (+ tokenizer) into ``out_dir`` atomically.

    With ``overwrite=False`` an existing ``out_dir`` (e.g. one another process
    just finished) is kept and our copy is discarded.
    """
    out = Path(out_dir).expanduser().resolve()

    def build(tmp: Path) -> None:
        tokenizer = _build_tokenizer(tmp)
        _build_weights(tmp, tokenizer, seed)

    return _build_atomically(out, build, overwrite)


# Model shapes for benchmarks on real accelerators: the transformer of a well-known model with the
# demo tokenizer. No weights are written; serve them with `load_format: dummy` (vLLM initialises
# random weights itself), so a shape of billions of parameters costs a few kB on disk.
SHAPES: dict[str, dict[str, Any]] = {
    "llama-8b": {  # Llama 3 8B's layers (its 128k vocabulary is the demo tokenizer's here)
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 8192, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
    },
}


def build_shaped_model(out_dir: str | Path, shape: str, *, overwrite: bool = True) -> Path:
    """The demo tokenizer and the config of model shape `shape` (see SHAPES), in bfloat16, no weights."""
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known: {', '.join(sorted(SHAPES))}")
    out = Path(out_dir).expanduser().resolve()

    def build(tmp: Path) -> None:
        from transformers import GenerationConfig, LlamaConfig

        tokenizer = _build_tokenizer(tmp)
        ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in
               (("bos", BOS), ("eos", EOS), ("pad", PAD), ("im_end", IM_END))}
        config = LlamaConfig(**SHAPES[shape], vocab_size=len(tokenizer), bos_token_id=ids["bos"],
                             eos_token_id=ids["eos"], pad_token_id=ids["pad"], tie_word_embeddings=False)
        config.architectures = ["LlamaForCausalLM"]
        config.dtype = "bfloat16"
        config.save_pretrained(str(tmp))
        GenerationConfig(bos_token_id=ids["bos"], eos_token_id=[ids["eos"], ids["im_end"]],
                         pad_token_id=ids["pad"]).save_pretrained(str(tmp))

    return _build_atomically(out, build, overwrite)


def build_demo_lora(
    base_dir: str | Path,
    out_dir: str | Path,
    seed: int = 1,
    rank: int = 8,
    *,
    overwrite: bool = True,
) -> Path:
    """Build a random (non-zero) LoRA adapter for the demo model, atomically."""
    base = Path(base_dir).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()

    def build(tmp: Path) -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        lora_config = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            # peft's default zero-initialises B, which would make the adapter a
            # no-op; random A and B make LoRA output visibly differ from base.
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            peft_model = get_peft_model(model, lora_config)
        peft_model.save_pretrained(str(tmp))
        _sort_target_modules(tmp / "adapter_config.json")

    return _build_atomically(out, build, overwrite)


def _sort_target_modules(config_path: Path) -> None:
    # peft stores target_modules from a set, so its order follows the
    # per-process hash seed; sorting makes the file byte-reproducible.
    config = json.loads(config_path.read_text())
    config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def default_cache_dir() -> Path:
    """``$SERVING_CACHE_DIR``, else ``~/.cache/serving``."""
    env = os.environ.get("SERVING_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "serving"


def ensure_demo(cache_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Return ``(model_dir, lora_dir)``, building whichever is missing.

    Safe to call from several processes at once: each builds into its own
    temporary directory and the first rename wins.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    model_dir = (root / DEMO_MODEL_DIRNAME).resolve()
    lora_dir = (root / DEMO_LORA_DIRNAME).resolve()
    if not (model_dir / "config.json").is_file():
        build_demo_model(model_dir, DEMO_MODEL_SEED, overwrite=False)
    if not (lora_dir / "adapter_config.json").is_file():
        build_demo_lora(model_dir, lora_dir, DEMO_LORA_SEED, DEMO_LORA_RANK, overwrite=False)
    return model_dir, lora_dir


def _build_atomically(out: Path, build: Callable[[Path], None], overwrite: bool) -> Path:
    """Run ``build`` in a hidden sibling directory, then rename it to ``out``.

    A sibling (not /tmp) keeps the rename on one filesystem, hence atomic:
    readers see either nothing or a complete directory.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        build(tmp)
        _make_world_readable(tmp)
        _publish(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed
    return out


def _make_world_readable(root: Path) -> None:
    # mkdtemp creates 0700 and transformers writes weights 0600; the cache may
    # be built by one user (e.g. an image build) and served by another.
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    try:
        os.rename(tmp, out)
        return
    except OSError:
        if not out.exists():
            raise
    if not overwrite:
        return  # someone else won the race; their copy is as good as ours
    # POSIX cannot atomically swap a non-empty directory, so move the old one
    # aside first: readers may briefly see no directory, never a partial one.
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, trash / "old")
    try:
        os.rename(tmp, out)
    except OSError:
        if out.exists():
            return  # a concurrent builder filled the gap with a complete copy
        os.rename(trash / "old", out)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)
