"""Usage metering of one answer: the tap the relay (serving.gateway.relay) hands every answer to.

It takes the usage of the answer (a non-streamed body's `usage`; for a stream the engine's token counts,
protocol.Usage items that travel with the stream and never reach the client, or the final event of a
named-event stream), settles the request's admission with it (limits and the key's usage records), fills
the response cache, and for a stream cut short counts what was sent, so that hanging up early escapes no
token limit. The client's `stream_options` reach vLLM as sent: the usage it shows is the usage asked for.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from serving.engine.protocol import Route, Usage
from serving.gateway.cache import StreamAssembler
from serving.gateway.errors import stream_error
from serving.gateway.limits import Admission
from serving.gateway.metrics import Watch
from serving.gateway.responses import Turn, save
from serving.gateway.services import Services
from serving.gateway.specs import SPECS, RouteSpec


class Accounting:
    """The relay's tap: takes usage from the answer, fills the cache, records usage and metrics at the end.

    prompt_estimate: the prompt's tokens as estimated for the reservation, billed for a stream cut before
    the engine reported its prompt's tokens (or from an engine that reports none)."""

    def __init__(self, svc: Services, admission: Admission, model: str, route: Route, watch: Watch, *,
                 cache_key: str | None, prompt_estimate: int = 0):
        self.svc, self.admission, self.model, self.watch, self.route = svc, admission, model, watch, route
        self.cache_key = cache_key
        self.assembler = StreamAssembler(route) if cache_key else None
        # bookkeeping the client must be able to rely on once it has the answer (a stored response it may
        # continue at once): the relay waits for it before sending the next chunk, routes before the body
        self.saving: asyncio.Future | None = None
        self.usage: dict[str, Any] | None = None
        self.report: Usage | None = None  # the engine's last token counts of a stream
        self.prompt_estimate = prompt_estimate
        self.events = 0  # streamed events with output, to count tokens of a stream cut short

    def body(self, status: int, body: bytes) -> bytes:
        """A non-streamed answer: its usage is settled; returns the body the client gets (`answered`)."""
        if status != 200:
            return body
        answer = json.loads(body)
        self.usage = SPECS[self.route].usage(answer)
        self.svc.metrics.tokens(self.model, self.usage)
        self.admission.settle(self.model, self.usage, cached=False)
        return self.answered(answer, body)

    def answered(self, answer: dict[str, Any], body: bytes) -> bytes:
        """After a non-streamed answer's usage is settled: it fills the cache; the body is sent as it is."""
        if self.cache_key:
            self.svc.spawn(self.svc.cache.put(self.cache_key, body))
        return body

    def failure(self, status: int, message: str, code: str | None) -> str:
        """The in-band end of a stream that fails after it started (the relay sends it)."""
        return stream_error(SPECS[self.route].dialect, status, message, code)

    def reported(self, usage: Usage) -> None:
        self.report = usage

    def chunk(self, chunk: str) -> str:
        self.watch.chunk()
        self.events += chunk.count('"choices":[{')
        if self.assembler is not None:
            self.assembler.feed(chunk)
        return chunk

    def said(self) -> tuple[int, int | None]:
        """The prompt and completion tokens the stream's own events reported (0 / None: nothing)."""
        return 0, None

    def stream_usage(self) -> dict[str, Any] | None:
        """A stream's usage: the engine's final counts; for a stream cut short (or an engine that reports
        none) the prompt's tokens as the stream said (`said`), else as the engine reported, else estimated,
        and the completion's as the stream said, else one token per event sent (at least those reported)."""
        prompt, completion = self.said()
        report = self.report
        if report is not None and report.final:
            return report.as_openai()
        if not (self.events or report or prompt or completion):
            return None  # nothing reached the engine's output: nothing to bill
        prompt = prompt or (report.prompt_tokens if report is not None else 0) or self.prompt_estimate
        if completion is None:
            completion = max(self.events, report.completion_tokens if report is not None else 0)
        return Usage(prompt, completion).as_openai()

    def end(self) -> None:
        if self.usage is None:
            self.usage = self.stream_usage()
        self.admission.settle(self.model, self.usage, cached=False)
        self.watch.finish(200, self.usage)  # releases the admission: after its usage is settled
        result = self.assembler.result() if self.assembler is not None else None
        if result is not None and self.cache_key:
            if "usage" not in result and self.usage is not None:  # the client asked for none: the engine's
                result["usage"] = self.usage
            self.svc.spawn(self.svc.cache.put(self.cache_key, json.dumps(result, separators=(",", ":")).encode()))


class EventAccounting(Accounting):
    """The tap of a named-event stream (`event: <type>\\ndata: <json>`): the Responses API and Anthropic's
    Messages API. Usage comes from the stream's own events; for a stream cut short, the input tokens it
    (or the engine) reported so far and one output token per text delta sent. `turn` (Responses): the
    stored-response bookkeeping, whose response objects the client sees patched and whose final response is stored."""

    # (usage events, delta event) per dialect: the Responses API ends with response.completed (or
    # .incomplete/.failed) carrying the response and its usage; Messages has its input tokens in
    # message_start and the running output tokens in message_delta
    _DELTA = {"responses": "event: response.output_text.delta", "anthropic": "event: content_block_delta"}
    _TERMINAL = ("response.completed", "response.incomplete", "response.failed")
    _WITH_RESPONSE = ("response.created", "response.in_progress", *_TERMINAL)

    def __init__(self, svc: Services, admission: Admission, model: str, route: Route, watch: Watch, *,
                 turn: Turn | None = None, owner: str = "", prompt_estimate: int = 0):
        super().__init__(svc, admission, model, route, watch, cache_key=None, prompt_estimate=prompt_estimate)
        self.spec: RouteSpec = SPECS[route]
        self.turn, self.owner = turn, owner
        self.input_tokens = 0
        self.output_tokens: int | None = None
        self._delta = self._DELTA.get(self.spec.dialect, "\0")

    def answered(self, answer: dict[str, Any], body: bytes) -> bytes:
        """A Responses turn: the client gets the response patched (its store fields), and it is stored."""
        if self.turn is None:
            return body
        response = self.turn.patch(answer)
        self.saving = asyncio.ensure_future(save(self.svc, self.owner, self.turn, response))
        return json.dumps(response, separators=(",", ":")).encode()

    def chunk(self, chunk: str) -> str:
        self.watch.chunk()
        self.events += chunk.count(self._delta)
        if self.spec.dialect == "anthropic":
            if "event: message_start" not in chunk and "event: message_delta" not in chunk:
                return chunk
        elif "event: response." not in chunk or not any(f"event: {kind}" in chunk for kind in self._WITH_RESPONSE):
            return chunk
        return "\n\n".join(self._event(event) for event in chunk.split("\n\n"))

    def _event(self, event: str) -> str:
        kind, _, data = event.partition("\ndata: ")
        kind = kind.removeprefix("event: ")
        if not data.startswith("{"):
            return event
        if self.spec.dialect == "anthropic":
            payload = json.loads(data)
            if kind == "message_start":
                usage = (payload.get("message") or {}).get("usage") or {}
                self.input_tokens = int(usage.get("input_tokens") or 0)
            elif kind == "message_delta":
                usage = payload.get("usage") or {}
                if isinstance(usage.get("output_tokens"), int):
                    self.output_tokens = usage["output_tokens"]
                if isinstance(usage.get("input_tokens"), int) and usage["input_tokens"]:
                    self.input_tokens = usage["input_tokens"]
            return event
        if kind not in self._WITH_RESPONSE:
            return event
        payload = json.loads(data)
        response = payload.get("response")
        if not isinstance(response, dict):
            return event
        if self.turn is not None:
            self.turn.patch(response)
        if kind in self._TERMINAL:
            self.usage = self.spec.usage(response)
            if self.turn is not None:
                self.saving = asyncio.ensure_future(save(self.svc, self.owner, self.turn, response))
        if self.turn is None:
            return event
        return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}"

    def said(self) -> tuple[int, int | None]:
        return self.input_tokens, self.output_tokens
