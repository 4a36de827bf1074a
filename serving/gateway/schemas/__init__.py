"""Request fields of the routes the gateway passes to an engine.

- requests.json: vLLM's request schemas (generated from vLLM's request models by serving.engine.openapi).
- reference_fields.json: the top-level fields each route's own API reference accepts: OpenAI's for chat
  completions, completions, embeddings and Responses, Anthropic's for Messages and count_tokens,
  generated from the official `openai` and `anthropic` SDKs' request TypedDicts (each SDK is generated
  from its API's reference). The gateway imports neither SDK (test dependencies only); a unit test
  (tests/unit/test_field_faults.py) checks the file equals the installed SDKs' fields. Regenerate with

      python -c "from serving.gateway.schemas import write_reference_fields; write_reference_fields()"

A request may carry any field of either set (accepted_fields). Fields only the reference knows
(reference_only_fields) are taken out before the body goes to vLLM (drop_reference_only): vLLM would
ignore them with a warning; each has a decision in REFERENCE_ONLY (why it is ignored) or UNSUPPORTED (why
ignoring it would change the answer behind the client's back, so it is refused), and the docs list them.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

REFERENCE_FIELDS = "reference_fields.json"
# The SDK's request TypedDicts per route: (module, classes). The streaming and non-streaming variants
# differ only in `stream`'s type; both are listed so that a field of either is included.
_SDK_PARAMS = {
    "chat": ("openai.types.chat.completion_create_params",
             ("CompletionCreateParamsNonStreaming", "CompletionCreateParamsStreaming")),
    "completion": ("openai.types.completion_create_params",
                   ("CompletionCreateParamsNonStreaming", "CompletionCreateParamsStreaming")),
    "embedding": ("openai.types.embedding_create_params", ("EmbeddingCreateParams",)),
    "responses": ("openai.types.responses.response_create_params",
                  ("ResponseCreateParamsNonStreaming", "ResponseCreateParamsStreaming")),
    "messages": ("anthropic.types.message_create_params",
                 ("MessageCreateParamsNonStreaming", "MessageCreateParamsStreaming")),
    "count_tokens": ("anthropic.types.message_count_tokens_params", ("MessageCountTokensParams",)),
}

# Why each field OpenAI accepts but vLLM does not know is ignored (taken out of the request) rather than
# honoured. A field that appears in reference_fields.json without an entry here fails a unit test, so a new
# SDK field gets a decision before it ships.
REFERENCE_ONLY: dict[str, str] = {
    # chat completions
    "audio": "audio output is not generated (vLLM answers text); the answer is text only",
    "function_call": "deprecated by OpenAI in favour of `tool_choice`, which vLLM honours",
    "functions": "deprecated by OpenAI in favour of `tools`, which vLLM honours",
    "metadata": "tags for OpenAI's stored completions; nothing is stored",
    "modalities": "only text output exists; the answer is text only",
    "moderation": "OpenAI's own moderation; no moderation is applied",
    "prediction": "Predicted Outputs only make OpenAI faster; the answer is the same without",
    "prompt_cache_key": "vLLM's prefix cache needs no key (and is isolated per API key, cache.prefix_salt)",
    "prompt_cache_options": "vLLM's prefix cache is automatic",
    "prompt_cache_retention": "vLLM's prefix cache keeps blocks as long as memory allows",
    "safety_identifier": "an end-user id for OpenAI's abuse monitoring",
    "service_tier": "one tier only; the answer has no `service_tier`",
    "store": "nothing is stored for OpenAI's distillation/evals",
    "verbosity": "a control of OpenAI's GPT-5 models; vLLM's models have none",
    "web_search_options": "no web search tool",
    # completions
    "best_of": "removed from vLLM's V1 engine; the `n` choices are returned, none is discarded",
    # Responses (OpenAI)
    "access_programs": "OpenAI account programs; there are none here",
    "background_options": "options of background mode, which is refused (`background`)",
    "context_management": "OpenAI's server-side compaction of long conversations; the whole history is sent",
    "image": "options of OpenAI's image generation tool; there is none",
    "stream_options": "on Responses only `include_obfuscation`, padding against side channels of OpenAI's",
    # Messages (Anthropic)
    "cache_control": "Anthropic's prompt-caching hint; vLLM's prefix cache is automatic",
    "diagnostics": "Anthropic's request diagnostics",
    "inference_geo": "where Anthropic runs the request; here the model's replicas run it",
    "speed": "Anthropic's speed tier; one tier only",
    "user_profile_id": "an Anthropic account field",
    "workspace_id": "an Anthropic account field",
}

# Fields the reference accepts that cannot be ignored without changing the answer behind the client's
# back: refused with 400 `unsupported_parameter`, naming the field.
UNSUPPORTED: dict[str, str] = {
    "conversation": "OpenAI's Conversations API is not served: chain turns with `previous_response_id`",
    "container": "Anthropic's code-execution containers are not served",
}


@lru_cache(maxsize=1)
def load() -> dict[str, Any]:
    return json.loads(files(__name__).joinpath("requests.json").read_text())


@lru_cache(maxsize=1)
def _reference() -> dict[str, Any]:
    return json.loads(files(__name__).joinpath(REFERENCE_FIELDS).read_text())


@lru_cache(maxsize=16)
def known_fields(route: str) -> frozenset[str]:
    """Top-level fields vLLM knows for a route (for an embedding, any of its request shapes)."""
    data = load()
    schema = data["routes"][route]
    variants = schema.get("anyOf") or schema.get("oneOf") or [schema]
    names: set[str] = set()
    for variant in variants:
        if "$ref" in variant:
            variant = data["components"][variant["$ref"].rsplit("/", 1)[1]]
        names.update(variant.get("properties", {}))
    return frozenset(names)


@lru_cache(maxsize=16)
def reference_fields(route: str) -> frozenset[str]:
    """Top-level fields OpenAI's API accepts for a route (reference_fields.json); empty for a route OpenAI
    does not have (vLLM's tokenize, rerank, ...)."""
    return frozenset(_reference()["routes"].get(route, ()))


@lru_cache(maxsize=16)
def accepted_fields(route: str) -> frozenset[str]:
    """Top-level fields a request may carry: vLLM's and OpenAI's. Anything else is a client's mistake
    (`temprature`), refused with 400 `unknown_parameter` when gateway.reject_unknown_fields is on."""
    return known_fields(route) | reference_fields(route)


@lru_cache(maxsize=16)
def reference_only_fields(route: str) -> frozenset[str]:
    """Fields a route's reference accepts and vLLM does not know: accepted, then dropped (REFERENCE_ONLY);
    UNSUPPORTED ones are refused before."""
    return reference_fields(route) - known_fields(route) - set(UNSUPPORTED)


@lru_cache(maxsize=16)
def unsupported_fields(route: str) -> frozenset[str]:
    """Fields a route's reference accepts, vLLM does not know, and this server refuses (UNSUPPORTED)."""
    return (reference_fields(route) - known_fields(route)) & frozenset(UNSUPPORTED)


def unsupported_field(route: str, payload: dict[str, Any]) -> str | None:
    """The first field of `payload` (sorted) the route's reference accepts but this server refuses
    (UNSUPPORTED), else None."""
    found = sorted(unsupported_fields(route) & payload.keys())
    return found[0] if found else None


def drop_reference_only(route: str, payload: dict[str, Any]) -> list[str]:
    """Takes the fields only OpenAI knows (reference_only_fields) out of `payload`, in place, before it is
    sent to vLLM (and before the response cache's key: they do not change the answer); returns their
    names, sorted."""
    dropped = sorted(reference_only_fields(route) & payload.keys())
    for field in dropped:
        del payload[field]
    return dropped


def sdk_reference_fields() -> dict[str, list[str]]:
    """Route -> sorted top-level fields of the installed SDKs' request TypedDicts (their required and
    optional keys). Imports `openai` and `anthropic`: for the generator and the test, never at serving time."""
    import importlib

    routes: dict[str, list[str]] = {}
    for route, (module, classes) in _SDK_PARAMS.items():
        params = importlib.import_module(module)
        names: set[str] = set()
        for name in classes:
            typed = getattr(params, name)
            names |= set(typed.__required_keys__) | set(typed.__optional_keys__)
        routes[route] = sorted(names)
    return routes


def write_reference_fields() -> Path:
    """Writes reference_fields.json from the installed SDK (sdk_reference_fields); returns its path."""
    import anthropic
    import openai

    path = Path(__file__).with_name(REFERENCE_FIELDS)
    data = {"source": f"openai {openai.__version__}, anthropic {anthropic.__version__} (request TypedDicts)",
            "routes": sdk_reference_fields()}
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path
