"""The Responses API's state: stored responses and `previous_response_id`, shared by every replica.

vLLM keeps stored responses in one process's memory (off by default, lost on restart, unknown to every
other replica). Here the gateway keeps them in the store (Redis; in-process locally), scoped by API key,
and vLLM never stores anything: a turn with `previous_response_id` is sent to whichever model replica
Ray Serve picks with the whole conversation written out as `input` (each earlier turn's input items and
output items, oldest first), which is what the Responses API defines the previous response to mean.

A stored record (JSON) is {"response": <the Response object as the client got it>, "input": [<this
turn's own input items, with ids>], "ancestors": [<ids of the earlier responses of its chain, oldest
first>]}. Storing a turn renews its ancestors' time to live, so a chain expires as a whole.

Routes (OpenAI's, https://platform.openai.com/docs/api-reference/responses): GET /v1/responses/{id},
DELETE /v1/responses/{id}, POST /v1/responses/{id}/cancel, GET /v1/responses/{id}/input_items;
POST /v1/responses goes through the gateway's common path (serving.gateway.routes) with `prepare` and
`Finisher` below.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Query

from serving.gateway.auth import Principal
from serving.gateway.errors import APIError
from serving.gateway.services import Caller, Services, Svc
from serving.gateway.store import StoreUnavailable

KIND = "responses"  # the store's record kind
# Request fields the gateway decides for vLLM: vLLM stores nothing and sees no previous_response_id
# (the history is written out instead); `background` needs a response that outlives its request.
_STORE_FIELDS = ("store", "previous_response_id")


@dataclass
class Turn:
    """One POST /v1/responses as the gateway handles it: what the client asked (`store`,
    `previous_response_id`), this turn's own input items (with ids), the chain before it."""

    response_id: str
    store: bool
    previous_response_id: str | None
    own_input: list[dict[str, Any]]
    ancestors: list[str] = field(default_factory=list)

    def patch(self, response: dict[str, Any]) -> dict[str, Any]:
        """A Response object from vLLM as the client sees it: its id, and `store`/`previous_response_id`
        as the client sent them (vLLM saw neither)."""
        response["id"] = self.response_id
        response["store"] = self.store
        response["previous_response_id"] = self.previous_response_id
        return response


async def prepare(payload: dict[str, Any], principal: Principal, svc: Services, request_id: str) -> Turn:
    """Rewrite a Responses request for a stateless engine (in place) and return its Turn.

    Raises APIError 400 (`store` or `background` not a boolean; `background` true: not supported;
    duplicate input item ids; `previous_response_id` not a string;
    previous_response_not_found: unknown, expired, deleted or another key's), 503 store_unavailable
    (the store cannot be read for a `previous_response_id`)."""
    for name in ("store", "background"):  # vLLM's pydantic would read "yes", "false" or 1 as booleans
        if payload.get(name) is not None and not isinstance(payload[name], bool):
            raise APIError(400, f"`{name}` must be a boolean.", param=name)
    if payload.get("background") is True:
        raise APIError(400, "Background responses are not supported by this server: send the request "
                            "without `background` (streamed if it takes long).", param="background",
                       code="unsupported_parameter")
    store = payload.get("store") is not False  # OpenAI's default: stored
    previous = payload.get("previous_response_id")
    if previous is not None and (not isinstance(previous, str) or not previous):
        raise APIError(400, "`previous_response_id` must be a string.", param="previous_response_id")
    own = input_items(payload.get("input"))  # may raise 400 (duplicate ids)
    history: list[dict[str, Any]] = []
    ancestors: list[str] = []
    if previous is not None:
        ancestors, history = await _chain(svc, principal.subject, previous)
    for name in _STORE_FIELDS:
        payload.pop(name, None)
    payload["store"] = False
    payload["input"] = history + [_for_engine(item) for item in own]
    # the engine's own id for the response is the gateway's internal request id (never the client's)
    response_id = f"resp_{request_id.replace('-', '')}"
    payload["request_id"] = response_id
    return Turn(response_id, store, previous, own, ancestors)


def input_items(value: Any) -> list[dict[str, Any]]:
    """The Responses `input` as a list of items, each with an id: a string is one user message (as
    OpenAI reads it); a message's string content becomes one `input_text` part. Other shapes are left
    for vLLM to judge (it answers 400 for what it cannot read)."""
    if isinstance(value, str):
        value = [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list):
        return [] if value is None else [value]
    items = []
    for item in value:
        if not isinstance(item, dict):
            items.append(item)
            continue
        item = dict(item)
        if "role" in item and item.get("type", "message") == "message":
            item["type"] = "message"
            if isinstance(item.get("content"), str) and item["role"] != "assistant":
                item["content"] = [{"type": "input_text", "text": item["content"]}]
        item.setdefault("id", f"{'msg' if item.get('type') == 'message' else 'item'}_{uuid.uuid4().hex}")
        items.append(item)
    ids = [item["id"] for item in items if isinstance(item, dict)]
    if len(ids) != len(set(ids)):  # input_items pages by id
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise APIError(400, f"Duplicate input item id '{duplicate}': each item's id must be unique.", param="input")
    return items


def _for_engine(item: Any) -> Any:
    """An input item as vLLM takes it: the ids the gateway gave input messages are its own."""
    if isinstance(item, dict) and item.get("type") == "message" and item.get("role") != "assistant":
        return {k: v for k, v in item.items() if k not in ("id", "status")}
    return item


async def _chain(svc: Services, owner: str, previous: str) -> tuple[list[str], list[dict[str, Any]]]:
    """(ids of the chain up to `previous`, oldest first; the conversation so far as input items)."""
    not_found = APIError(400, f"Previous response with id '{previous}' not found.", param="previous_response_id",
                         code="previous_response_not_found")
    last = await _get(svc, owner, [previous])
    if last[0] is None:
        raise not_found
    record = last[0]
    chain = list(record["ancestors"]) + [previous]
    records = await _get(svc, owner, chain[:-1]) + [record]
    if any(r is None for r in records):  # an earlier turn was deleted or expired: the history is not whole
        raise not_found
    history: list[dict[str, Any]] = []
    for earlier in records:
        assert earlier is not None
        history.extend(_for_engine(item) for item in earlier["input"])
        history.extend(earlier["response"].get("output") or [])
    return chain, history


async def _get(svc: Services, owner: str, ids: list[str]) -> list[dict[str, Any] | None]:
    try:
        raw = await svc.store.call("record_get", KIND, owner, ids)
    except StoreUnavailable:
        raise APIError(503, "Stored responses cannot be read right now; retry shortly.", code="store_unavailable",
                       headers={"retry-after": "1"}) from None
    return [json.loads(r) if r else None for r in raw]


async def save(svc: Services, owner: str, turn: Turn, response: dict[str, Any]) -> None:
    """Store a finished response of a turn with `store` (best effort: a store failure is logged)."""
    if not turn.store:
        return
    record = {"response": response, "input": turn.own_input, "ancestors": turn.ancestors}
    try:
        await svc.store.call("record_put", KIND, owner, turn.response_id,
                             json.dumps(record, separators=(",", ":")).encode(), svc.config.responses.ttl_s,
                             tuple(turn.ancestors))
    except StoreUnavailable:
        svc.metrics.redis_errors.inc(1, {"operation": "responses_put"})


router = APIRouter(prefix="/v1/responses", tags=["responses"])




async def _record(svc: Services, principal: Principal, response_id: str) -> dict[str, Any]:
    found = (await _get(svc, principal.subject, [response_id]))[0]
    if found is None:
        raise APIError(404, f"No response found with id '{response_id}'.", param="response_id", code="not_found")
    return found


@router.get("/{response_id}", summary="A stored response (of this API key).")
async def retrieve_response(response_id: str, principal: Caller, svc: Svc) -> dict[str, Any]:
    return (await _record(svc, principal, response_id))["response"]


@router.delete("/{response_id}", summary="Delete a stored response (of this API key).")
async def delete_response(response_id: str, principal: Caller, svc: Svc) -> dict[str, Any]:
    try:
        deleted = await svc.store.call("record_delete", KIND, principal.subject, response_id)
    except StoreUnavailable:
        raise APIError(503, "Stored responses cannot be changed right now; retry shortly.",
                       code="store_unavailable", headers={"retry-after": "1"}) from None
    if not deleted:
        raise APIError(404, f"No response found with id '{response_id}'.", param="response_id", code="not_found")
    return {"id": response_id, "object": "response", "deleted": True}


@router.post("/{response_id}/cancel", summary="Cancel a background response (none here: see the docs).")
async def cancel_response(response_id: str, principal: Caller, svc: Svc) -> dict[str, Any]:
    response = (await _record(svc, principal, response_id))["response"]
    raise APIError(400, f"Only background responses can be cancelled; response '{response_id}' is "
                        f"{response.get('status', 'completed')}.", param="response_id", code="not_cancellable")


@router.get("/{response_id}/input_items", summary="The input items of a stored response (of this API key).")
async def list_input_items(response_id: str, principal: Caller, svc: Svc,
                           limit: Annotated[int, Query(ge=1, le=100)] = 20,
                           order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
                           after: str | None = None) -> dict[str, Any]:
    """OpenAI's list object: `data` (this turn's own input items; `order` desc is newest first),
    `first_id`, `last_id`, `has_more`; `after` an item id to page from."""
    items = list((await _record(svc, principal, response_id))["input"])
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item.get("id") if isinstance(item, dict) else None for item in items]
        if after not in ids:
            raise APIError(400, f"No input item with id '{after}' in response '{response_id}'.", param="after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    first, last = (page[0], page[-1]) if page else ({}, {})
    return {"object": "list", "data": page, "first_id": first.get("id") if isinstance(first, dict) else None,
            "last_id": last.get("id") if isinstance(last, dict) else None, "has_more": len(items) > limit}
