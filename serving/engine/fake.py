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
import struct
import time
from typing import Any, AsyncIterator

from serving.engine.protocol import Reply, Route

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
    fail_after: raise after this many tokens of a stream (to test in-band errors).
    """

    def __init__(self, name: str, *, ttft_s: float = 0.0, itl_s: float = 0.0, dim: int = 8,
                 fail_after: int | None = None, max_model_len: int = 4096):
        self.name = name
        self.max_model_len = max_model_len
        self.ttft_s, self.itl_s, self.dim, self.fail_after = ttft_s, itl_s, dim, fail_after
        self.started: list[str] = []  # request ids seen
        self.aborted: list[str] = []  # request ids whose stream was closed before the end
        self.in_flight = 0

    async def ready(self) -> bool:
        return True

    async def stats(self) -> dict[str, float]:
        finished = len(self.started) - self.in_flight - len(self.aborted)
        return {"unfinished": self.in_flight, "finished": finished, "aborted": len(self.aborted),
                "generation_tokens": 0}

    async def generate(self, route: Route, body: bytes, request_id: str,
                       timeout_s: float | None = None) -> AsyncIterator[Reply | str]:
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

    async def _generate(self, route: Route, request: dict[str, Any], request_id: str) -> AsyncIterator[Reply | str]:
        if route == "embedding":
            yield self._embed(request)
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

    async def _stream(self, route, request, request_id, words, usage, finish) -> AsyncIterator[str]:
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
        if chat:
            yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}], **running(0)})
        for i, word in enumerate(words):
            if i:
                await asyncio.sleep(self.itl_s)
            if self.fail_after is not None and i >= self.fail_after:
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
