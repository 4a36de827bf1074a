"""Interactive latency while a large batch runs on the same model, against the same load without it.

    python -m loadtests.batch_latency                          # demo-chat under `serving up`
    python -m loadtests.batch_latency --lines 4000 --concurrency 4 --requests 160 --out results/batch

One platform (`serving up`, the demo chat model exactly as it runs there, with priority scheduling as
every model that takes batches). Three phases, one after another on the same server:

1. interactive alone: `--concurrency` closed-loop clients stream `--requests` chat requests
   (`--input-words` words in, `--max-tokens` out with ignore_eos), as loadtests.bench sends them;
2. a batch of `--lines` chat requests (`--batch-max-tokens` out each) is created through the Batch API
   and left to run; once lines are finishing, the same interactive load again;
3. the batch is cancelled (it would run for a long time on a CPU), and its progress read.

Prints and writes OUT/batch_latency.md and .json: TTFT p50/p95, ITL p50/p95 and throughput of the
interactive load with and without the batch, their ratios (the goal: TTFT p50 within 1.2x), and the
batch lines finished per second during phase 2.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from dataclasses import asdict
from pathlib import Path

from loadtests import servers
from loadtests.bench import _loop_runner, _ms, bodies, drive, prompt_for, summarize

GOAL_TTFT_RATIO = 1.2


def batch_file(model: str, lines: int, input_words: int, max_tokens: int) -> bytes:
    rows = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
                      "messages": [{"role": "user", "content": prompt_for(50_000_000 + i, input_words)}]}}
            for i in range(lines)]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def interactive(base_url: str, model: str, args: argparse.Namespace, first: int):
    payloads = bodies(model, first, args.requests, input_words=args.input_words, max_tokens=args.max_tokens)
    results, duration = _loop_runner()(drive(base_url, payloads, args.concurrency, servers.BENCH_KEY))
    return summarize(args.concurrency, results, duration)


def run(args: argparse.Namespace) -> dict:
    import openai
    import yaml

    from serving.config import load_config
    from serving.local import local_models

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = servers.free_port()
    data = servers.with_bench_key({"models": [local_models()[0]], "gateway": {"host": "127.0.0.1", "port": port},
                                   "files": {"storage_url": f"file://{out.resolve()}/files"}})
    config = load_config(data=data, check_vllm=True)
    (out / "platform.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    model = config.models[0].name
    server = servers.platform(out / "platform.yaml", port, out / "platform.log")
    with server:
        print(f"platform ready in {server.startup_s:.0f} s at {server.base_url}", flush=True)
        client = openai.OpenAI(base_url=server.base_url, api_key=servers.BENCH_KEY, max_retries=2)
        interactive(server.base_url, model, argparse.Namespace(**{**vars(args), "requests": 8}), 90_000_000)  # warm
        alone = interactive(server.base_url, model, args, 0)
        print(f"alone:       TTFT p50 {_ms(alone.ttft_p50_ms)} p95 {_ms(alone.ttft_p95_ms)}  TPOT p50 "
              f"{_ms(alone.tpot_p50_ms)}  {alone.requests_per_s:.2f} req/s", flush=True)
        file = client.files.create(file=("lines.jsonl", io.BytesIO(batch_file(model, args.lines, args.input_words,
                                                                               args.batch_max_tokens))),
                                   purpose="batch")
        batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
        while client.batches.retrieve(batch.id).request_counts.completed < 2:
            time.sleep(0.2)
        before, started = client.batches.retrieve(batch.id).request_counts.completed, time.monotonic()
        during = interactive(server.base_url, model, args, 1_000_000)
        lines_done = client.batches.retrieve(batch.id).request_counts.completed - before
        lines_per_s = lines_done / (time.monotonic() - started)
        print(f"with batch:  TTFT p50 {_ms(during.ttft_p50_ms)} p95 {_ms(during.ttft_p95_ms)}  TPOT p50 "
              f"{_ms(during.tpot_p50_ms)}  {during.requests_per_s:.2f} req/s; batch {lines_per_s:.2f} lines/s",
              flush=True)
        client.batches.cancel(batch.id)
        deadline = time.monotonic() + 60
        while (final := client.batches.retrieve(batch.id)).status not in ("cancelled", "completed"):
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
    result = {"alone": asdict(alone), "with_batch": asdict(during), "batch_lines_per_s": lines_per_s,
              "batch_final": final.model_dump(), "args": vars(args),
              "batches_config": config.batches.model_dump()}
    (out / "batch_latency.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "batch_latency.md").write_text(render(result))
    print(render(result))
    return result


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def render(result: dict) -> str:
    alone, during, args = result["alone"], result["with_batch"], result["args"]
    ratio = during["ttft_p50_ms"] / alone["ttft_p50_ms"] if alone["ttft_p50_ms"] and during["ttft_p50_ms"] else None
    # time per output token rather than ITL p50: on a CPU many tokens arrive glued to the one before (gap ~0)
    rows = [("TTFT p50 (ms)", "ttft_p50_ms"), ("TTFT p95 (ms)", "ttft_p95_ms"),
            ("time per output token p50 (ms)", "tpot_p50_ms"), ("ITL p95 (ms)", "itl_p95_ms"),
            ("request latency p50 (ms)", "latency_p50_ms")]
    lines = [f"Interactive: {args['concurrency']} streaming clients, {args['requests']} requests, "
             f"{args['input_words']} words in, {args['max_tokens']} tokens out. Batch: {args['lines']} lines of "
             f"{args['batch_max_tokens']} tokens, batches.max_in_flight {result['batches_config']['max_in_flight']}, "
             f"priority {result['batches_config']['priority']}.", "",
             "| | interactive alone | with the batch running | ratio |", "|---|---|---|---|"]
    lines += [f"| {label} | {_ms(alone[key])} | {_ms(during[key])} | {_ratio(during[key], alone[key])} |"
              for label, key in rows]
    lines.append(f"| requests/s | {alone['requests_per_s']:.2f} | {during['requests_per_s']:.2f} | "
                 f"{_ratio(during['requests_per_s'], alone['requests_per_s'])} |")
    lines.append(f"| batch lines/s | - | {result['batch_lines_per_s']:.2f} | |")
    verdict = "met" if ratio is not None and ratio <= GOAL_TTFT_RATIO else "not met"
    lines += ["", f"Goal: interactive TTFT p50 within {GOAL_TTFT_RATIO}x while the batch runs: "
                  f"{'-' if ratio is None else f'{ratio:.2f}x'} ({verdict})."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests.batch_latency", description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=4000, help="lines of the batch (default 4000)")
    parser.add_argument("--batch-max-tokens", type=int, default=64, help="output tokens of each batch line")
    parser.add_argument("--concurrency", type=int, default=4, help="interactive streaming clients (default 4)")
    parser.add_argument("--requests", type=int, default=160, help="interactive requests per phase (default 160)")
    parser.add_argument("--input-words", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="results/batch")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
