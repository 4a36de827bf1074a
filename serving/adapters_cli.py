"""`serving adapters add|list|remove`: LoRA adapters loaded at runtime (serving.gateway.adapters), in the
configured Redis. Gateways pick a change up within 2 s; model replicas load an added adapter on its first
request (`add` checks the base model and the name, not the weights: POST /v1/load_lora_adapter with an
admin key also loads it on one replica at once, and refuses a path the engine cannot load)."""

from __future__ import annotations

import argparse
import json
import re
import time

from serving.config import NAME_PATTERN, ServingConfig
from serving.gateway.services import ADAPTERS, PLATFORM
from serving.gateway.store import Store
from serving.keys import run_on_store, store_command, table


def add_adapters_parser(subparsers) -> None:
    sub = store_command(subparsers, "adapters", "LoRA adapters loaded at runtime (in the configured Redis)")
    add = sub.add_parser("add", help="serve a LoRA adapter under a model name of its own")
    add.add_argument("name")
    add.add_argument("--model", required=True, help="the base model (it needs runtime_adapters or lora_adapters)")
    add.add_argument("--path", required=True, help="the adapter's directory on the model replicas, or an fsspec URL")
    sub.add_parser("list", help="the adapters loaded at runtime")
    remove = sub.add_parser("remove", help="stop serving an adapter (its name answers 404 within 2 s)")
    remove.add_argument("name")


def run_adapters(args: argparse.Namespace) -> int:
    return run_on_store("adapters", args, _run)


async def _run(args: argparse.Namespace, config: ServingConfig, store: Store) -> int:
    try:
        if args.adapters_command == "add":
            _check(args, config, await store.index_range(ADAPTERS))
            record = {"name": args.name, "model": args.model, "path": args.path, "created_at": time.time()}
            await store.record_put(ADAPTERS, PLATFORM, args.name, json.dumps(record).encode(), 0)
            await store.index_add(ADAPTERS, args.name, record["created_at"])
            print(f"added {args.name!r} on {args.model} (gateways serve it within 2 s)")
        elif args.adapters_command == "list":
            names = await store.index_range(ADAPTERS, newest_first=False)
            records = [json.loads(r) for r in await store.record_get(ADAPTERS, PLATFORM, names) if r]
            rows = [(r["name"], r["model"], r["path"], time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["created_at"])))
                    for r in records]
            print(table(("name", "model", "path", "added (UTC)"), rows))
        else:
            if not await store.record_delete(ADAPTERS, PLATFORM, args.name):
                raise ValueError(f"no adapter {args.name!r} loaded at runtime")
            await store.index_remove(ADAPTERS, args.name)
            print(f"removed {args.name!r} (gateways answer 404 for it within 2 s)")
        return 0
    finally:
        await store.close()


def _check(args: argparse.Namespace, config: ServingConfig, loaded: list[str]) -> None:
    if not re.match(NAME_PATTERN, args.name):
        raise ValueError(f"the name must match {NAME_PATTERN}")
    base = config.model(args.model)
    if base is None or base.name != args.model:
        raise ValueError(f"no base model {args.model!r} in the configuration")
    if not (base.runtime_adapters or base.lora_adapters):
        raise ValueError(f"the model {args.model!r} does not take LoRA adapters (set runtime_adapters: true)")
    if config.model(args.name) is not None or args.name in loaded:
        raise ValueError(f"the name {args.name!r} is taken")
