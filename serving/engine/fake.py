"""A deterministic engine for tests and gateway benchmarks (no torch, no vllm).

Same interface and yield convention as the vLLM engine (serving.engine.protocol.Engine). The
answer is a pure function of the request: words picked by a hash of the prompt, `max_tokens` of
them (default 16), with a configurable time to first token and inter-token delay, the way Ray's
mock vLLM engine works.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import struct
import time
from typing import Any, AsyncIterator

from serving.engine.protocol import Reply, Route, Usage

WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu")


def _error(status: int, message: str, param: str | None = None) -> Reply:
    kind = "BadRequestError" if status == 400 else "InternalServerError"
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return Reply(status, json.dumps(body).encode())


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"  # compact, as vLLM sends it


class FakeEngine:
    """Deterministic stand-in for one model.

    ttft_s: delay before the first token; itl_s: delay between tokens; dim: embedding size;
    fail_after: raise after this many tokens of a stream (to test in-band errors); reports_usage: a
    stream carries its token counts (protocol.Usage) as VLLMEngine's do (False: an engine that sends none).
    """

    def __init__(self, name: str, *, ttft_s: float = 0.0, itl_s: float = 0.0, dim: int = 8,
                 fail_after: int | None = None, max_model_len: int = 4096, reports_usage: bool = True):
        self.name = name
        self.reports_usage = reports_usage
        self.max_model_len = max_model_len
        self.ttft_s, self.itl_s, self.dim, self.fail_after = ttft_s, itl_s, dim, fail_after
        self.started: list[str] = []  # request ids seen
        self.aborted: list[str] = []  # request ids whose stream was closed before the end
        self.in_flight = 0
        self.adapters: dict[str, str] = {}  # LoRA adapters loaded at runtime: name -> source

    async def load_adapter(self, name: str, source: str) -> None:
        """As vLLM's loader does for the fake: a local directory must exist (an fsspec URL of another scheme is
        taken as it is)."""
        path = source.removeprefix("file://")
        if "://" not in path and not os.path.isdir(path):
            raise ValueError(f"No adapter found at {source}")
        self.adapters[name] = source

    async def loaded_adapters(self) -> set[str]:
        return set(self.adapters)

    async def ready(self) -> bool:
        return True

    async def stats(self) -> dict[str, float]:
        finished = len(self.started) - self.in_flight - len(self.aborted)
        return {"unfinished": self.in_flight, "finished": finished, "aborted": len(self.aborted),
                "generation_tokens": 0}

    async def generate(self, route: Route, body: bytes, request_id: str, timeout_s: float | None = None, *,
                       affinity: str | None = None, adapter: str | None = None,
                       adapter_source: str | None = None) -> AsyncIterator[Reply | str | Usage]:
        if adapter is not None and adapter_source is not None and adapter not in self.adapters:
            try:
                await self.load_adapter(adapter, adapter_source)
            except ValueError as exc:
                yield _error(400, f"The LoRA adapter {adapter!r} cannot be loaded: {exc}", "model")
                return
        self.started.append(request_id)
        self.in_flight += 1
        done = False
        try:
            async for item in self._generate(route, json.loads(body), request_id):
                yield item
            done = True
        finally:
            self.in_flight -= 1
            if not done and request_id not in self.aborted:  # closed or cancelled before its end
                self.aborted.append(request_id)

    async def _generate(self, route: Route, request: dict[str, Any],
                        request_id: str) -> AsyncIterator[Reply | str | Usage]:
        if route == "embedding":
            yield self._embed(request)
            return
        if route in ("responses", "messages", "count_tokens", "rerank", "score", "tokenize", "detokenize"):
            async for item in self._other(route, request, request_id):
                yield item
            return
        prompt = self._prompt(route, request)
        if prompt is None:
            yield _error(400, "messages must be a non-empty list" if route == "chat" else "prompt is required",
                         "messages" if route == "chat" else "prompt")
            return
        max_tokens = request.get("max_completion_tokens") or request.get("max_tokens") or 16
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= self.max_model_len:
            yield _error(400, f"max_tokens must be between 1 and {self.max_model_len}", "max_tokens")
            return
        words = self._words(prompt, max_tokens)
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(words),
                 "total_tokens": len(prompt.split()) + len(words)}
        finish = "length" if len(words) == max_tokens else "stop"
        if not request.get("stream"):
            await asyncio.sleep(self.ttft_s + self.itl_s * (len(words) - 1))
            yield Reply(200, json.dumps(self._complete(route, request, request_id, words, usage, finish)).encode())
            return
        yield Reply(200, None)
        done = False
        try:
            async for chunk in self._stream(route, request, request_id, words, usage, finish):
                yield chunk
            done = True
        finally:
            if not done:
                self.aborted.append(request_id)

    @staticmethod
    def _prompt(route: Route, request: dict[str, Any]) -> str | None:
        if route == "chat":
            messages = request.get("messages")
            if not isinstance(messages, list) or not messages:
                return None
            return " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        prompt = request.get("prompt")
        return prompt if isinstance(prompt, str) and prompt else None

    @staticmethod
    def _words(prompt: str, n: int) -> list[str]:
        digest = hashlib.sha256(prompt.encode()).digest()
        return [WORDS[digest[i % len(digest)] % len(WORDS)] for i in range(n)]

    def _complete(self, route, request, request_id, words, usage, finish) -> dict[str, Any]:
        text = " ".join(words)
        if route == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                      "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        return {"id": f"fake-{request_id}", "object": obj, "created": int(time.time()), "model": request["model"],
                "choices": [choice], "usage": usage}

    async def _stream(self, route, request, request_id, words, usage, finish) -> AsyncIterator[str | Usage]:
        chat = route == "chat"
        base = {"id": f"fake-{request_id}", "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": request["model"]}
        options = request.get("stream_options") or {}
        include_usage = bool(options.get("include_usage"))
        prompt_tokens = usage["prompt_tokens"]

        def running(tokens: int) -> dict[str, Any]:  # vLLM's continuous_usage_stats, on every choice chunk
            if not (include_usage and options.get("continuous_usage_stats")):
                return {}
            return {"usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + tokens,
                              "completion_tokens": tokens}}

        await asyncio.sleep(self.ttft_s)
        if self.reports_usage:
            yield Usage(prompt_tokens, 0)
        if chat:
            yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}], **running(0)})
        for i, word in enumerate(words):
            if i:
                await asyncio.sleep(self.itl_s)
            if self.fail_after is not None and i >= self.fail_after:
                if self.reports_usage:
                    yield Usage(prompt_tokens, i, final=True)
                yield _sse({"error": {"message": "engine failed", "type": "InternalServerError", "param": None,
                                      "code": 500}})
                yield "data: [DONE]\n\n"
                return
            piece = word if i == 0 else " " + word
            last = i == len(words) - 1
            choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
            choice["finish_reason"] = finish if last else None
            yield _sse({**base, "choices": [choice], **running(i + 1)})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": usage})
        if self.reports_usage:
            yield Usage(prompt_tokens, len(words), final=True)
        yield "data: [DONE]\n\n"

    def _embed(self, request: dict[str, Any]) -> Reply:
        inputs = request.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
            return _error(400, "input must be a string or a list of strings", "input")
        fmt = request.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            return _error(400, "encoding_format must be float or base64", "encoding_format")
        data = []
        for i, text in enumerate(inputs):
            digest = hashlib.sha256(text.encode()).digest()
            vector = [(digest[j % len(digest)] - 128) / 128 for j in range(self.dim)]
            embedding: Any = (vector if fmt == "float"
                              else base64.b64encode(struct.pack(f"<{self.dim}f", *vector)).decode())
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        tokens = sum(len(t.split()) for t in inputs)
        body = {"object": "list", "data": data, "model": request["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return Reply(200, json.dumps(body).encode())

    # The other routes of vLLM's application, in vLLM's shapes (the Responses API's and Anthropic's
    # Messages API's objects and named events; vLLM's rerank, score, tokenize and detokenize bodies).

    async def _other(self, route: Route, request: dict[str, Any], request_id: str) -> AsyncIterator[Reply | str]:
        if route in ("rerank", "score", "tokenize", "detokenize"):
            yield self._pooling(route, request)
            return
        given = request.get("input") if route == "responses" else request.get("messages")
        prompt = _text_of(given) if route == "responses" or isinstance(given, list) else ""
        if route == "responses" and isinstance(request.get("instructions"), str):
            prompt = f"{request['instructions']} {prompt}"
        if not prompt:
            yield _error(400, "input is required" if route == "responses" else "messages must be a non-empty list",
                         "input" if route == "responses" else "messages")
            return
        if route == "count_tokens":
            yield Reply(200, json.dumps({"input_tokens": len(prompt.split())}).encode())
            return
        limit = request.get("max_output_tokens" if route == "responses" else "max_tokens") or 16
        if not isinstance(limit, int) or not 1 <= limit <= self.max_model_len:
            yield _error(400, f"max_tokens must be between 1 and {self.max_model_len}", "max_tokens")
            return
        words = self._words(prompt, limit)
        usage = {"input_tokens": len(prompt.split()), "output_tokens": len(words)}
        build = self._response if route == "responses" else self._message
        if not request.get("stream"):
            await asyncio.sleep(self.ttft_s + self.itl_s * (len(words) - 1))
            yield Reply(200, json.dumps(build(request, request_id, words, usage)).encode())
            return
        yield Reply(200, None)
        events = self._response_events if route == "responses" else self._message_events
        await asyncio.sleep(self.ttft_s)
        for i, event in enumerate(events(build(request, request_id, words, usage), words)):
            if i > 1 and self.itl_s:
                await asyncio.sleep(self.itl_s)
            yield event

    def _response(self, request, request_id, words, usage) -> dict[str, Any]:
        text = " ".join(words)
        message = {"type": "message", "id": f"msg_{request_id}", "role": "assistant", "status": "completed",
                   "content": [{"type": "output_text", "text": text, "annotations": []}]}
        return {"id": request.get("request_id") or f"resp_{request_id}", "object": "response",
                "created_at": int(time.time()), "status": "completed", "model": request["model"],
                "output": [message], "store": bool(request.get("store", True)),
                "previous_response_id": request.get("previous_response_id"),
                "usage": {**usage, "total_tokens": usage["input_tokens"] + usage["output_tokens"]}}

    @staticmethod
    def _response_events(response: dict[str, Any], words: list[str]) -> list[str]:
        def event(kind: str, number: int, **data: Any) -> str:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': number, **data})}\n\n"

        started = {**response, "status": "in_progress", "output": [], "usage": None}
        out = [event("response.created", 0, response=started)]
        for i, word in enumerate(words):
            out.append(event("response.output_text.delta", i + 1, item_id=response["output"][0]["id"],
                             output_index=0, content_index=0, delta=word if i == 0 else " " + word))
        out.append(event("response.completed", len(words) + 1, response=response))
        return out

    @staticmethod
    def _message(request, request_id, words, usage) -> dict[str, Any]:
        stop = "max_tokens" if len(words) == (request.get("max_tokens") or 16) else "end_turn"
        return {"id": f"msg_{request_id}", "type": "message", "role": "assistant", "model": request["model"],
                "content": [{"type": "text", "text": " ".join(words)}], "stop_reason": stop,
                "stop_sequence": None, "usage": usage}

    @staticmethod
    def _message_events(message: dict[str, Any], words: list[str]) -> list[str]:
        def event(kind: str, **data: Any) -> str:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"

        start = {**message, "content": [], "stop_reason": None,
                 "usage": {"input_tokens": message["usage"]["input_tokens"], "output_tokens": 0}}
        out = [event("message_start", message=start),
               event("content_block_start", index=0, content_block={"type": "text", "text": ""})]
        out += [event("content_block_delta", index=0, delta={"type": "text_delta", "text": w if i == 0 else " " + w})
                for i, w in enumerate(words)]
        out += [event("content_block_stop", index=0),
                event("message_delta", delta={"stop_reason": message["stop_reason"], "stop_sequence": None},
                      usage={"output_tokens": message["usage"]["output_tokens"]}),
                event("message_stop")]
        return out

    def _pooling(self, route: Route, request: dict[str, Any]) -> Reply:
        if route == "tokenize":
            text = request.get("prompt") if "prompt" in request else _text_of(request.get("messages"))
            if not isinstance(text, str):
                return _error(400, "prompt or messages is required", "prompt")
            ids = [WORDS.index(w) if w in WORDS else len(WORDS) + len(w) for w in text.split()]
            return Reply(200, json.dumps({"count": len(ids), "max_model_len": self.max_model_len,
                                          "tokens": ids, "token_strs": None}).encode())
        if route == "detokenize":
            given = request.get("tokens")
            if not isinstance(given, list) or not all(isinstance(t, int) and t >= 0 for t in given):
                return _error(400, "tokens must be a list of token ids", "tokens")
            return Reply(200, json.dumps({"prompt": " ".join(WORDS[t % len(WORDS)] for t in given)}).encode())
        query = request.get("query") if route == "rerank" else request.get("text_1")
        documents = request.get("documents") if route == "rerank" else request.get("text_2")
        if isinstance(documents, str):
            documents = [documents]
        if not isinstance(query, str) or not isinstance(documents, list) or not all(
                isinstance(d, str) for d in documents):
            return _error(400, "query and documents must be text" if route == "rerank" else
                          "text_1 and text_2 must be text", "query" if route == "rerank" else "text_1")
        scores = [self._similarity(query, d) for d in documents]
        tokens = sum(len(query.split()) + len(d.split()) for d in documents)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        if route == "score":
            data = [{"index": i, "object": "score", "score": v} for i, v in enumerate(scores)]
            body = {"id": "score-fake", "object": "list", "created": int(time.time()), "model": request["model"],
                    "data": data, "usage": usage}
        else:
            ranked = sorted(range(len(documents)), key=lambda i: -scores[i])[:request.get("top_n") or len(documents)]
            body = {"id": "rerank-fake", "model": request["model"], "usage": usage,
                    "results": [{"index": i, "document": {"text": documents[i]}, "relevance_score": scores[i]}
                                for i in ranked]}
        return Reply(200, json.dumps(body).encode())

    @staticmethod
    def _similarity(a: str, b: str) -> float:
        """Shared words over all words (a stand-in for an embedding model's cosine similarity)."""
        left, right = set(a.lower().split()), set(b.lower().split())
        return len(left & right) / max(1, len(left | right))


def _text_of(value: Any) -> str:
    """The text in a Responses `input` or a Messages `messages` list (strings and text parts)."""
    if isinstance(value, str):
        return value
    parts: list[str] = []
    for item in value if isinstance(value, list) else []:
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return " ".join(parts)

