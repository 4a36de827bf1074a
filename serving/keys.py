"""`serving keys create|list|revoke|usage`: API keys and their usage, in the configured Redis."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from serving.config import ConfigError, ServingConfig, load_config
from serving.gateway.auth import create_key, digest, find_key, revoke_key
from serving.gateway.store import RedisStore


def add_keys_parser(subparsers) -> None:
    keys = subparsers.add_parser("keys", help="manage API keys (in the configured Redis)")
    keys.add_argument("--config", type=Path, help="configuration with redis.url (or set SERVING_REDIS__URL)")
    sub = keys.add_subparsers(dest="keys_command", required=True)
    create = sub.add_parser("create", help="create a key; it is printed once")
    create.add_argument("name")
    create.add_argument("--models", help="comma-separated models the key may use (default: all)")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens per minute (prompt + completion)")
    create.add_argument("--expires-days", type=float, help="expire after this many days")
    sub.add_parser("list", help="list keys (never the keys themselves)")
    revoke = sub.add_parser("revoke", help="revoke a key by name")
    revoke.add_argument("name")
    usage = sub.add_parser("usage", help="requests and tokens of a key, by day and model")
    usage.add_argument("name")
    usage.add_argument("--json", action="store_true", help="print JSON")


def run_keys(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if not config.redis.url:
        raise ConfigError("serving keys needs Redis: set redis.url in --config FILE or SERVING_REDIS__URL")
    password = config.redis.password.get_secret_value() if config.redis.password else None
    store = RedisStore(config.redis.url, password=password, prefix=config.redis.key_prefix)
    try:
        return asyncio.run(_run(args, config, store))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


async def _run(args: argparse.Namespace, config: ServingConfig, store: RedisStore) -> int:
    try:
        if args.keys_command == "create":
            models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
            unknown = [m for m in models or [] if config.models and config.model(m) is None]
            if unknown:
                raise ValueError(f"unknown model(s) in --models: {', '.join(unknown)}")
            key, record = await create_key(store, args.name, models=models, rpm=args.rpm, tpm=args.tpm,
                                           expires_in_days=args.expires_days)
            print(f"created key {record['name']!r}: {key}\n(shown once: store it now; only its hash is kept)")
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


async def _subject(store: RedisStore, config: ServingConfig, name: str) -> str:
    for spec in config.auth.keys:  # keys from the configuration are counted under their digest too
        if spec.name == name:
            return digest(spec.key.get_secret_value())
    return (await find_key(store, name))[0]


def _when(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(epoch)) if epoch else "-"


def _print_keys(records, config: ServingConfig) -> None:
    rows = [(r["name"], r.get("hint", "?"), ",".join(r["models"]) if r.get("models") else "all",
             str(r.get("rpm") or "-"), str(r.get("tpm") or "-"), _when(r.get("created_at")), _when(r.get("expires_at")))
            for r in records]
    rows += [(k.name, "(configuration)", ",".join(k.models) if k.models else "all", str(k.rpm or "-"),
              str(k.tpm or "-"), "-", "-") for k in config.auth.keys]
    print(_table(("name", "key", "models", "rpm", "tpm", "created (UTC)", "expires (UTC)"), rows))


def _usage_table(usage: dict) -> str:
    rows = [(day, model, str(c.get("requests", 0)), str(c.get("cached_requests", 0)), str(c.get("prompt_tokens", 0)),
             str(c.get("completion_tokens", 0)))
            for day, models in sorted(usage.items()) for model, c in sorted(models.items())]
    return _table(("day", "model", "requests", "cached", "prompt tokens", "completion tokens"), rows)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in (header, *rows)]
    return "\n".join(lines) if rows else "\n".join(lines) + "\n(none)"
