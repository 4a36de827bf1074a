"""How the gateway treats each POST route it passes to an engine: one table, read by the common path
(serving.gateway.routes), the limits (serving.gateway.limits) and the OpenAPI document.

Dialects: the wire format of a route's answers and errors.
- "openai": chat and completions SSE (`data: {...}` chunks, `data: [DONE]`), `usage` with prompt_tokens
  and completion_tokens; errors {"error": {"message", "type", "param", "code"}}.
- "responses": OpenAI's Responses API: named SSE events (`event: response.output_text.delta`), usage
  with input_tokens and output_tokens in the final `response.completed`; errors in the OpenAI envelope,
  in a stream an `error` event.
- "anthropic": Anthropic's Messages API: named events (message_start ... message_stop), usage with
  input_tokens and output_tokens; errors {"type": "error", "error": {"type", "message"}}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from serving.engine.protocol import PATHS, Route

Dialect = Literal["openai", "responses", "anthropic"]


@dataclass(frozen=True)
class RouteSpec:
    """route: the engine route; path: the HTTP path (vLLM's); dialect: see above.
    token_fields: request fields that bound the output tokens (the key's max_tokens cap applies to
    them; empty: the route generates nothing); default_tokens: vLLM's default for them when absent
    (None: the rest of the context); choices: `n` gives several choices; cacheable: answers may come
    from the response cache; billed: the answer's usage is charged to the key."""

    route: Route
    dialect: Dialect = "openai"
    token_fields: tuple[str, ...] = ()
    default_tokens: int | None = None
    choices: bool = False
    cacheable: bool = False
    billed: bool = True
    summary: str = ""

    @property
    def path(self) -> str:
        return PATHS[self.route]

    @property
    def generates(self) -> bool:
        return bool(self.token_fields)

    def usage(self, answer: dict[str, Any]) -> dict[str, int] | None:
        """An answer's usage as {prompt_tokens, completion_tokens, total_tokens} (what limits and the
        usage records count), None when it has none or the route is not billed."""
        if not self.billed:
            return None
        usage = answer.get("response", answer).get("usage") if self.dialect == "responses" else answer.get("usage")
        return normalized_usage(usage)


def normalized_usage(usage: Any) -> dict[str, int] | None:
    """OpenAI's usage (prompt_tokens/completion_tokens) from any dialect's (input_tokens/output_tokens)."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens")) or 0
    completion = usage.get("completion_tokens", usage.get("output_tokens")) or 0
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


SPECS: dict[Route, RouteSpec] = {spec.route: spec for spec in (
    RouteSpec("chat", token_fields=("max_tokens", "max_completion_tokens"), choices=True, cacheable=True,
              summary="Chat completions (OpenAI)."),
    RouteSpec("completion", token_fields=("max_tokens",), default_tokens=16, choices=True, cacheable=True,
              summary="Text completions (OpenAI)."),
    RouteSpec("embedding", cacheable=True, summary="Embeddings (OpenAI)."),
    RouteSpec("responses", dialect="responses", token_fields=("max_output_tokens",),
              summary="Responses (OpenAI): stored responses and previous_response_id work across replicas."),
    RouteSpec("messages", dialect="anthropic", token_fields=("max_tokens",), summary="Messages (Anthropic)."),
    RouteSpec("count_tokens", dialect="anthropic", billed=False, summary="Count a Messages request's tokens."),
    RouteSpec("rerank", summary="Rerank documents by relevance to a query (vLLM's rerank API)."),
    RouteSpec("score", summary="Similarity scores of text pairs (vLLM's score API)."),
    RouteSpec("tokenize", billed=False, summary="Tokenize a prompt or chat messages (vLLM's API)."),
    RouteSpec("detokenize", billed=False, summary="Token ids back to text (vLLM's API)."),
)}
