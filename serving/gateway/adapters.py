"""LoRA adapters loaded at runtime: vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter for the whole
platform, for admin keys only (open with auth off).

`POST /v1/load_lora_adapter` {"lora_name", "lora_path", "model"}: vLLM's field names, plus `model`, the base
model (it must take runtime adapters: `runtime_adapters` or `lora_adapters` in its configuration). One
replica of the base model loads it at once (so a bad path is refused here, with vLLM's reason); then it is
recorded in the store's adapter registry (Redis; in-process locally), where every gateway replica finds it
within ADAPTERS_TTL_S (2 s) and lists it in /v1/models. Other replicas, and those that start later, load it
on their first request for it (bounded by the engine's max_loras on the device and max_cpu_loras in
memory, least recently used first); no engine restarts and no other model is touched.
`POST /v1/unload_lora_adapter` {"lora_name"}: removed from the registry; every gateway answers 404 for the
name within 2 s. Both answer vLLM's plain-text "Success: ..." on 200 and OpenAI's error envelope otherwise.

`lora_path`: a directory the model replicas can read (a local path or a PVC mounted on them), or an fsspec
URL (s3://bucket/path with s3fs in the image, gs:// with gcsfs), copied to the replica once.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from serving.config import NAME_PATTERN
from serving.engine.protocol import EngineUnavailable
from serving.gateway.auth import Principal
from serving.gateway.errors import APIError
from serving.gateway.routes import parse_object, read_body
from serving.gateway.services import ADAPTERS, PLATFORM, Caller, Services, Svc
from serving.gateway.store import StoreUnavailable

router = APIRouter(tags=["adapters"])


def _admin(principal: Principal) -> None:
    if not principal.admin:
        raise APIError(403, "Loading and unloading LoRA adapters needs an admin key "
                            "(serving keys create NAME --admin).", code="permission_denied")


def _string(payload: dict[str, Any], field: str) -> str:
    value = payload.get(field)
    if not isinstance(value, str) or not value:
        raise APIError(400, f"`{field}` is required (a string).", param=field)
    return value


async def _payload(request: Request, svc: Services) -> dict[str, Any]:
    return parse_object(await read_body(request, svc.config.gateway.max_body_bytes, svc.config.gateway.body_timeout_s))


def _unavailable() -> APIError:
    return APIError(503, "The adapter registry cannot be read or changed right now; retry shortly.",
                    code="store_unavailable", headers={"retry-after": "1"})


@router.post("/v1/load_lora_adapter", summary="Load a LoRA adapter at runtime (admin keys).",
             response_class=PlainTextResponse)
async def load_lora_adapter(request: Request, principal: Caller, svc: Svc) -> PlainTextResponse:
    _admin(principal)
    payload = await _payload(request, svc)
    name, path, base = _string(payload, "lora_name"), _string(payload, "lora_path"), _string(payload, "model")
    if not re.match(NAME_PATTERN, name):
        raise APIError(400, f"`lora_name` must match {NAME_PATTERN}.", param="lora_name")
    model = svc.config.model(base)
    if model is None or model.name != base:
        raise APIError(404, f"The model `{base}` does not exist (give the base model's name).", param="model",
                       code="model_not_found")
    if not (model.runtime_adapters or model.lora_adapters):
        raise APIError(400, f"The model `{base}` does not take LoRA adapters (set runtime_adapters: true on it).",
                       param="model", code="adapters_not_enabled")
    await svc.registry.refresh(svc.store)
    if svc.config.model(name) is not None or name in svc.registry.runtime:
        raise APIError(400, f"The model name `{name}` is taken: unload it first, or pick another.", param="lora_name",
                       code="name_taken")
    try:
        await svc.registry.engines[base].load_adapter(name, path)
    except ValueError as exc:
        raise APIError(400, f"The LoRA adapter `{name}` cannot be loaded from {path}: {exc}", param="lora_path",
                       code="adapter_not_loadable") from None
    except EngineUnavailable:
        raise APIError(503, f"The model `{base}` has no ready replica to load the adapter on; retry shortly.",
                       code="model_not_ready", headers={"retry-after": "5"}) from None
    record = {"name": name, "model": base, "path": path, "created_at": time.time()}
    try:
        await svc.store.call("record_put", ADAPTERS, PLATFORM, name, json.dumps(record).encode(), 0)
        await svc.store.call("index_add", ADAPTERS, name, record["created_at"])
    except StoreUnavailable:
        raise _unavailable() from None
    await svc.registry.refresh(svc.store)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter", summary="Unload a LoRA adapter loaded at runtime (admin keys).",
             response_class=PlainTextResponse)
async def unload_lora_adapter(request: Request, principal: Caller, svc: Svc) -> PlainTextResponse:
    _admin(principal)
    name = _string(await _payload(request, svc), "lora_name")
    if svc.config.model(name) is not None:
        raise APIError(400, f"`{name}` is in the configuration, not loaded at runtime: remove it there.",
                       param="lora_name", code="configured_adapter")
    try:
        removed = await svc.store.call("record_delete", ADAPTERS, PLATFORM, name)
        await svc.store.call("index_remove", ADAPTERS, name)
    except StoreUnavailable:
        raise _unavailable() from None
    if not removed:
        raise APIError(404, f"The LoRA adapter `{name}` is not loaded.", param="lora_name", code="not_found")
    await svc.registry.refresh(svc.store)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
