"""A request's routing key: what its prompt starts with (serving.engine.routing routes on it)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

PREFIX_CHARS = 2048  # of a completion prompt (a string); token-id prompts: PREFIX_TOKENS
PREFIX_TOKENS = 512


def _opening(messages: Any) -> list[Any] | None:
    """The messages up to and including the first user message (None: not a list of messages)."""
    if not isinstance(messages, list) or not messages:
        return None
    for i, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return messages[: i + 1]
    return messages


def affinity_key(route: str, payload: dict[str, Any], salt: str | None = None) -> str | None:
    """A request's routing key (32 hex digits) from its parsed body, or None when it has no prefix worth
    routing on (embeddings, rerank, several prompts, a shape the engine will refuse). `salt`: the key's
    prefix-cache salt, when prefixes are not shared across keys."""
    model = payload.get("model")
    opening: Any = None
    if route == "chat":
        opening = _opening(payload.get("messages"))
    elif route == "messages":  # Anthropic's: the system prompt is a field of its own
        messages = _opening(payload.get("messages"))
        opening = None if messages is None else [payload.get("system"), messages]
    elif route == "responses":
        given = payload.get("input")
        opening = [payload.get("instructions"), given[:PREFIX_CHARS] if isinstance(given, str) else _opening(given)]
    elif route == "completion":
        prompt = payload.get("prompt")
        if isinstance(prompt, str):
            opening = prompt[:PREFIX_CHARS]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt[:PREFIX_TOKENS]):
            opening = prompt[:PREFIX_TOKENS]
    if opening is None or opening == [None, None]:
        return None
    text = json.dumps([model, salt, opening], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


