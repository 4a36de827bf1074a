"""Locust users for any OpenAI-compatible server, with LLM metrics in locust's own stats and CSVs.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000/v1 --models demo-chat
    python -m loadtests.run --profile loadtests/profiles/smoke.toml --base-url http://127.0.0.1:8000/v1

Users (pick them as locust positional arguments; `python -m loadtests.run` does from a profile):
    ChatStreamUser   streamed chat            ChatUser         non-streamed chat
    CompletionUser   streamed text completion EmbeddingUser    embeddings
    CacheMixUser     a few repeated prompts at temperature 0, streamed and not (x-cache hit/miss)
    MultiModelUser   streamed chat, a random model of --models per request
    MultiTurnChatUser  conversations as chat clients hold them: a system prompt of its own (--input-tokens
                     words), --turns turns, every turn resending the whole history with the earlier answers
                     (what prefix-cache affinity is measured on: docs/benchmarks.md); rows "<model> [turn 1]"
                     and "<model> [turn 2+]"

Rows in locust's stats (Type / Name), besides each request's own row (`chat-stream` / model ...):
    TTFT / model        time to first token, ms (first chunk carrying text; the cache mix's rows are
                        named "<model> [cache mix]")
    ITL / model         every gap between chunks carrying text, ms
    TPOT / model        per request: (latency - TTFT) / (output tokens - 1), ms
    TOKENS/S / model    per request: output tokens / latency; the "ms" columns hold tokens/s and the
                        content size column holds the request's output tokens
    THROUGHPUT / output tokens/s   once a second: output tokens received in that second
    CACHE / model hit|miss         latency of answers by their x-cache header (hit or miss), when sent
A stream counts as failed unless it ends with [DONE], carries a finish_reason and no error event.
Users are closed-loop (no wait between requests): the user count is the concurrency.

`--llm-samples PREFIX` also writes every request (PREFIX_llm_requests.csv) and every inter-token gap
(PREFIX_llm_itl.csv) with full precision, which `loadtests.report` turns into plots and a summary.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # `locust -f loadtests/locustfile.py` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gevent
import requests
from locust import User, constant, events, task
from locust.runners import MasterRunner, WorkerRunner

from loadtests.workload import PromptSource, embedding_body, generation_body
from serving.compare import Measured, StreamMeter, auth_headers, measure_body

REQUEST_COLUMNS = ["start", "end", "user", "kind", "model", "ok", "error", "status", "latency_ms", "ttft_ms",
                   "tpot_ms", "output_tokens", "prompt_tokens", "tokens_per_s", "cache"]
ITL_COLUMNS = ["time", "kind", "model", "itl_ms"]


@events.init_command_line_parser.add_listener
def _options(parser: argparse.ArgumentParser) -> None:
    # on the parser itself, not an argument group: only locust's parser knows is_secret
    group = parser
    group.add_argument("--models", default="", help="comma-separated generation models (default: GET /models)")
    group.add_argument("--embedding-models", default="",
                       help="comma-separated embedding models (default: GET /models kind=embed)")
    group.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", ""), is_secret=True,
                       help="Authorization: Bearer key (default: $OPENAI_API_KEY); a comma-separated list "
                       "spreads users over keys")
    group.add_argument("--prompts", default="", help="JSONL prompt file (one request per line); default: generated")
    group.add_argument("--input-tokens", type=int, default=128, help="words per generated prompt (~tokens)")
    group.add_argument("--output-tokens", type=int, default=64, help="max_tokens per request")
    group.add_argument("--ignore-eos", default="true", choices=["true", "false"],
                       help="send vLLM's ignore_eos so every answer is max_tokens long (drop for other servers)")
    group.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: server's)")
    group.add_argument("--cache-pool", type=int, default=8, help="distinct prompts in the cache-heavy mix")
    group.add_argument("--embedding-batch", type=int, default=1, help="inputs per embeddings request")
    group.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    group.add_argument("--llm-samples", default="", help="write every request and token gap under this CSV prefix")
    group.add_argument("--turns", type=int, default=6, help="turns of each conversation of MultiTurnChatUser")


class Samples:
    """Every request and inter-token gap of this process, kept for the precise CSVs and plots."""

    def __init__(self) -> None:
        self.requests: list[list[Any]] = []
        self.itl: list[tuple[float, str, str, float]] = []
        self.tokens_this_second = 0

    def write(self, prefix: str, suffix: str = "") -> None:
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        with open(f"{prefix}_llm_requests{suffix}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(REQUEST_COLUMNS)
            writer.writerows(self.requests)
        with open(f"{prefix}_llm_itl{suffix}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(ITL_COLUMNS)
            writer.writerows((f"{t:.6f}", k, m, f"{g:.4f}") for t, k, m, g in self.itl)


SAMPLES = Samples()
_USER_NUMBERS = itertools.count()


def _ticker(environment) -> None:
    """Once a second: output tokens received in that second, as a THROUGHPUT row in locust's stats."""
    while True:
        gevent.sleep(1.0 - time.time() % 1.0)
        tokens, SAMPLES.tokens_this_second = SAMPLES.tokens_this_second, 0
        environment.events.request.fire(request_type="THROUGHPUT", name="output tokens/s", response_time=tokens,
                                        response_length=tokens, exception=None, context={})


_TICKER: list[Any] = []


@events.test_start.add_listener
def _start(environment, **_: Any) -> None:
    if not isinstance(environment.runner, MasterRunner) and not _TICKER:
        _TICKER.append(gevent.spawn(_ticker, environment))


@events.test_stop.add_listener
def _stop(environment, **_: Any) -> None:
    while _TICKER:
        _TICKER.pop().kill(block=False)
    prefix = environment.parsed_options.llm_samples if environment.parsed_options else ""
    if prefix and not isinstance(environment.runner, MasterRunner):
        runner = environment.runner
        worker = runner.client_id.replace(os.sep, "_") if isinstance(runner, WorkerRunner) else ""
        SAMPLES.write(prefix, f"_{worker}" if worker else "")


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


_DISCOVERED: dict[str, list[str]] = {}


def _discover(host: str, headers: dict[str, str], kind: str) -> list[str]:
    """Models from GET /models; the platform's cards say `kind`, other servers' cards count as generate."""
    if not _DISCOVERED:
        cards = requests.get(host.rstrip("/") + "/models", headers=headers, timeout=30).json().get("data", [])
        _DISCOVERED["embed"] = [c["id"] for c in cards if c.get("kind") == "embed"]
        _DISCOVERED["generate"] = [c["id"] for c in cards if c.get("kind", "generate") == "generate"]
    return _DISCOVERED[kind]


class LLMUser(User):
    """Base of the users: one HTTP session, one model (or several), closed loop."""

    abstract = True
    wait_time = constant(0)
    model_kind = "generate"
    metric_suffix = ""  # added to the model name in the TTFT/ITL/TPOT/TOKENS/S rows

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.opts = opts
        self.number = next(_USER_NUMBERS)
        keys = _split(opts.api_key)
        key = keys[self.number % len(keys)] if keys else None  # users spread over the keys
        self.headers = {"Content-Type": "application/json", **auth_headers(key)}
        self.base = (self.host or "").rstrip("/")
        self.session = requests.Session()
        listed = _split(opts.embedding_models if self.model_kind == "embed" else opts.models)
        self.models = listed or _discover(self.base, self.headers, self.model_kind)
        if not self.models:
            raise RuntimeError(f"no {self.model_kind} model: pass --models / --embedding-models")
        self.model = self.models[self.number % len(self.models)]
        self.prompts = PromptSource(opts.prompts or None, input_tokens=opts.input_tokens, seed=self.number * 7919 + 1)

    def on_stop(self) -> None:
        self.session.close()

    # ------------------------------------------------------------------ one request, measured

    def generate(self, kind: str, model: str, *, chat: bool, stream: bool, item: dict[str, Any] | None = None,
                 temperature: float | None = None) -> Measured:
        opts = self.opts
        body = generation_body(item or self.prompts.next(), model, chat=chat, stream=stream,
                               max_tokens=opts.output_tokens, ignore_eos=opts.ignore_eos == "true",
                               temperature=temperature if temperature is not None else opts.temperature)
        path = "/chat/completions" if chat else "/completions"
        return self.send(kind, model, path, body, stream)

    def send(self, kind: str, model: str, path: str, body: dict[str, Any], stream: bool) -> Measured:
        started_at = time.time()
        start = time.perf_counter()
        size = 0
        try:
            with self.session.post(self.base + path, data=json.dumps(body), headers=self.headers, stream=stream,
                                   timeout=self.opts.request_timeout) as response:
                is_sse = response.headers.get("content-type", "").startswith("text/event-stream")
                if stream and response.status_code == 200 and is_sse:
                    meter = StreamMeter(start)
                    for line in response.iter_lines():
                        now = time.perf_counter()
                        size += len(line) + 1
                        seen = meter.chunks
                        meter.feed(line, now)
                        if meter.chunks > seen:
                            SAMPLES.tokens_this_second += 1
                    result = meter.finish(time.perf_counter())
                    # usage counts tokens exactly; the running count counted chunks
                    SAMPLES.tokens_this_second += max(0, result.output_tokens - meter.chunks)
                else:
                    content = response.content
                    size = len(content)
                    result = measure_body(content, response.status_code, start, time.perf_counter())
                    if result.ok and stream:
                        got = response.headers.get("content-type") or "no content-type"
                        result.ok, result.error = False, f"asked for a stream, got {got}"
                    SAMPLES.tokens_this_second += result.output_tokens if result.ok else 0
                result.status = response.status_code
                result.cache = response.headers.get("x-cache")
        except Exception as exc:  # noqa: BLE001 - connection errors, timeouts: this request failed
            result = Measured(error=f"{type(exc).__name__}: {exc}"[:300], latency=time.perf_counter() - start)
        self.record(kind, model, result, started_at, size)
        return result

    def record(self, kind: str, model: str, r: Measured, started_at: float, size: int) -> None:
        fire = self.environment.events.request.fire
        metric_name = model + self.metric_suffix
        latency_ms = (r.latency or 0.0) * 1000
        fire(request_type=kind, name=model, response_time=latency_ms, response_length=size,
             exception=None if r.ok else RuntimeError(r.error), context={}, start_time=started_at)
        ttft_ms = r.ttft * 1000 if r.ttft is not None else None
        tpot_ms = r.tpot * 1000 if r.tpot is not None else None
        tps = r.tokens_per_s
        if r.ok:
            if ttft_ms is not None:
                fire(request_type="TTFT", name=metric_name, response_time=ttft_ms, response_length=0, exception=None,
                     context={})
            now = time.time()
            for gap in r.itl:
                fire(request_type="ITL", name=metric_name, response_time=gap * 1000, response_length=0, exception=None,
                     context={})
            if r.itl:
                # times of the gaps, back from now: precise enough for per-second plots
                t, stamps = now, []
                for gap in reversed(r.itl):
                    stamps.append(t)
                    t -= gap
                SAMPLES.itl.extend((s, kind, model, g * 1000) for s, g in zip(reversed(stamps), r.itl, strict=True))
            if tpot_ms is not None:
                fire(request_type="TPOT", name=metric_name, response_time=tpot_ms, response_length=0, exception=None,
                     context={})
            if tps is not None:
                fire(request_type="TOKENS/S", name=metric_name, response_time=tps, response_length=r.output_tokens,
                     exception=None, context={})
            if r.cache in ("hit", "miss"):
                fire(request_type="CACHE", name=f"{model} {r.cache}", response_time=latency_ms, response_length=size,
                     exception=None, context={})
        SAMPLES.requests.append([
            f"{started_at:.6f}", f"{started_at + (r.latency or 0):.6f}", type(self).__name__, kind, model, int(r.ok),
            r.error or "", r.status or "", f"{latency_ms:.3f}", "" if ttft_ms is None else f"{ttft_ms:.3f}",
            "" if tpot_ms is None else f"{tpot_ms:.4f}", r.output_tokens if r.ok else "",
            r.prompt_tokens if r.prompt_tokens is not None else "", "" if tps is None or not r.ok else f"{tps:.3f}",
            r.cache or "",
        ])


class ChatStreamUser(LLMUser):
    @task
    def chat_stream(self) -> None:
        self.generate("chat-stream", self.model, chat=True, stream=True)


class ChatUser(LLMUser):
    @task
    def chat(self) -> None:
        self.generate("chat", self.model, chat=True, stream=False)


class CompletionUser(LLMUser):
    @task
    def completion_stream(self) -> None:
        self.generate("completion-stream", self.model, chat=False, stream=True)


class EmbeddingUser(LLMUser):
    model_kind = "embed"

    @task
    def embed(self) -> None:
        items = [self.prompts.next() for _ in range(max(1, self.opts.embedding_batch))]
        self.send("embedding", self.model, "/embeddings", embedding_body(items, self.model), stream=False)


class CacheMixUser(LLMUser):
    """A few prompts over and over at temperature 0: what a response cache should turn into hits.

    Its TTFT/ITL/TPOT/TOKENS/S rows are named "<model> [cache mix]": cached answers stay apart.
    """

    metric_suffix = " [cache mix]"

    def on_start(self) -> None:
        super().on_start()
        self.prompts = PromptSource(self.opts.prompts or None, input_tokens=self.opts.input_tokens,
                                    pool=max(1, self.opts.cache_pool), seed=0)
        self.prompts.rng = random.Random(self.number)

    @task
    def cached(self) -> None:
        stream = random.random() < 0.5
        self.generate("cache-stream" if stream else "cache", self.model, chat=True, stream=stream, temperature=0.0)


class MultiModelUser(LLMUser):
    """Streamed chat to a random model of --models for every request."""

    @task
    def any_model(self) -> None:
        self.generate("multi-stream", random.choice(self.models), chat=True, stream=True)


class MultiTurnChatUser(LLMUser):
    """Conversations one after another, each with a system prompt of its own and --turns turns; every turn
    sends the whole history (the answers the model gave included), as chat clients do. A server that keeps
    each conversation on the replica holding its prefix answers the later turns faster: their TTFT rows
    ("<model> [turn 2+]") against "<model> [turn 1]" show it."""

    def on_start(self) -> None:
        super().on_start()
        self.conversation = 0
        self.history: list[dict[str, Any]] = []
        self.turn = 0

    def _new_conversation(self) -> None:
        self.conversation += 1
        system = self.prompts.next()
        user = self.prompts.next()
        self.history = [{"role": "system", "content": _text_of(system)},
                        {"role": "user", "content": _text_of(user)[:400]}]
        self.turn = 0

    @task
    def turn_of_a_conversation(self) -> None:
        if not self.history or self.turn >= self.opts.turns:
            self._new_conversation()
        opts = self.opts
        body = {"model": self.model, "messages": self.history, "max_tokens": opts.output_tokens, "stream": True,
                "stream_options": {"include_usage": True}}
        if opts.ignore_eos == "true":
            body["ignore_eos"] = True
        if opts.temperature is not None:
            body["temperature"] = opts.temperature
        self.metric_suffix = " [turn 1]" if self.turn == 0 else " [turn 2+]"
        result = self.send("multi-turn", self.model, "/chat/completions", body, stream=True)
        self.turn += 1
        if not result.ok:
            self.history = []  # a failed turn ends the conversation
            return
        self.history = self.history + [{"role": "assistant", "content": result.text or "..."},
                                       {"role": "user", "content": f"And then? ({self.turn})"}]


def _text_of(item: dict[str, Any]) -> str:
    """The text of a prompt source item (a chat message list or a prompt)."""
    if "messages" in item:
        return " ".join(str(m.get("content", "")) for m in item["messages"])
    return str(item.get("prompt", ""))

