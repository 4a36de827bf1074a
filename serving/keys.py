"""`serving keys create|update|list|revoke|usage`: API keys, their limits and usage, in the configured Redis."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from serving.config import ConfigError, ServingConfig, load_config
from serving.gateway.auth import LIMIT_FIELDS, create_key, digest, find_key, revoke_key, update_key
from serving.gateway.store import Store, build_store


def store_command(subparsers, command: str, help: str):
    """An operator command on the configured Redis (`serving keys`, `batches`, `adapters`; run it with
    run_on_store): its `--config`, and the parser of its subcommands (dest `<command>_command`)."""
    parser = subparsers.add_parser(command, help=help)
    parser.add_argument("--config", type=Path, help="configuration with redis.url (or set SERVING_REDIS__URL)")
    return parser.add_subparsers(dest=f"{command}_command", required=True)


def add_keys_parser(subparsers) -> None:
    sub = store_command(subparsers, "keys", "manage API keys (in the configured Redis)")
    create = sub.add_parser("create", help="create a key; it is printed once")
    create.add_argument("name")
    _limit_flags(create, "unset: ")
    create.add_argument("--expires-days", type=float, help="expire after this many days")
    create.add_argument("--admin", action="store_true", help="may load and unload LoRA adapters at runtime")
    update = sub.add_parser("update", help="change a key's models, limits or caps (`none` clears one)")
    update.add_argument("name")
    _limit_flags(update, "none: ", clearable=True)
    sub.add_parser("list", help="list keys (never the keys themselves)")
    revoke = sub.add_parser("revoke", help="revoke a key by name")
    revoke.add_argument("name")
    usage = sub.add_parser("usage", help="requests and tokens of a key, by day and model")
    usage.add_argument("name")
    usage.add_argument("--json", action="store_true", help="print JSON")


CLEAR = "none"


def _limit_flags(parser: argparse.ArgumentParser, unset: str, *, clearable: bool = False) -> None:
    """--models, --rpm, --tpm and the caps; with `clearable`, `none` clears a value (stored as null)."""
    number = _count_or_none if clearable else _count
    parser.add_argument("--models", help=f"comma-separated models the key may use ({unset}all)")
    parser.add_argument("--rpm", type=number, help=f"requests per minute ({unset}unlimited)")
    parser.add_argument("--tpm", type=number, help=f"tokens per minute, prompt + completion ({unset}unlimited)")
    parser.add_argument("--max-concurrent", type=number,
                        help=f"requests in flight at once ({unset}limits.max_concurrent)")
    parser.add_argument("--max-n", type=number, help=f"largest `n` of a request ({unset}limits.max_n)")
    parser.add_argument("--max-tokens", type=number,
                        help=f"largest max_tokens/max_completion_tokens of a request ({unset}limits.max_tokens)")


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _count_or_none(text: str) -> int | str:
    return CLEAR if text.lower() == CLEAR else _count(text)


def run_on_store(command: str, args: argparse.Namespace,
                 work: Callable[[argparse.Namespace, ServingConfig, Store], Coroutine[Any, Any, int]]) -> int:
    """An operator command on the configured Redis (`serving keys`, `batches`, `adapters`): its exit status;
    a ValueError or LookupError from `work` is printed as the error (status 1). `work` closes the store."""
    config = load_config(args.config)
    if not config.redis.url:
        raise ConfigError(f"serving {command} needs Redis: set redis.url in --config FILE or SERVING_REDIS__URL")
    store = build_store(config.redis)
    try:
        return asyncio.run(work(args, config, store))
    except (ValueError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run_keys(args: argparse.Namespace) -> int:
    return run_on_store("keys", args, _run)


async def _run(args: argparse.Namespace, config: ServingConfig, store: Store) -> int:
    try:
        if args.keys_command == "create":
            key, record = await create_key(store, args.name, models=_models(args.models, config),
                                           expires_in_days=args.expires_days, admin=args.admin,
                                           **{f: getattr(args, f) for f in LIMIT_FIELDS})
            print(f"created key {record['name']!r}: {key}\n(shown once: store it now; only its hash is kept)")
        elif args.keys_command == "update":
            fields = {f: getattr(args, f) for f in LIMIT_FIELDS if getattr(args, f) is not None}
            if args.models is not None:
                fields["models"] = args.models
            if not fields:
                raise ValueError("nothing to change: give --models, --rpm, --tpm, --max-concurrent, --max-n or "
                                 "--max-tokens")
            fields = {f: None if v == CLEAR else v for f, v in fields.items()}
            if fields.get("models") is not None:
                fields["models"] = _models(fields["models"], config)
            await update_key(store, args.name, **fields)
            print(f"updated {args.name!r} (gateways apply it within seconds)")
        elif args.keys_command == "list":
            _print_keys((await store.key_list()).values(), config)
        elif args.keys_command == "revoke":
            await revoke_key(store, args.name)
            print(f"revoked {args.name!r} (gateways stop accepting it within seconds)")
        else:
            usage = await store.usage_get(await _subject(store, config, args.name))
            print(json.dumps(usage, indent=2) if args.json else _usage_table(usage))
        return 0
    finally:
        await store.close()


def _models(text: str | None, config: ServingConfig) -> list[str] | None:
    models = [m.strip() for m in text.split(",") if m.strip()] if text else None
    unknown = [m for m in models or [] if config.models and config.model(m) is None]
    if unknown:
        raise ValueError(f"unknown model(s) in --models: {', '.join(unknown)}")
    return models


async def _subject(store: Store, config: ServingConfig, name: str) -> str:
    for spec in config.auth.keys:  # keys from the configuration are counted under their digest too
        if spec.name == name:
            return digest(spec.key.get_secret_value())
    return (await find_key(store, name))[0]


def _when(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(epoch)) if epoch else "-"


def _print_keys(records, config: ServingConfig) -> None:
    rows = [(r["name"], r.get("hint", "?"), ",".join(r["models"]) if r.get("models") else "all",
             *(str(r.get(f) or "-") for f in LIMIT_FIELDS), _when(r.get("created_at")), _when(r.get("expires_at")))
            for r in records]
    rows += [(k.name, "(configuration)", ",".join(k.models) if k.models else "all",
              *(str(getattr(k, f) or "-") for f in LIMIT_FIELDS), "-", "-") for k in config.auth.keys]
    print(table(("name", "key", "models", "rpm", "tpm", "concurrent", "n", "max_tokens", "created (UTC)",
                  "expires (UTC)"), rows))


def _usage_table(usage: dict) -> str:
    fields = ("requests", "cached_requests", "prompt_tokens", "completion_tokens", "batch_requests",
              "batch_prompt_tokens", "batch_completion_tokens")
    rows = [(day, model, *(str(c.get(f, 0)) for f in fields))
            for day, models in sorted(usage.items()) for model, c in sorted(models.items())]
    return table(("day", "model", "requests", "cached", "prompt tokens", "completion tokens", "batch requests",
                  "batch prompt tokens", "batch completion tokens"), rows)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: columns padded to their widest cell; `(none)` under the header without rows."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip() for row in (header, *rows)]
    return "\n".join(lines) if rows else "\n".join(lines) + "\n(none)"
