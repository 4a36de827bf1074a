"""The Batch API (OpenAI's /v1/batches): a JSONL file of requests run on the same model deployments as
interactive traffic, below it (serving.gateway.batch_runner runs them).

A batch belongs to the API key that created it; another key gets 404. Its record lives in the store
without expiry: {"batch": <OpenAI's Batch object>, "owner": <key subject>, "input_path": <the input
file's bytes>, "parts": [<checkpoints: {"out", "err": part files, "lines": [[first, last], ...] input
line indexes done, "completed", "failed", "usage"}>]}. Only the gateway replica holding the batch's
lease writes it after creation (writes fenced by the lease, serving.gateway.store); cancelling sets a
flag record of its own, which the runner reads.

Input file (OpenAI's format, one request per line): {"custom_id": <string, unique>, "method": "POST",
"url": <the batch's endpoint>, "body": <the request>}. A file that is not that (a line not JSON, no
custom_id, a duplicate custom_id, a body not an object, more than batches.max_lines lines) fails the
batch at creation with `errors` naming the lines. A line with another method or url, an unknown model,
or a body the route refuses goes to the error file with the status the interactive route gives; the
other lines still run.

Output lines (both files): {"id": "batch_req_...", "custom_id", "response": {"status_code",
"request_id", "body"}, "error": null}; lines never run (batch cancelled or expired) have "response":
null and "error": {"code": "batch_cancelled"|"batch_expired", "message"}. Lines come in the order they
finished, not input order (as OpenAI's): match them by custom_id.

Routes (https://platform.openai.com/docs/api-reference/batch): POST /v1/batches, GET /v1/batches
(`limit` 1..100, `after`), GET /v1/batches/{id}, POST /v1/batches/{id}/cancel.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from serving.engine.protocol import PATHS, Route
from serving.gateway.errors import APIError
from serving.gateway.files import PURPOSES, after_cursor, load_record, new_id, not_found, store_unavailable
from serving.gateway.routes import parse_object, read_body
from serving.gateway.services import Caller, Services, Svc
from serving.gateway.store import StoreUnavailable

KIND = "batches"  # the store's record kind
CANCEL = "batch-cancel"  # a batch's cancel flag (its own record, so the API never writes the runner's record)
ACTIVE = "batches-active"  # index of batches to run: "<owner>/<batch id>", by creation time
ALL = "batches"  # index of every batch ("<owner>/<batch id>"), for operators (`serving batches list`)
ENDPOINTS: dict[str, Route] = {PATHS[r]: r for r in ("chat", "completion", "embedding", "responses")}
COMPLETION_WINDOW_S = {"24h": 86400}
TERMINAL = ("completed", "failed", "expired", "cancelled")
MAX_ERRORS = 100  # validation errors listed in a failed batch's `errors`
METADATA_LIMITS = (16, 64, 512)  # pairs, key characters, value characters (OpenAI's)


@dataclass(frozen=True)
class Line:
    """One request of an input file: `index` its 0-based line (blank lines skipped, still counted)."""

    index: int
    custom_id: str
    method: Any
    url: Any
    body: dict[str, Any]


def parse_input(data: bytes, max_lines: int) -> tuple[list[Line], list[dict[str, Any]]]:
    """The requests of an input file, and OpenAI's validation errors ({"code", "message", "param", "line"
    (1-based)}; at most MAX_ERRORS) that fail the whole batch."""
    lines: list[Line] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()

    def error(code: str, message: str, number: int, param: str | None = None) -> None:
        if len(errors) < MAX_ERRORS:
            errors.append({"code": code, "message": message, "param": param, "line": number})

    for index, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n")):  # a UTF-8 BOM is no JSON
        if not raw.strip():
            continue
        if len(errors) >= MAX_ERRORS or len(lines) > max_lines:
            break  # the batch fails either way: the rest of the file is not read
        try:
            item = parse_object(raw)
        except APIError as exc:
            error("invalid_json_line", f"Line {index + 1} is not a JSON object: {exc.message}", index + 1)
            continue
        custom_id, body = item.get("custom_id"), item.get("body")
        if not isinstance(custom_id, str) or not custom_id:
            error("missing_required_parameter", "Each line needs a `custom_id` (a string).", index + 1, "custom_id")
        elif custom_id in seen:
            error("duplicate_custom_id", f"The custom_id {custom_id!r} is on more than one line.", index + 1,
                  "custom_id")
        elif not isinstance(body, dict):
            error("missing_required_parameter", "Each line needs a `body` (a JSON object).", index + 1, "body")
        else:
            seen.add(custom_id)
            lines.append(Line(index, custom_id, item.get("method"), item.get("url"), body))
    if not lines and not errors:
        error("empty_file", "The input file has no requests.", 1)
    if len(lines) > max_lines:
        error("too_many_requests", f"The input file has more than {max_lines} requests, the most a batch takes.",
              max_lines + 1)
    return lines, errors


def line_error(line: Line, endpoint: str) -> tuple[int, str, str | None, str] | None:
    """What the interactive route would answer for a line's method and url, before its body is looked at:
    (status, message, param, code), None when they are right."""
    if line.url != endpoint:
        if line.url in PATHS.values():
            return 400, f"The url {line.url!r} is not this batch's endpoint {endpoint}.", "url", "invalid_url"
        return 404, f"Invalid URL (POST {line.url}): not an endpoint of this server.", "url", "unknown_url"
    if line.method != "POST":
        return 405, f"Method {line.method!r} is not allowed for {endpoint}: use POST.", "method", "method_not_allowed"
    return None


def batch_object(batch_id: str, *, endpoint: str, input_file_id: str, window: str, created_at: int,
                 metadata: dict[str, str] | None, total: int) -> dict[str, Any]:
    """OpenAI's Batch object at creation."""
    return {"id": batch_id, "object": "batch", "endpoint": endpoint, "errors": None, "input_file_id": input_file_id,
            "completion_window": window, "status": "validating", "output_file_id": None, "error_file_id": None,
            "created_at": created_at, "in_progress_at": None, "expires_at": created_at + COMPLETION_WINDOW_S[window],
            "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None,
            "cancelled_at": None, "request_counts": {"total": total, "completed": 0, "failed": 0},
            "metadata": metadata, "model": None, "usage": None}


def usage_object(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    """OpenAI's BatchUsage."""
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def view(record: dict[str, Any], cancelled_at: int | None) -> dict[str, Any]:
    """The Batch object a client sees: `cancelling` once a cancel was asked and the runner has not ended it."""
    batch = dict(record["batch"])
    if cancelled_at is not None and batch["status"] not in TERMINAL:
        batch["status"], batch["cancelling_at"] = "cancelling", cancelled_at
    return batch


async def load(svc: Services, owner: str, batch_id: str) -> tuple[dict[str, Any] | None, int | None]:
    """A batch's record and the time its cancel was asked (None: not asked). Raises StoreUnavailable."""
    record, flag = await svc.store.call("record_get", KIND, owner, [batch_id]), \
        await svc.store.call("record_get", CANCEL, owner, [batch_id])
    return (json.loads(record[0]) if record[0] else None), (int(flag[0]) if flag[0] else None)


router = APIRouter(prefix="/v1/batches", tags=["batches"])


def _metadata(value: Any) -> dict[str, str] | None:
    pairs, key_chars, value_chars = METADATA_LIMITS
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > pairs or not all(
            isinstance(k, str) and len(k) <= key_chars and isinstance(v, str) and len(v) <= value_chars
            for k, v in value.items()):
        raise APIError(400, f"`metadata` must be an object of at most {pairs} string pairs (keys up to {key_chars} "
                            f"characters, values up to {value_chars}).", param="metadata")
    return value


def _create_params(payload: dict[str, Any]) -> tuple[str, str, str, dict[str, str] | None]:
    known = {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
    unknown = sorted(set(payload) - known)
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
                       code="unknown_parameter")
    file_id, endpoint, window = payload.get("input_file_id"), payload.get("endpoint"), payload.get("completion_window")
    if not isinstance(file_id, str) or not file_id:
        raise APIError(400, "`input_file_id` is required (the id of an uploaded file).", param="input_file_id")
    if not isinstance(endpoint, str) or endpoint not in ENDPOINTS:
        raise APIError(400, f"`endpoint` must be one of {', '.join(ENDPOINTS)}.", param="endpoint",
                       code="invalid_value")
    if not isinstance(window, str) or window not in COMPLETION_WINDOW_S:
        raise APIError(400, "`completion_window` must be 24h.", param="completion_window", code="invalid_value")
    if payload.get("output_expires_after") is not None:
        _output_expiry(payload["output_expires_after"])
    return file_id, endpoint, window, _metadata(payload.get("metadata"))


def _output_expiry(value: Any) -> int:
    if not isinstance(value, dict) or set(value) != {"anchor", "seconds"} or value.get("anchor") != "created_at" \
            or not isinstance(value.get("seconds"), int) \
            or isinstance(value.get("seconds"), bool) or not 3600 <= value["seconds"] <= 30 * 86400:
        raise APIError(400, "`output_expires_after` must be {\"anchor\": \"created_at\", \"seconds\": 3600..2592000}.",
                       param="output_expires_after")
    return int(value["seconds"])


@router.post("", summary="Create a batch from an uploaded JSONL file of requests.")
async def create_batch(request: Request, principal: Caller, svc: Svc) -> dict[str, Any]:
    payload = parse_object(await read_body(request, svc.config.gateway.max_body_bytes,
                                           svc.config.gateway.body_timeout_s))
    file_id, endpoint, window, metadata = _create_params(payload)
    owner = principal.subject
    try:
        file = await load_record(svc, owner, file_id)
    except StoreUnavailable:
        raise store_unavailable() from None
    if file is None:
        raise not_found(file_id)
    if file["file"]["purpose"] not in PURPOSES:
        raise APIError(400, f"File {file_id} has purpose {file['file']['purpose']!r}, not batch.",
                       param="input_file_id", code="invalid_file")
    owner_active = [m for m in await _active(svc) if m.startswith(f"{owner}/")]
    if len(owner_active) >= svc.config.batches.max_active_per_key:
        raise APIError(429, f"This API key has {len(owner_active)} batches not finished, the most it may have; "
                            "create more when one has ended.", code="batch_limit_exceeded",
                       headers={"retry-after": "60"})
    batch_id = new_id("batch_")
    input_path = svc.files.path("batches", batch_id, "input.jsonl")
    try:
        data = await svc.files.get(file["path"])
        # parsed in a worker thread: a big file must not stop the gateway's event loop
        lines, errors = await asyncio.to_thread(parse_input, data, svc.config.batches.max_lines)
        if not errors:  # the batch's own copy: deleting or expiring the uploaded file cannot take it away
            await svc.files.put(input_path, data)
    except FileNotFoundError:
        raise not_found(file_id) from None
    created_at = int(time.time())
    batch = batch_object(batch_id, endpoint=endpoint, input_file_id=file_id, window=window, created_at=created_at,
                         metadata=metadata, total=0 if errors else len(lines))
    models = {str(line.body.get("model")) for line in lines[:1000]}
    batch["model"] = models.pop() if len(models) == 1 and isinstance(lines[0].body.get("model"), str) else None
    if errors:  # OpenAI's validation failure: the batch exists, failed, with the lines that made it fail
        batch.update(status="failed", failed_at=created_at, errors={"object": "list", "data": errors})
    record = {"batch": batch, "owner": owner, "input_path": input_path, "parts": [],
              "output_expires_s": _output_expiry(payload["output_expires_after"])
              if payload.get("output_expires_after") is not None else svc.config.files.ttl_s}
    member = f"{owner}/{batch_id}"
    try:
        await svc.store.call("record_put", KIND, owner, batch_id, json.dumps(record).encode(), 0)
        await svc.store.call("index_add", f"{KIND}:{owner}", batch_id, 0.0)  # listed by id: by creation time
        await svc.store.call("index_add", ALL, member, float(created_at))
        if not errors:
            await svc.store.call("index_add", ACTIVE, member, time.time())
    except StoreUnavailable:
        raise store_unavailable() from None
    if not errors:
        svc.batches.wake()
    return batch


async def _get(svc: Services, owner: str, batch_id: str) -> tuple[dict[str, Any], int | None]:
    try:
        record, cancelled_at = await load(svc, owner, batch_id)
    except StoreUnavailable:
        raise store_unavailable() from None
    if record is None:
        raise APIError(404, f"No batch found with id '{batch_id}'.", param="batch_id", code="not_found")
    return record, cancelled_at


async def _active(svc: Services) -> list[str]:
    try:
        return await svc.store.call("index_range", ACTIVE)
    except StoreUnavailable:
        raise store_unavailable() from None


@router.get("/{batch_id}", summary="A batch (of this API key).")
async def retrieve_batch(batch_id: str, principal: Caller, svc: Svc) -> dict[str, Any]:
    return view(*await _get(svc, principal.subject, batch_id))


@router.post("/{batch_id}/cancel", summary="Cancel a batch: lines not finished stop within seconds.")
async def cancel_batch(batch_id: str, principal: Caller, svc: Svc) -> dict[str, Any]:
    record, cancelled_at = await _get(svc, principal.subject, batch_id)
    status = record["batch"]["status"]
    if status in TERMINAL:
        raise APIError(409, f"Cannot cancel a batch with status {status}.", param="batch_id",
                       code="batch_not_cancellable")
    if cancelled_at is None:
        cancelled_at = int(time.time())
        try:
            await svc.store.call("record_put", CANCEL, principal.subject, batch_id, str(cancelled_at).encode(), 0)
        except StoreUnavailable:
            raise store_unavailable() from None
        svc.batches.wake()
    return view(record, cancelled_at)


@router.get("", summary="The batches of this API key, newest first.")
async def list_batches(principal: Caller, svc: Svc, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                       after: str | None = None) -> dict[str, Any]:
    """OpenAI's list object (`data`, `first_id`, `last_id`, `has_more`); `after`: a batch id to page from."""
    owner = principal.subject
    try:
        ids = after_cursor(sorted(await svc.store.call("index_range", f"{KIND}:{owner}"), reverse=True), after, True)
        page_ids = ids[:limit]
        records = await svc.store.call("record_get", KIND, owner, page_ids)
        flags = await svc.store.call("record_get", CANCEL, owner, page_ids)
    except StoreUnavailable:
        raise store_unavailable() from None
    page = [view(json.loads(r), int(f) if f else None) for r, f in zip(records, flags, strict=True) if r]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(ids) > limit}
