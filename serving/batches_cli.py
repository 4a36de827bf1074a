"""`serving batches list|show|cancel`: every key's batches (the Batch API), for operators, in the configured Redis."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from serving.config import ServingConfig
from serving.gateway.auth import digest
from serving.gateway.batches import ALL, CANCEL, KIND, TERMINAL, view
from serving.gateway.store import Store
from serving.keys import run_on_store, store_command, table


def add_batches_parser(subparsers) -> None:
    sub = store_command(subparsers, "batches", "batches of every API key (in the configured Redis)")
    listing = sub.add_parser("list", help="batches, newest first")
    listing.add_argument("--status", help="only batches with this status (e.g. in_progress)")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    show = sub.add_parser("show", help="one batch: its Batch object, key and checkpoints")
    show.add_argument("batch_id")
    cancel = sub.add_parser("cancel", help="cancel a batch: its lines not finished stop within seconds")
    cancel.add_argument("batch_id")


def run_batches(args: argparse.Namespace) -> int:
    return run_on_store("batches", args, _run)


async def _run(args: argparse.Namespace, config: ServingConfig, store: Store) -> int:
    try:
        names = await _key_names(store, config)
        if args.batches_command == "list":
            rows = []
            for member in await store.index_range(ALL):
                owner, _, batch_id = member.partition("/")
                batch, _ = await _load(store, owner, batch_id)
                if batch is not None and (args.status is None or batch["status"] == args.status):
                    rows.append((batch, names.get(owner, owner[:12])))
                if len(rows) >= args.limit:
                    break
            if args.json:
                print(json.dumps([{**batch, "key": key} for batch, key in rows], indent=2))
            else:
                print(_table(rows))
            return 0
        owner = await _owner(store, args.batch_id)
        batch, record = await _load(store, owner, args.batch_id)
        assert batch is not None and record is not None
        if args.batches_command == "show":
            print(json.dumps({**batch, "key": names.get(owner, owner[:12]), "checkpoints": len(record["parts"])},
                             indent=2))
            return 0
        if batch["status"] in TERMINAL:
            print(f"error: batch {args.batch_id} is {batch['status']}: nothing to cancel", file=sys.stderr)
            return 1
        await store.record_put(CANCEL, owner, args.batch_id, str(int(time.time())).encode(), 0)
        print(f"cancelling {args.batch_id} (its lines stop within seconds; `serving batches show` follows it)")
        return 0
    finally:
        await store.close()


async def _key_names(store: Store, config: ServingConfig) -> dict[str, str]:
    names = {d: r["name"] for d, r in (await store.key_list()).items()}
    names.update({digest(k.key.get_secret_value()): k.name for k in config.auth.keys})
    names["anonymous"] = "(auth off)"
    return names


async def _owner(store: Store, batch_id: str) -> str:
    for member in await store.index_range(ALL):
        owner, _, found = member.partition("/")
        if found == batch_id:
            return owner
    raise LookupError(f"no batch {batch_id!r}")


async def _load(store: Store, owner: str, batch_id: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    raw = (await store.record_get(KIND, owner, [batch_id]))[0]
    if raw is None:
        return None, None
    record = json.loads(raw)
    flag = (await store.record_get(CANCEL, owner, [batch_id]))[0]
    return view(record, int(flag) if flag is not None else None), record


def _table(rows: list[tuple[dict[str, Any], str]]) -> str:
    def when(epoch: int | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(epoch)) if epoch else "-"

    return table(("id", "key", "status", "endpoint", "model", "done", "failed", "total", "created (UTC)"),
                 [(b["id"], key, b["status"], b["endpoint"], b.get("model") or "-",
                   str(b["request_counts"]["completed"]), str(b["request_counts"]["failed"]),
                   str(b["request_counts"]["total"]), when(b["created_at"])) for b, key in rows])
