"""Exact-match response cache.

An entry is the complete (non-streamed) JSON answer. A streamed request hits the same entry and is
replayed as SSE; a streamed miss is assembled into that JSON while it streams, and stored only if it
ended with [DONE], no error and a finish_reason on every choice.

A hit is a new answer: it gets an `id` of its own and `created` = now (`fresh`, `replay`), as OpenAI's
and vLLM's answers do; two answers never share an id, whether the engine or the cache gave them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from typing import Any

from serving.config import CacheConfig, ModelConfig
from serving.engine.protocol import Route
from serving.gateway.store import Resilient, StoreUnavailable

logger = logging.getLogger("serving.gateway")

# fields that do not change what the engine produces
_IGNORED = {"stream", "stream_options", "user", "request_id"}


def reproducible(route: Route, payload: dict[str, Any]) -> bool:
    if route == "embedding":
        return True
    return payload.get("temperature") == 0 or isinstance(payload.get("seed"), int)


def cache_key(route: Route, name: str, model: ModelConfig, tenant: str, payload: dict[str, Any]) -> str:
    canonical = {"route": route, "model": name, "revision": model.revision or model.source, "tenant": tenant,
                 "request": {k: v for k, v in payload.items() if k not in _IGNORED and k != "model"}}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class ResponseCache:
    def __init__(self, config: CacheConfig, store: Resilient):
        self.config = config
        self._store = store

    def plan(self, route: Route, name: str, model: ModelConfig, mode: str, tenant: str, payload: dict[str, Any],
             cache_control: str | None) -> tuple[str | None, bool, bool]:
        """(key, read, write) for this request; key None when it is not cached at all."""
        if mode == "off" or (mode == "reproducible" and not reproducible(route, payload)):
            return None, False, False
        directives = {d.strip().lower() for d in (cache_control or "").split(",")}
        read, write = "no-cache" not in directives, "no-store" not in directives
        if not (read or write):
            return None, False, False
        tenant = "shared" if self.config.shared else tenant
        return cache_key(route, name, model, tenant, payload), read, write

    async def get(self, key: str) -> bytes | None:
        """The entry, or None when there is none. Raises StoreUnavailable when the store cannot say."""
        return await self._store.call("cache_get", key)

    async def put(self, key: str, body: bytes) -> None:
        if len(body) > self.config.max_entry_bytes:
            return
        try:
            await self._store.call("cache_set", key, body, self.config.ttl_s)
        except StoreUnavailable:
            pass


# vLLM's id prefixes (chatcmpl-<hex>, cmpl-<hex>, embd-<hex>), for an entry whose own id has none
_ID_PREFIX = {"chat": "chatcmpl-", "completion": "cmpl-", "embedding": "embd-"}


def new_id(route: Route, old: Any = None) -> str:
    """A fresh answer id: the prefix of `old` (up to its first "-", as vLLM's "chatcmpl-", "cmpl-",
    "embd-"), else the route's (_ID_PREFIX), then 32 hex digits of a uuid4 (vLLM's random_uuid shape).
    Made by the server alone: nothing of the request goes into it."""
    prefix = old.split("-", 1)[0] + "-" if isinstance(old, str) and "-" in old else _ID_PREFIX.get(route, "")
    return prefix + uuid.uuid4().hex


def _renewed(answer: dict[str, Any], route: Route) -> dict[str, Any]:
    """`answer` with a new `id` and `created` = now (Unix seconds). Chat and completions answers always
    have both (OpenAI's objects require them); other answers only get those they had (OpenAI's
    embeddings list has neither, vLLM's has both)."""
    always = route in ("chat", "completion")
    if always or "id" in answer:
        answer["id"] = new_id(route, answer.get("id"))
    if always or "created" in answer:
        answer["created"] = int(time.time())
    return answer


def fresh(entry: bytes, route: Route) -> bytes:
    """A cached answer (JSON bytes) as a non-streamed hit sends it: the same answer with a new `id`
    and `created` (_renewed), compact JSON (UTF-8)."""
    answer = json.loads(entry)
    if not isinstance(answer, dict):
        return entry
    return json.dumps(_renewed(answer, route), separators=(",", ":"), ensure_ascii=False).encode()


def replay(entry: bytes, route: Route, include_usage: bool) -> list[str]:
    """A cached answer as the SSE events a streamed request would have received: every event carries
    the same new `id` and `created` (_renewed), as the chunks of one live stream do."""
    answer = _renewed(json.loads(entry), route)
    head: dict[str, Any] = {k: answer[k] for k in ("id", "created", "model") if k in answer}
    events = []
    for choice in answer["choices"]:
        if route == "chat":
            head["object"] = "chat.completion.chunk"
            message = choice.get("message") or {}
            delta: dict[str, Any] = {"role": message.get("role", "assistant"), "content": message.get("content")}
            if message.get("reasoning_content"):
                delta["reasoning_content"] = message["reasoning_content"]
            if message.get("tool_calls"):
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
            out = {"index": choice["index"], "delta": delta}
        else:
            head["object"] = "text_completion"
            out = {"index": choice["index"], "text": choice.get("text", "")}
        out["logprobs"] = choice.get("logprobs")
        out["finish_reason"] = choice.get("finish_reason")
        events.append({**head, "choices": [out]})
    if include_usage and answer.get("usage"):
        events.append({**head, "choices": [], "usage": answer["usage"]})
    return [f"data: {json.dumps(e, separators=(',', ':'))}\n\n" for e in events] + ["data: [DONE]\n\n"]


class StreamAssembler:
    """Builds the non-streamed answer from a stream's events; `result()` is None unless it is whole."""

    _CHAT_TEXT = ("content", "reasoning_content")

    def __init__(self, route: Route):
        self.route = route
        self.head: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.done = False
        self.broken = False

    def feed(self, chunk: str) -> None:
        for line in chunk.split("\n\n"):
            if not line.startswith("data: ") or self.broken:
                continue
            data = line[6:]
            if data == "[DONE]":
                self.done = True
                continue
            try:
                self._event(json.loads(data))
            except (ValueError, KeyError, TypeError):
                self.broken = True

    def _event(self, event: dict[str, Any]) -> None:
        if "error" in event:
            self.broken = True
            return
        for key in ("id", "created", "model", "system_fingerprint"):
            self.head.setdefault(key, event.get(key))
        if event.get("usage"):
            self.usage = event["usage"]
        for part in event.get("choices") or []:
            choice = self.choices.setdefault(part["index"], {"index": part["index"], "finish_reason": None})
            if part.get("finish_reason"):
                choice["finish_reason"] = part["finish_reason"]
            if part.get("stop_reason") is not None:
                choice["stop_reason"] = part["stop_reason"]
            if part.get("logprobs"):
                self._logprobs(choice, part["logprobs"])
            if self.route == "chat":
                message = choice.setdefault("message", {"role": "assistant", "content": None})
                self._delta(message, part.get("delta") or {})
            else:
                choice["text"] = choice.get("text", "") + (part.get("text") or "")

    def _delta(self, message: dict[str, Any], delta: dict[str, Any]) -> None:
        for key, value in delta.items():
            if key == "role":
                message["role"] = value
            elif key in self._CHAT_TEXT:
                if value is not None:
                    message[key] = (message.get(key) or "") + value
            elif key == "tool_calls":
                calls = message.setdefault("tool_calls", [])
                for call in value or []:
                    while len(calls) <= call["index"]:
                        calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                    slot = calls[call["index"]]
                    slot["id"] = call.get("id") or slot["id"]
                    function = call.get("function") or {}
                    slot["function"]["name"] += function.get("name") or ""
                    slot["function"]["arguments"] += function.get("arguments") or ""
            elif value not in (None, [], ""):
                self.broken = True  # a field we cannot assemble faithfully: never cache it

    def _logprobs(self, choice: dict[str, Any], logprobs: dict[str, Any]) -> None:
        merged = choice.setdefault("logprobs", {})
        for key, value in logprobs.items():
            if isinstance(value, list):
                merged[key] = merged.get(key, []) + value
            elif value is not None:
                self.broken = True

    def result(self) -> dict[str, Any] | None:
        if not self.done or self.broken or not self.choices:
            return None
        if any(c["finish_reason"] is None for c in self.choices.values()):
            return None
        obj = "chat.completion" if self.route == "chat" else "text_completion"
        answer = {**{k: v for k, v in self.head.items() if v is not None}, "object": obj,
                  "choices": [self.choices[i] for i in sorted(self.choices)]}
        if self.usage:
            answer["usage"] = self.usage
        return answer
