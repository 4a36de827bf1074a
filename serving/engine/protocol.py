"""The interface between the gateway and whatever answers for a model.

The gateway imports this module only; it never imports torch or vllm. The real implementation is a
ModelServer (serving.engine.server) holding a vLLM engine, reached through a Ray Serve
DeploymentHandle (serving.engine.remote.RemoteEngine); tests use serving.engine.fake.FakeEngine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Literal, Protocol, runtime_checkable

Route = Literal["chat", "completion", "embedding", "responses", "messages", "count_tokens", "rerank", "score",
                "tokenize", "detokenize"]

# The path of each route in vLLM's own OpenAI application (what `vllm serve` answers), which every engine
# replica runs in-process; the gateway answers the same paths.
PATHS: dict[Route, str] = {
    "chat": "/v1/chat/completions",
    "completion": "/v1/completions",
    "embedding": "/v1/embeddings",
    "responses": "/v1/responses",
    "messages": "/v1/messages",
    "count_tokens": "/v1/messages/count_tokens",
    "rerank": "/v1/rerank",
    "score": "/v1/score",
    "tokenize": "/tokenize",
    "detokenize": "/detokenize",
}

# The model kinds (ModelConfig.kind) each route serves; another kind gets 400 `wrong_route`. rerank and
# score run on pooling models (embedding models compare by cosine similarity, cross-encoders score pairs);
# every model has a tokenizer.
ROUTE_KINDS: dict[Route, frozenset[str]] = {
    **{route: frozenset({"generate"}) for route in ("chat", "completion", "responses", "messages", "count_tokens")},
    **{route: frozenset({"embed"}) for route in ("embedding", "rerank", "score")},
    **{route: frozenset({"generate", "embed"}) for route in ("tokenize", "detokenize")},
}


@dataclass(frozen=True, slots=True)
class Reply:
    """The first item of every engine answer.

    status: the HTTP status the gateway should send.
    body:   the complete JSON body (bytes) for a non-streamed answer or an error; None when an SSE
            stream follows in the next items.
    """

    status: int
    body: bytes | None = None

    @property
    def streaming(self) -> bool:
        return self.body is None


@dataclass(frozen=True, slots=True)
class Usage:
    """The token counts of a streamed answer so far, as the engine counts them for its own usage (vLLM's:
    the prompt's tokens, encoder prompt included, of every prompt; every choice's generated tokens). An
    item of the stream, never shown to the client: the gateway meters the stream with it, so the engine
    need not put usage into every chunk for a stream cut short.

    final: the answer is complete and these are its counts (sent before the stream's last chunk);
           otherwise counts so far (sent as soon as the prompt's tokens are known).
    """

    prompt_tokens: int
    completion_tokens: int
    final: bool = False

    def as_openai(self) -> dict[str, int]:
        """OpenAI's `usage` object of these counts."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class EngineOverloaded(Exception):
    """The model's request queue is full: the caller answers 503 with Retry-After at once."""


class EngineUnavailable(Exception):
    """The model has no ready replica (loading, or replaced after a crash)."""


@runtime_checkable
class Engine(Protocol):
    """One served model (and its LoRA adapters).

    Yield convention of `generate`: the first item is a `Reply`. If `Reply.body` is set, that is
    the whole answer and nothing follows. If it is None, the items that follow are `str`s, each holding
    one or more complete SSE events (`data: <json>\\n\\n`), the last one ending with
    `data: [DONE]\\n\\n`; an error after the first event arrives in-band as `data: {"error": ...}`.
    Among them, a stream may carry `Usage` items (its token counts, for the gateway): one once the
    prompt's tokens are known, and a final one before the last chunk. An engine that sends none is
    metered from what the stream shows.
    Items are produced as soon as the engine has them: nothing waits on a timer. Closing the
    iterator early (client gone, timeout) aborts the engine request.
    """

    def generate(self, route: Route, body: bytes, request_id: str, timeout_s: float | None = None, *,
                 affinity: str | None = None, adapter: str | None = None,
                 adapter_source: str | None = None) -> AsyncIterator[Reply | str | Usage]:
        """`timeout_s`: the request's remaining time; the engine ends its own work then. `affinity`: the
        routing key of the request's prompt (serving.gateway.affinity), `adapter`: the LoRA adapter it
        asks for; an engine of several replicas routes on them (serving.engine.routing), one replica
        ignores them. `adapter_source`: where the weights of an adapter loaded at runtime are; an engine
        that does not hold it yet loads it first (`load_adapter`)."""
        ...

    async def load_adapter(self, name: str, source: str) -> None:
        """Load the LoRA adapter `name` from `source` (a local directory, or an fsspec URL such as
        s3://bucket/path) so requests for `name` use it. Raises ValueError with the reason it cannot."""
        ...

    async def ready(self) -> bool:
        """True once the model is loaded and can take requests."""
        ...
