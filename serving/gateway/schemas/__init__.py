"""Request schemas of the OpenAI routes, generated from vLLM's request models (serving.engine.openapi)."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib.resources import files
from typing import Any


@lru_cache(maxsize=1)
def load() -> dict[str, Any]:
    return json.loads(files(__name__).joinpath("requests.json").read_text())


@lru_cache(maxsize=8)
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
