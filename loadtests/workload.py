"""Prompts and request bodies shared by the locust users and the benchmark (no locust, no gevent here).

Prompts come from a JSONL file (one request per line, see serving.compare.load_prompts) or are
generated: `input_tokens` random words (about one token each on common tokenizers; the server's
`usage.prompt_tokens` gives the exact count) so that no two requests share a prefix unless asked to.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from serving.compare import chat_messages, load_prompts, prompt_text

WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force education"
).split()


class PromptSource:
    """Hands out prompts: from a file (cycled, each user starting elsewhere) or generated.

    pool: when set, only this many distinct prompts (the cache-heavy mix repeats them).
    """

    def __init__(self, path: str | Path | None = None, *, input_tokens: int = 128, pool: int | None = None,
                 seed: int = 0):
        self.items = load_prompts(path) if path else None
        self.input_tokens = max(1, input_tokens)
        self.rng = random.Random(seed)
        self.pool = pool
        if pool:
            self.items = (self.items or [self.generate(i) for i in range(pool)])[:pool]
        self._next = seed  # users sharing a prompt file start at different lines

    def generate(self, index: int | None = None) -> dict[str, Any]:
        rng = random.Random(index) if index is not None else self.rng
        words = [rng.choice(WORDS) for _ in range(self.input_tokens)]
        return {"prompt": " ".join(words), "id": str(index) if index is not None else None}

    def next(self) -> dict[str, Any]:
        if self.items is None:
            return self.generate()
        if self.pool:
            return self.rng.choice(self.items)
        item = self.items[self._next % len(self.items)]
        self._next += 1
        return item


def generation_body(item: dict[str, Any], model: str, *, chat: bool, stream: bool, max_tokens: int,
                    ignore_eos: bool = False, temperature: float | None = None) -> dict[str, Any]:
    """A chat or text-completion body; the prompt line's own max_tokens wins over the default."""
    body: dict[str, Any] = {"model": model, "max_tokens": int(item.get("max_tokens") or max_tokens)}
    if chat:
        body["messages"] = chat_messages(item)
    else:
        body["prompt"] = prompt_text(item)
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension: every request generates exactly max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    return body


def embedding_body(items: list[dict[str, Any]], model: str) -> dict[str, Any]:
    return {"model": model, "input": [prompt_text(i) for i in items]}
