"""Request schemas of the OpenAI routes, taken from vLLM's own request models.

The gateway imports no vllm, so the schemas are generated here once and shipped as JSON in
serving/gateway/schemas/ (a test checks they match the installed vLLM):

    python -m serving.engine.openapi
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

OUT = Path(__file__).resolve().parents[1] / "gateway" / "schemas" / "requests.json"


def _rewrite_refs(node: Any) -> Any:
    """pydantic writes `#/$defs/X`; inside an OpenAPI document that has to be `#/components/schemas/X`."""
    if isinstance(node, dict):
        return {k: (v.replace("#/$defs/", "#/components/schemas/") if k == "$ref" and isinstance(v, str)
                    else _rewrite_refs(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite_refs(v) for v in node]
    return node


def generate() -> dict[str, Any]:
    from pydantic import TypeAdapter
    from vllm.entrypoints.anthropic.protocol import AnthropicCountTokensRequest, AnthropicMessagesRequest
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest
    from vllm.entrypoints.pooling.scoring.protocol import RerankRequest, ScoreRequest
    from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, TokenizeRequest

    components: dict[str, Any] = {}
    routes: dict[str, Any] = {}
    models: dict[str, Any] = {
        "chat": ChatCompletionRequest, "completion": CompletionRequest, "embedding": EmbeddingRequest,
        "responses": ResponsesRequest, "messages": AnthropicMessagesRequest,
        "count_tokens": AnthropicCountTokensRequest, "rerank": RerankRequest, "score": ScoreRequest,
        "tokenize": TokenizeRequest, "detokenize": DetokenizeRequest,
    }
    # one generation for all routes: names of shared types (pydantic disambiguates those that differ, e.g.
    # two FunctionDefinition) then mean one schema across every route
    mode: Literal["validation"] = "validation"
    adapters = [(route, mode, TypeAdapter(model)) for route, model in models.items()]
    schemas, definitions = TypeAdapter.json_schemas(adapters)
    for (route, _), schema in schemas.items():
        routes[route] = _rewrite_refs(schema)
    components.update(definitions.get("$defs", {}))
    return {"routes": routes, "components": _rewrite_refs(components)}


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(generate(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
