"""Prefix-cache affinity: multi-turn chats on 1 replica, on 2 replicas routed by load, on 2 replicas routed by
affinity (serving.engine.routing), with vLLM's own prefix-cache counters.

    python -m loadtests.affinity                              # the three runs below, demo-chat under `serving up`
    python -m loadtests.affinity --conversations 8 --turns 6 --system-words 220 --out results/affinity

The workload, as chat clients send it: `--conversations` conversations, each with its own system prompt
of `--system-words` words, `--turns` turns, every turn resending the whole history (the answers of the
earlier turns included), the conversations running at once (one client each). Then the hot prefix: every
client continues one and the same conversation opening with questions of its own, `--hot-requests` in all.

For each run, a fresh `serving up` with demo-chat (prefix caching on) at 1 or 2 replicas; from the node's
metrics endpoint (vLLM's counters per replica, `ReplicaId`): prefix-cache hit rate (hit tokens / queried
tokens), the prompt tokens each replica computed (queried - hit), and requests per replica in the hot
phase. TTFT p50 of turns 2 and later (long shared prefixes). Writes OUT/affinity.md and .json.
Goals: 2 replicas with affinity reach >= 0.97x the 1-replica hit rate, no replica computes more than 75 %
of the prompt tokens, and the hot prefix's requests stay spread over both replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loadtests import servers
from loadtests.workload import WORDS

GOAL_HIT_RATIO, GOAL_MAX_SHARE = 0.97, 0.75
COUNTERS = ("ray_vllm_prefix_cache_hits_total", "ray_vllm_prefix_cache_queries_total",
            "ray_vllm_request_success_total")


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def settled(metrics_port: int, at_least_s: float = 12.0, timeout_s: float = 60.0) -> dict[tuple[str, str], float]:
    """The counters once they stop changing: Ray's metrics agent exports what replicas report every
    few seconds, so a read right after a run misses its last requests."""
    start, last = time.monotonic(), None
    while True:
        now = counters(metrics_port)
        if now == last and time.monotonic() - start >= at_least_s or time.monotonic() - start > timeout_s:
            return now
        last = now
        time.sleep(2.5)


def counters(metrics_port: int) -> dict[tuple[str, str], float]:
    """(counter, ReplicaId) -> value, summed over other labels, for demo-chat's engines."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in COUNTERS and sample.labels.get("model_name") == "demo-chat":
                key = (sample.name, sample.labels.get("ReplicaId", "?"))
                out[key] = out.get(key, 0.0) + sample.value
    return out


async def ask(http: httpx.AsyncClient, messages: list[dict], max_tokens: int) -> tuple[str, float]:
    """One streamed chat turn: (the answer, TTFT in s)."""
    body = {"model": "demo-chat", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    start, ttft, text = time.perf_counter(), None, []
    async with http.stream("POST", "/chat/completions", json=body, headers={"cache-control": "no-cache"}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            delta = (json.loads(line[6:]).get("choices") or [{}])[0].get("delta", {}).get("content")
            if delta:
                ttft = ttft if ttft is not None else time.perf_counter() - start
                text.append(delta)
    return "".join(text), ttft or 0.0


async def conversations(base_url: str, args: argparse.Namespace) -> list[float]:
    """Every conversation at once, turn after turn; TTFTs of turns 2 and later."""
    ttfts: list[float] = []

    async def one(c: int, http: httpx.AsyncClient) -> None:
        history = [{"role": "system", "content": words(1000 + c, args.system_words)},
                   {"role": "user", "content": f"Conversation {c}: {words(2000 + c, 20)}"}]
        for turn in range(args.turns):
            answer, ttft = await ask(http, history, args.max_tokens)
            if turn:
                ttfts.append(ttft)
            history += [{"role": "assistant", "content": answer},
                        {"role": "user", "content": f"Turn {turn + 1}: {words(3000 + c * 100 + turn, 12)}"}]

    async with httpx.AsyncClient(base_url=base_url, timeout=300,
                                 headers={"authorization": f"Bearer {servers.BENCH_KEY}"}) as http:
        await asyncio.gather(*(one(c, http) for c in range(args.conversations)))
    return ttfts


async def hot(base_url: str, args: argparse.Namespace) -> None:
    """One conversation opening, continued by every client with questions of its own."""
    opening = [{"role": "system", "content": words(9000, args.system_words)},
               {"role": "user", "content": "The shared question everybody starts with."},
               {"role": "assistant", "content": "The shared answer."}]
    todo = iter(range(args.hot_requests))

    async def client(http: httpx.AsyncClient) -> None:
        for i in todo:
            await ask(http, opening + [{"role": "user", "content": words(9100 + i, 12)}], args.max_tokens)

    async with httpx.AsyncClient(base_url=base_url, timeout=300,
                                 headers={"authorization": f"Bearer {servers.BENCH_KEY}"}) as http:
        await asyncio.gather(*(client(http) for _ in range(args.conversations)))


def delta(before: dict, after: dict, name: str) -> dict[str, float]:
    return {replica: value - before.get((n, replica), 0.0) for (n, replica), value in after.items() if n == name}


def run_one(label: str, replicas: int, routing: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import yaml

    from serving.local import local_models

    port, metrics_port = servers.free_port(), servers.free_port()
    model = {**local_models()[0], "replicas": replicas, "routing": routing}
    data = servers.with_bench_key({"models": [model], "gateway": {"host": "127.0.0.1", "port": port,
                                                                  "metrics_port": metrics_port}})
    config_file = out / f"{label}.yaml"
    config_file.write_text(yaml.safe_dump(data, sort_keys=False))
    server = servers.platform(config_file, port, out / f"{label}.log")
    with server:
        print(f"{label}: ready in {server.startup_s:.0f} s", flush=True)
        asyncio.run(conversations(server.base_url, argparse.Namespace(**{**vars(args), "conversations": 1,
                                                                          "turns": 1})))  # warm-up
        before = settled(metrics_port)
        ttfts = asyncio.run(conversations(server.base_url, args))
        middle = settled(metrics_port)
        asyncio.run(hot(server.base_url, args))
        after = settled(metrics_port)
    hits = delta(before, middle, COUNTERS[0])
    queries = delta(before, middle, COUNTERS[1])
    computed = {r: queries[r] - hits.get(r, 0.0) for r in queries}
    total_computed = sum(computed.values()) or 1.0
    hot_requests = delta(middle, after, COUNTERS[2])
    result = {"label": label, "replicas": replicas, "routing": routing,
              "hit_rate": sum(hits.values()) / (sum(queries.values()) or 1.0),
              "computed_share": {r: v / total_computed for r, v in computed.items()},
              "prompt_tokens_queried": sum(queries.values()), "ttft_p50_ms": statistics.median(ttfts) * 1000,
              "hot_requests_per_replica": hot_requests}
    print(f"{label}: hit rate {result['hit_rate']:.3f}, computed share "
          f"{sorted(round(v, 2) for v in result['computed_share'].values())}, TTFT p50 "
          f"{result['ttft_p50_ms']:.0f} ms, hot prefix requests per replica {sorted(hot_requests.values())}",
          flush=True)
    return result


def render(runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    single = runs[0]["hit_rate"]
    lines = [f"{args.conversations} conversations at once, each its own {args.system_words}-word system prompt, "
             f"{args.turns} turns resending the whole history, {args.max_tokens} tokens an answer; then "
             f"{args.hot_requests} requests continuing one shared opening.", "",
             "| run | prefix-cache hit rate | vs 1 replica | largest share of computed prompt tokens | "
             "TTFT p50, turns 2+ (ms) | hot prefix: requests per replica |", "|---|---|---|---|---|---|"]
    for run in runs:
        share = max(run["computed_share"].values()) if run["computed_share"] else 0
        lines.append(f"| {run['label']} | {run['hit_rate']:.3f} | {run['hit_rate'] / single:.2f}x | {share:.2f} | "
                     f"{run['ttft_p50_ms']:.0f} | {sorted(int(v) for v in run['hot_requests_per_replica'].values())} |")
    affinity = runs[-1]
    share = max(affinity["computed_share"].values())
    spread = len([v for v in affinity["hot_requests_per_replica"].values() if v > 0])
    ratio = affinity["hit_rate"] / single
    lines += ["", f"Goals (2 replicas, affinity): hit rate {ratio:.2f}x of 1 replica "
                  f"(goal >= {GOAL_HIT_RATIO}x: {'met' if ratio >= GOAL_HIT_RATIO else 'not met'}), "
                  f"largest computed share {share:.2f} (goal <= {GOAL_MAX_SHARE}: "
                  f"{'met' if share <= GOAL_MAX_SHARE else 'not met'}), hot prefix on {spread} of 2 replicas."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.affinity", description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--system-words", type=int, default=220)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--hot-requests", type=int, default=48)
    parser.add_argument("--runs", default="1-replica,2-load,2-affinity",
                        help="which of 1-replica, 2-load, 2-affinity, in this order")
    parser.add_argument("--out", default="results/affinity")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plans = {"1-replica": (1, "affinity"), "2-load": (2, "load"), "2-affinity": (2, "affinity")}
    runs = [run_one(label, *plans[label], args, out) for label in args.runs.split(",")]
    text = render(runs, args)
    (out / "affinity.json").write_text(json.dumps(runs, indent=2))
    (out / "affinity.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
