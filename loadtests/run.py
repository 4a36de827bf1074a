"""Run a locust profile headless against an OpenAI-compatible base URL; write CSVs, HTML and plots.

    python -m loadtests.run --profile loadtests/profiles/smoke.toml --base-url http://127.0.0.1:8000/v1 \
        [--out results/smoke] [--api-key KEY] [--users 8] [--spawn-rate 8] [--run-time 60s] \
        [--set models=demo-chat,demo-chat-b] [--set output_tokens=128]

A profile is TOML:

    users = 4                 # concurrent users (closed loop: the concurrency)
    spawn_rate = 4            # users started per second
    run_time = "30s"
    stop_timeout = "10s"      # let requests in flight finish at the end
    user_classes = ["ChatStreamUser", "EmbeddingUser"]   # from loadtests/locustfile.py
    [options]                 # the locustfile's own options (see its --help), dashes or underscores
    models = "demo-chat"
    output_tokens = 64

Writes under --out: locust_stats.csv, locust_stats_history.csv (every row, every interval),
locust_failures.csv, locust_exceptions.csv, report.html (locust's), locust_llm_requests.csv and
locust_llm_itl.csv (every request and token gap, full precision), llm_summary.csv/.md, ttft.png,
itl.png, latency.png, throughput.png. Exits with locust's status (1 when any request failed).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
PROFILE_KEYS = {"users", "spawn_rate", "run_time", "stop_timeout", "user_classes", "options", "description"}


def load_profile(path: str | Path) -> dict[str, Any]:
    profile = tomllib.loads(Path(path).read_text())
    unknown = set(profile) - PROFILE_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown profile keys {sorted(unknown)}; known: {sorted(PROFILE_KEYS)}")
    if not profile.get("user_classes"):
        raise ValueError(f"{path}: user_classes must name at least one user of {LOCUSTFILE.name}")
    return profile


def _option_args(options: dict[str, Any]) -> list[str]:
    argv = []
    for key, value in options.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, list):
            value = ",".join(map(str, value))
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def locust_command(profile: dict[str, Any], base_url: str, out: Path) -> list[str]:
    prefix = str(out / "locust")
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", base_url,
        "--users", str(profile.get("users", 1)),
        "--spawn-rate", str(profile.get("spawn_rate", profile.get("users", 1))),
        "--run-time", str(profile.get("run_time", "30s")), "--stop-timeout", str(profile.get("stop_timeout", "10s")),
        "--csv", prefix, "--csv-full-history", "--html", str(out / "report.html"), "--only-summary",
        "--llm-samples", prefix, *_option_args(profile.get("options", {})), *profile["user_classes"],
    ]


def _parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value")
        out[key.strip().replace("-", "_")] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", required=True, type=Path)
    parser.add_argument("--base-url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--out", type=Path, help="output directory (default: results/<profile>-<time>)")
    parser.add_argument("--api-key", help="Authorization: Bearer key(s), comma-separated (default: $OPENAI_API_KEY)")
    parser.add_argument("--users", type=int)
    parser.add_argument("--spawn-rate", type=float)
    parser.add_argument("--run-time")
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                        help="override a locustfile option of the profile (repeatable)")
    args = parser.parse_args(argv)
    try:
        profile = load_profile(args.profile)
        overrides = _parse_set(args.set)
    except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key in ("users", "spawn_rate", "run_time"):
        if getattr(args, key) is not None:
            profile[key] = getattr(args, key)
    options = {k.replace("-", "_"): v for k, v in profile.get("options", {}).items()}
    options.update(overrides)
    api_key = options.pop("api_key", None) if args.api_key is None else args.api_key
    if options.get("prompts") and Path(options["prompts"]).exists():
        options["prompts"] = str(Path(options["prompts"]).resolve())  # locust runs from the repository root
    profile["options"] = options
    out = args.out or Path("results") / f"{args.profile.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = locust_command(profile, args.base_url, out)
    print("$ " + " ".join(command), flush=True)
    # the key goes by environment, not argv: command lines show in `ps` and in locust's usage errors
    env = {**os.environ, **({"OPENAI_API_KEY": str(api_key)} if api_key is not None else {})}
    code = subprocess.call(command, cwd=Path(__file__).resolve().parent.parent, env=env)

    from loadtests.report import build, markdown_table

    summary, files = build(out / "locust")
    if summary:
        print("\n" + markdown_table(summary))
    print(f"\nwrote {out}/: " + ", ".join(sorted({f.name for f in files} | {p.name for p in out.glob('locust_*.csv')}
                                                   | ({"report.html"} if (out / "report.html").exists() else set()))))
    return code


if __name__ == "__main__":
    sys.exit(main())
