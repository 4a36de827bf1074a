"""The Files API (OpenAI's /v1/files) for the Batch API: upload, list, retrieve, content, delete.

A file belongs to the API key that uploaded it (or, for a batch's output and error files, the key whose
batch wrote them); another key gets 404 for it. Its record (OpenAI's File object plus where its bytes are)
lives in the store (Redis; in-process locally), its bytes in `files.storage_url` through fsspec (a local
directory by default, a PVC in the chart, object storage with s3fs/gcsfs installed). A record carries the
file's expiry as its time to live; `sweep` deletes the bytes of files whose record is gone.

Routes (https://platform.openai.com/docs/api-reference/files): POST /v1/files (multipart: `file`,
`purpose` — only `batch` here —, optional `expires_after[anchor]`=created_at and `expires_after[seconds]`
3600..2592000), GET /v1/files (`purpose`, `limit` 1..10000, `order`, `after`), GET /v1/files/{id},
GET /v1/files/{id}/content, DELETE /v1/files/{id}.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
import uuid
from typing import IO, Annotated, Any

import fsspec
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from serving.config import FilesConfig
from serving.gateway.errors import APIError
from serving.gateway.services import Caller, Services, Svc
from serving.gateway.store import StoreUnavailable

KIND = "files"  # the store's record kind; each owner's files are also in the index files:<owner>
_SECONDS = re.compile(r"[0-9]{1,8}")  # ASCII digits only (str.isdigit takes superscripts, int() other scripts)
OWNERS = "files-owners"  # index of the owners that have files (whose expired files are swept)
PURPOSES = ("batch",)  # what may be uploaded; batches write files of purpose batch_output
EXPIRY_RANGE_S = (3600, 30 * 86400)  # OpenAI's bounds of expires_after.seconds


class FileStorage:
    """File contents under one fsspec URL: `<root>/<owner>/<file id>`, batch checkpoints under
    `<root>/batches/<batch id>/`. Blocking filesystem calls run in a worker thread."""

    def __init__(self, url: str):
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.root = self.root.rstrip("/")

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    async def put_stream(self, path: str, source: IO[bytes]) -> None:
        await asyncio.to_thread(self._put_stream, path, source)

    def _put_stream(self, path: str, source: IO[bytes]) -> None:
        self.fs.makedirs(path.rpartition("/")[0], exist_ok=True)
        with self.fs.open(path, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)

    async def put(self, path: str, data: bytes) -> None:
        await asyncio.to_thread(self._put, path, data)

    def _put(self, path: str, data: bytes) -> None:
        self.fs.makedirs(path.rpartition("/")[0], exist_ok=True)
        with self.fs.open(path, "wb") as out:
            out.write(data)

    async def get(self, path: str) -> bytes:
        return await asyncio.to_thread(self.fs.cat_file, path)

    async def concat(self, path: str, sources: list[str]) -> int:
        """Write the files `sources` one after another into `path`; returns its size in bytes."""
        return await asyncio.to_thread(self._concat, path, sources)

    def _concat(self, path: str, sources: list[str]) -> int:
        self.fs.makedirs(path.rpartition("/")[0], exist_ok=True)
        size = 0
        with self.fs.open(path, "wb") as out:
            for source in sources:
                with self.fs.open(source, "rb") as part:
                    while chunk := part.read(1 << 20):
                        out.write(chunk)
                        size += len(chunk)
        return size

    async def delete(self, path: str, recursive: bool = False) -> None:
        def remove() -> None:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=recursive)

        await asyncio.to_thread(remove)


def new_id(prefix: str, at_ns: int | None = None, suffix: str | None = None) -> str:
    """An id that sorts by creation time (16 hex digits of nanoseconds) and cannot be guessed (64 random
    bits, or `suffix`): lists page by it, so a cursor whose object was deleted still has its place."""
    return f"{prefix}{at_ns if at_ns is not None else time.time_ns():016x}{suffix or uuid.uuid4().hex[:16]}"


def after_cursor(ids: list[str], after: str | None, newest_first: bool) -> list[str]:
    """The ids (sorted as `newest_first` says) that come after the cursor `after` (OpenAI's `after`), also
    when the object it names was deleted since."""
    if after is None:
        return ids
    return [i for i in ids if (i < after if newest_first else i > after)]


def file_object(file_id: str, size: int, created_at: int, filename: str, purpose: str,
                expires_at: int | None) -> dict[str, Any]:
    """OpenAI's File object."""
    return {"id": file_id, "object": "file", "bytes": size, "created_at": created_at, "filename": filename,
            "purpose": purpose, "status": "processed", "expires_at": expires_at, "status_details": None}


async def save_record(svc: Services, owner: str, record: dict[str, Any]) -> None:
    """Store a file's record (its File object and `path`) until the file expires, and index it."""
    file = record["file"]
    ttl_s = max(1, file["expires_at"] - int(time.time())) if file.get("expires_at") else 0
    await svc.store.call("record_put", KIND, owner, file["id"], json.dumps(record).encode(), ttl_s)
    await svc.store.call("index_add", f"{KIND}:{owner}", file["id"], 0.0)  # listed by id: by creation time
    await svc.store.call("index_add", OWNERS, owner, float(file["created_at"]))


async def load_record(svc: Services, owner: str, file_id: str) -> dict[str, Any] | None:
    """A file's record ({"file": File object, "path": where its bytes are}); None when not this owner's."""
    raw = (await svc.store.call("record_get", KIND, owner, [file_id]))[0]
    return json.loads(raw) if raw else None


def store_unavailable() -> APIError:
    return APIError(503, "Files cannot be read or changed right now; retry shortly.", code="store_unavailable",
                    headers={"retry-after": "1"})


def not_found(file_id: str) -> APIError:
    return APIError(404, f"No such File object: {file_id}", param="id", code="not_found")


router = APIRouter(prefix="/v1/files", tags=["files"])


async def _form(request: Request, config: FilesConfig):
    """The multipart form of an upload, its size bounded by Content-Length (411 without, 413 above the
    limit; h11 reads no byte past it) and its arrival by upload_timeout_s (408)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "multipart/form-data":
        raise APIError(415, "Upload a file as multipart/form-data with the fields `file` and `purpose`.")
    declared = request.headers.get("content-length", "")
    if not declared.isdigit():
        raise APIError(411, "An upload needs a Content-Length header.", code="length_required")
    if int(declared) > config.max_bytes + 64 * 1024:  # the form's own fields and boundaries: a few hundred bytes
        raise APIError(413, f"The file is larger than {config.max_bytes} bytes.", code="file_too_large")
    try:
        async with asyncio.timeout(config.upload_timeout_s):
            return await request.form(max_files=1, max_fields=8)
    except TimeoutError:
        raise APIError(408, f"The upload did not arrive within {config.upload_timeout_s:g} s.",
                       code="body_timeout") from None
    except ClientDisconnect:
        raise APIError(499, "The client closed the connection during the upload.") from None
    except APIError:
        raise
    except Exception as exc:  # noqa: BLE001 - Starlette's MultiPartException and parser errors: the client's form
        raise APIError(400, f"The upload is not a valid multipart form: {str(exc)[:200]}") from None


def _expiry(form, created_at: int, default_s: int) -> int:
    anchor, seconds = form.get("expires_after[anchor]"), form.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return created_at + default_s
    if anchor != "created_at":
        raise APIError(400, "`expires_after[anchor]` must be `created_at`.", param="expires_after.anchor")
    if not isinstance(seconds, str) or not _SECONDS.fullmatch(seconds) or not \
            EXPIRY_RANGE_S[0] <= int(seconds) <= EXPIRY_RANGE_S[1]:
        raise APIError(400, f"`expires_after[seconds]` must be an integer from {EXPIRY_RANGE_S[0]} to "
                            f"{EXPIRY_RANGE_S[1]}.", param="expires_after.seconds")
    return created_at + int(seconds)


@router.post("", summary="Upload a file (purpose `batch`: a Batch API input file, JSONL).")
async def create_file(request: Request, principal: Caller, svc: Svc) -> dict[str, Any]:
    config = svc.config.files
    form = await _form(request, config)
    try:
        upload = form.get("file")
        purpose = form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "The form has no `file` (a file part).", param="file")
        if purpose not in PURPOSES:
            raise APIError(400, f"`purpose` must be one of {', '.join(PURPOSES)}: this server keeps files for the "
                                "Batch API.", param="purpose")
        size = upload.size if upload.size is not None else 0
        if size > config.max_bytes:
            raise APIError(413, f"The file is larger than {config.max_bytes} bytes.", code="file_too_large")
        created_at = int(time.time())
        expires_at = _expiry(form, created_at, config.ttl_s)
        file_id = new_id("file-")
        path = svc.files.path(principal.subject, file_id)
        upload.file.seek(0)
        await svc.files.put_stream(path, upload.file)
        file = file_object(file_id, size, created_at, (upload.filename or "upload.jsonl")[:255], str(purpose),
                           expires_at)
        try:
            await save_record(svc, principal.subject, {"file": file, "path": path})
        except StoreUnavailable:
            await svc.files.delete(path)
            raise store_unavailable() from None
        return file
    finally:
        await form.close()


async def _record(svc: Services, owner: str, file_id: str) -> dict[str, Any]:
    try:
        record = await load_record(svc, owner, file_id)
    except StoreUnavailable:
        raise store_unavailable() from None
    if record is None:
        raise not_found(file_id)
    return record


@router.get("", summary="The files of this API key, newest first.")
async def list_files(principal: Caller, svc: Svc, purpose: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
                     order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
                     after: str | None = None) -> dict[str, Any]:
    """OpenAI's list object (`data`, `first_id`, `last_id`, `has_more`); `after`: a file id to page from."""
    try:
        ids = sorted(await svc.store.call("index_range", f"{KIND}:{principal.subject}"), reverse=order == "desc")
        ids = after_cursor(ids, after, order == "desc")
        files: list[dict[str, Any]] = []
        for start in range(0, len(ids), 100):  # one read per hundred ids until the page is full
            raw = await svc.store.call("record_get", KIND, principal.subject, ids[start:start + 100])
            found = (json.loads(r)["file"] for r in raw if r)
            files += [f for f in found if purpose is None or f["purpose"] == purpose]
            if len(files) > limit:
                break
    except StoreUnavailable:
        raise store_unavailable() from None
    page = files[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(files) > limit}


@router.get("/{file_id}", summary="A file's File object.")
async def retrieve_file(file_id: str, principal: Caller, svc: Svc) -> dict[str, Any]:
    return (await _record(svc, principal.subject, file_id))["file"]


@router.get("/{file_id}/content", summary="A file's contents.", response_class=Response)
async def file_content(file_id: str, principal: Caller, svc: Svc) -> Response:
    record = await _record(svc, principal.subject, file_id)
    try:
        data = await svc.files.get(record["path"])
    except FileNotFoundError:
        raise not_found(file_id) from None
    return Response(data, media_type="application/jsonl" if record["file"]["filename"].endswith(".jsonl")
                    else "application/octet-stream")


@router.delete("/{file_id}", summary="Delete a file.")
async def delete_file(file_id: str, principal: Caller, svc: Svc) -> dict[str, Any]:
    record = await _record(svc, principal.subject, file_id)
    try:
        await svc.store.call("record_delete", KIND, principal.subject, file_id)
        await svc.store.call("index_remove", f"{KIND}:{principal.subject}", file_id)
    except StoreUnavailable:
        raise store_unavailable() from None
    await svc.files.delete(record["path"])
    return {"id": file_id, "object": "file", "deleted": True}


async def sweep(svc: Services, owner: str) -> int:
    """Delete the bytes of `owner`'s files whose record expired (and their index entries); returns how many."""
    ids = await svc.store.call("index_range", f"{KIND}:{owner}")
    gone = 0
    for start in range(0, len(ids), 100):
        chunk = ids[start:start + 100]
        for file_id, raw in zip(chunk, await svc.store.call("record_get", KIND, owner, chunk), strict=True):
            if raw is None:
                await svc.files.delete(svc.files.path(owner, file_id))
                await svc.store.call("index_remove", f"{KIND}:{owner}", file_id)
                gone += 1
    return gone
