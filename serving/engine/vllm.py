"""The real engine: vLLM's AsyncLLM behind vLLM's own OpenAI application, called in-process.

We do not re-implement the OpenAI layer. vLLM's `build_app` + `init_app_state` build exactly the
application `vllm serve` runs (request validation, chat templates, tools, structured output,
logprobs, error bodies, SSE framing); we call it as an ASGI app in the same process, with no
socket in between, and hand its status, body and stream chunks to the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
from typing import Any, AsyncIterator

from serving.config import ModelConfig
from serving.engine.protocol import PATHS, Reply, Route, Usage

logger = logging.getLogger(__name__)

_END = object()  # the ASGI app returned
# the token counts of the API request whose ASGI task runs (set around its creation: the task copies it)
_COUNTS: contextvars.ContextVar[TokenCounts | None] = contextvars.ContextVar("serving_token_counts", default=None)
# vLLM's HTTP middleware that the gateway does itself (CORS; HTTP metrics, which nobody scrapes in a replica):
# each wraps every chunk's `send`
_SKIPPED_MIDDLEWARE = ("CORSMiddleware", "PrometheusInstrumentatorMiddleware")


class VLLMEngine:
    """Implements serving.engine.protocol.Engine with a vLLM engine in this process."""

    def __init__(self, model: ModelConfig, *, ray_metrics: bool = False):
        """ray_metrics: export vLLM's metrics through Ray's per-node agent (inside Ray Serve)."""
        self.model = model
        self.ray_metrics = ray_metrics
        self._app: Any = None
        self._client: Any = None
        self._stack = contextlib.AsyncExitStack()
        self._totals = {"finished": 0, "aborted": 0, "generation_tokens": 0}
        self._adapter_lock = asyncio.Lock()

    async def _engine_client(self, args) -> Any:
        """AsyncLLM as `vllm serve` builds it, plus our stat loggers (vLLM's own helper takes none)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.cli_args import propagate_flash_late_interaction
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        engine_args = AsyncEngineArgs.from_cli_args(args)
        propagate_flash_late_interaction(args, engine_args)
        vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        loggers: list[Any] = [_totals_logger(self._totals)]
        if self.ray_metrics:
            from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

            loggers.append(RayPrometheusStatLogger)  # replaces vLLM's per-process Prometheus logger
        client = AsyncLLM.from_vllm_config(
            vllm_config=vllm_config, usage_context=UsageContext.OPENAI_API_SERVER, stat_loggers=loggers,
            enable_log_requests=engine_args.enable_log_requests,
            aggregate_engine_logging=engine_args.aggregate_engine_logging,
            disable_log_stats=engine_args.disable_log_stats)
        self._stack.callback(client.shutdown, timeout=vllm_config.shutdown_timeout)
        await client.reset_mm_cache()
        return client

    async def start(self) -> None:
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app

        from serving.engine.vllm_args import build_namespace

        args = build_namespace(self.model)
        client = await self._engine_client(args)
        tasks = await client.get_supported_tasks()
        app = build_app(args, tasks, client.model_config)
        await init_app_state(client, app.state, args, tasks)
        # the app's lifespan runs vLLM's periodic stats logging, as under `vllm serve`
        await self._stack.enter_async_context(app.router.lifespan_context(app))
        app.user_middleware = [m for m in app.user_middleware if m.cls.__name__ not in _SKIPPED_MIDDLEWARE]
        app.middleware_stack = None  # built again from the list on the first call
        client.generate = _counting(client.generate)  # vLLM's OpenAI layer calls it on this object
        self._client, self._app = client, app
        logger.info("model %s ready (tasks: %s)", self.model.name, ", ".join(tasks))

    async def stop(self) -> None:
        self._app = None
        await self._stack.aclose()

    async def ready(self) -> bool:
        return self._app is not None and not self._client.errored

    async def stats(self) -> dict[str, float]:
        """Requests the engine holds now, requests it finished (stop/length) or aborted, tokens generated."""
        unfinished = 0 if self._client is None else self._client.get_num_unfinished_requests()
        return {"unfinished": unfinished, **self._totals}

    async def loaded_adapters(self) -> set[str]:
        """The LoRA adapters (served names) the engine holds loaded now: vLLM loads one on its first
        request and keeps up to max_loras on the device, max_cpu_loras in memory (least recently used
        go first)."""
        if self._app is None or self._client is None or self._client.vllm_config.lora_config is None:
            return set()  # a model without LoRA: vLLM's worker would raise (and log) for every question
        ids = await self._client.list_loras()
        known = self._app.state.openai_serving_models.lora_requests
        return {name for name, request in known.items() if request.lora_int_id in ids}

    async def load_adapter(self, name: str, source: str) -> None:
        """Load a LoRA adapter with vLLM's own loader (what `vllm serve`'s /v1/load_lora_adapter does); one at
        a time, and once: a second request for it finds it loaded. A remote `source` (s3://, gs://, ...) is
        copied to a local directory first (fsspec with the scheme's library: s3fs, gcsfs)."""
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        if self._app is None:
            raise ValueError(f"the model {self.model.name!r} is not loaded yet")
        models = self._app.state.openai_serving_models
        if name in models.lora_requests:  # loaded: every request for a runtime adapter asks, no lock needed
            return
        async with self._adapter_lock:
            if name in models.lora_requests:
                return
            path = await asyncio.to_thread(local_copy, source)
            result = await models.load_lora_adapter(LoadLoRAAdapterRequest(lora_name=name, lora_path=path))
        if not isinstance(result, str):  # vLLM's ErrorResponse
            raise ValueError(getattr(getattr(result, "error", None), "message", None) or str(result))

    async def check_health(self) -> None:
        """Raises when the engine core is dead (Ray Serve then replaces the replica)."""
        if self._client is None:
            raise RuntimeError("engine not started")
        await self._client.check_health()

    async def generate(self, route: Route, body: bytes, request_id: str, timeout_s: float | None = None, *,
                       affinity: str | None = None, adapter: str | None = None,
                       adapter_source: str | None = None) -> AsyncIterator[Reply | str | Usage]:
        if self._app is None:
            yield _not_ready(self.model.name)
            return
        if adapter is not None and adapter_source is not None:
            try:
                await self.load_adapter(adapter, adapter_source)
            except ValueError as exc:
                yield _adapter_failed(adapter, str(exc))
                return
        messages: asyncio.Queue = asyncio.Queue()
        disconnected = asyncio.Event()
        scope = _scope(PATHS[route], request_id)
        counts = None if _beam_search(body) else TokenCounts()
        reset = _COUNTS.set(counts)
        try:
            task = asyncio.create_task(self._app(scope, _receiver(body, disconnected), messages.put))
        finally:
            _COUNTS.reset(reset)
        task.add_done_callback(lambda _: messages.put_nowait(_END))
        # the engine ends its own work at the request's deadline: the caller's cancellation may not reach
        # a replica that has not answered anything yet (a non-streamed request)
        expired = asyncio.Event()

        def expire() -> None:
            expired.set()
            disconnected.set()  # vLLM's handlers abort the engine request when the client leaves

        timer = asyncio.get_running_loop().call_later(timeout_s, expire) if timeout_s else None
        try:
            start = await messages.get()
            if expired.is_set():
                yield _timed_out()
                return
            if start is _END:
                task.result()  # re-raises what the app raised
                raise RuntimeError("the vLLM app returned without a response")
            status = start["status"]
            if not _is_event_stream(start.get("headers", [])):
                body = await _read_body(messages)
                yield _timed_out() if expired.is_set() else Reply(status, body)
                return
            yield Reply(status, None)
            async for chunk in _stream_chunks(messages, counts):
                yield chunk
        finally:
            if timer is not None:
                timer.cancel()
            disconnected.set()  # the app sees the client leave and aborts the engine request
            if not task.done():
                # give vLLM's disconnect handling a moment: cancelling its task outright would leave
                # the handler it runs (and so the engine request) going
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                    await asyncio.wait_for(asyncio.shield(task), timeout=2)
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


def _totals_logger(totals: dict[str, int]):
    """A vLLM stat logger that keeps running totals (what `stats()` reports)."""
    from vllm.v1.engine import FinishReason
    from vllm.v1.metrics.loggers import StatLoggerBase

    class Totals(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if iteration_stats is None:
                return
            totals["generation_tokens"] += iteration_stats.num_generation_tokens
            for done in iteration_stats.finished_requests:
                totals["aborted" if done.finish_reason == FinishReason.ABORT else "finished"] += 1

        def log_engine_initialized(self):
            pass

    return Totals


ADAPTER_CACHE = "/tmp/serving-adapters"  # where remote adapters are copied to, one directory per source


def local_copy(source: str) -> str:
    """A local directory holding the adapter at `source`: itself when local (a path or file://), else a copy
    under ADAPTER_CACHE, made once per source."""
    import hashlib

    import fsspec

    fs, path = fsspec.core.url_to_fs(source)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return path
    target = f"{ADAPTER_CACHE}/{hashlib.sha256(source.encode()).hexdigest()[:24]}"
    if not os.path.isdir(target):
        fs.get(path.rstrip("/") + "/", target + ".partial/", recursive=True)
        os.replace(target + ".partial", target)
    return target


def _adapter_failed(name: str, message: str) -> Reply:
    body = {"error": {"message": f"The LoRA adapter {name!r} cannot be loaded: {message}",
                      "type": "BadRequestError", "param": "model", "code": 400}}
    return Reply(400, json.dumps(body).encode())


def _timed_out() -> Reply:
    import json

    error = {"message": "The request timed out.", "type": "timeout_error", "param": None, "code": "timeout"}
    return Reply(504, json.dumps({"error": error}).encode())


def _not_ready(name: str) -> Reply:
    import json

    error = {"message": f"model {name!r} is still loading", "type": "service_unavailable", "param": None, "code": 503}
    return Reply(503, json.dumps({"error": error}).encode())


def _scope(path: str, request_id: str) -> dict[str, Any]:
    return {
        "type": "http",
        # spec 2.3: Starlette's StreamingResponse then watches `receive` for the disconnect
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"x-request-id", request_id.encode())],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
        "state": {},
    }


def _receiver(body: bytes, disconnected: asyncio.Event):
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    return receive


def _is_event_stream(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)


async def _read_body(messages: asyncio.Queue) -> bytes:
    parts = []
    while True:
        message = await messages.get()
        if message is _END:
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(parts)


def _beam_search(body: bytes) -> bool:
    """The request asks for beam search, which vLLM runs as one engine request per beam and step: those are
    not the answer's tokens, so such a stream carries no counts (the gateway meters it from what it shows)."""
    if b"use_beam_search" not in body:  # the common case: one substring search
        return False
    try:
        return json.loads(body).get("use_beam_search") is True
    except (ValueError, AttributeError):
        return False


async def _stream_chunks(messages: asyncio.Queue, counts: TokenCounts | None) -> AsyncIterator[str | Usage]:
    """SSE chunks as the app sends them; chunks already waiting go out together (never on a timer). The
    stream's token counts go along (protocol.Usage): once the prompt's are known, and final before the last
    (none when `counts` is None)."""
    ended = False
    while not ended:
        batch = [await messages.get()]
        while not messages.empty():
            batch.append(messages.get_nowait())
        parts = []
        for message in batch:
            if message is _END or not message.get("more_body", False):
                ended = True
            if message is not _END and message.get("body"):
                parts.append(message["body"])
        due = counts.due(ended) if counts is not None else None
        if due is not None:
            yield due
        if parts:
            yield b"".join(parts).decode()


class TokenCounts:
    """The tokens of one API request's engine requests, counted as vLLM's OpenAI layer counts them for its
    `usage`: a prompt's `prompt_token_ids` (and encoder prompt) once per engine request, each choice's
    generated `token_ids` (added up when outputs are deltas, as in a stream)."""

    __slots__ = ("prompts", "completions", "seen", "reported")

    def __init__(self) -> None:
        self.prompts: dict[str, int] = {}  # engine request id -> prompt tokens
        self.completions: dict[tuple[str, int], int] = {}  # (engine request id, choice index) -> tokens
        self.seen = False  # the engine produced an output
        self.reported = 0  # the prompt tokens last sent

    def usage(self, final: bool) -> Usage:
        return Usage(sum(self.prompts.values()), sum(self.completions.values()), final)

    def due(self, ended: bool) -> Usage | None:
        """The counts to send now: final once the answer ended (if the engine produced anything), else
        when more of the prompt is known than was last sent; None when nothing new."""
        if ended:
            return self.usage(final=True) if self.seen else None
        prompt = sum(self.prompts.values())
        if prompt == self.reported:
            return None
        self.reported = prompt
        return self.usage(final=False)

    def add(self, request_id: str, output: Any, delta: bool) -> None:
        """One RequestOutput of the engine request `request_id`."""
        self.seen = True
        if output.prompt_token_ids is not None:
            encoder = output.encoder_prompt_token_ids
            self.prompts[request_id] = len(output.prompt_token_ids) + (len(encoder) if encoder is not None else 0)
        completions = self.completions
        for choice in output.outputs:
            key = (request_id, choice.index)
            completions[key] = (completions.get(key, 0) if delta else 0) + len(choice.token_ids)


def _counting(generate: Any) -> Any:
    """AsyncLLM.generate, with the outputs of the requests an API request makes counted into its TokenCounts
    (_COUNTS, set while its ASGI task was created; requests made outside one are not counted)."""
    from vllm.sampling_params import RequestOutputKind

    def counted_generate(prompt: Any, sampling_params: Any, request_id: str, *args: Any, **kwargs: Any) -> Any:
        outputs = generate(prompt, sampling_params, request_id, *args, **kwargs)
        counts = _COUNTS.get()
        if counts is None:
            return outputs
        delta = getattr(sampling_params, "output_kind", None) == RequestOutputKind.DELTA
        return _counted(outputs, counts, request_id, delta)

    return counted_generate


async def _counted(outputs: Any, counts: TokenCounts, request_id: str, delta: bool) -> Any:
    try:
        async for output in outputs:
            counts.add(request_id, output, delta)
            yield output
    finally:
        await outputs.aclose()  # the caller left early: AsyncLLM aborts the request, as without us
