"""Locust runs side by side: the same profile against different servers (the platform and plain vLLM,
two configurations, two versions) in one report, each run measured against the first.

    python -m loadtests.versus platform=results/chat-platform vllm=results/chat-vllm --out results/versus

Each NAME=DIR is the `--out` directory of a `python -m loadtests.run` (its locust_llm_*.csv
samples). Model names may differ between runs (a platform's model and plain vLLM's served name):
rows are per request kind, all models together. Writes versus.md and versus.csv (per kind and run:
requests, failures, req/s, output tokens/s, TTFT, ITL and latency p50/p99; for every run after the
first, throughput as a ratio and latencies as a difference in ms to the first), and
ttft_cdf.png, itl_cdf.png, latency_cdf.png (the distributions overlaid) and throughput.png (output
tokens/s over time, overlaid). Exit status 0, or 2 on bad input.
"""

from __future__ import annotations

import argparse
import csv
import glob
import sys
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.report import GLUED_MS, _bucket_width, _floats, _fmt, _tokens_over_time, read_csvs, summarize

THROUGHPUT = (("requests_per_s", "req/s"), ("output_tokens_per_s", "out tok/s"))
LATENCY = (("ttft_ms_p50", "TTFT p50 ms"), ("ttft_ms_p99", "TTFT p99 ms"), ("itl_ms_p50", "ITL p50 ms"),
           ("itl_ms_p99", "ITL p99 ms"), ("latency_ms_p50", "latency p50 ms"), ("latency_ms_p99", "latency p99 ms"))
SMOOTHNESS = (("glued_pct", f"gaps < {GLUED_MS} ms %"),)  # compared in points


def load_run(directory: Path) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """A run's request and token-gap samples, models pooled per kind."""
    prefix = glob.escape(str(directory / "locust"))
    requests = read_csvs(f"{prefix}_llm_requests*.csv")
    itl = read_csvs(f"{prefix}_llm_itl*.csv")
    return ([{**r, "model": "all models"} for r in requests], [{**g, "model": "all models"} for g in itl])


def compare(runs: dict[str, tuple[list[dict[str, str]], list[dict[str, str]]]]) -> list[dict[str, Any]]:
    """One row per (kind, run), kinds every run has, and `all`; vs_* columns against the first run."""
    summaries = {name: {row["kind"]: row for row in summarize(*samples)} for name, samples in runs.items()}
    kinds = [k for k in next(iter(summaries.values())) if all(k in s for s in summaries.values())]
    first = next(iter(summaries))
    rows = []
    for kind in kinds:
        base = summaries[first][kind]
        for name, summary in summaries.items():
            row = {"kind": kind, "run": name, **{k: v for k, v in summary[kind].items() if k not in ("kind", "model")}}
            if name != first:
                for key, _ in THROUGHPUT:
                    row[f"vs_{key}"] = row[key] / base[key] if base[key] else None
                for key, _ in LATENCY + SMOOTHNESS:
                    known = row.get(key) is not None and base.get(key) is not None
                    row[f"vs_{key}"] = (row[key] - base[key]) if known else None
            rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], first: str) -> str:
    cols = [("kind", "kind"), ("run", "run"), ("requests", "requests"), ("failures", "failures"), *THROUGHPUT, *LATENCY,
            *SMOOTHNESS]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c[0])) for c in cols) + " |")
        if "vs_requests_per_s" in row:
            cells = ["", f"**{row['run']} / {first}**", "", ""]
            cells += [f"**{row[f'vs_{k}']:.3f}x**" if row[f"vs_{k}"] is not None else "–" for k, _ in THROUGHPUT]
            cells += [f"{row[f'vs_{k}']:+.1f} ms" if row[f"vs_{k}"] is not None else "–" for k, _ in LATENCY]
            cells += [f"{row[f'vs_{k}']:+.1f} points" if row[f"vs_{k}"] is not None else "–" for k, _ in SMOOTHNESS]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(runs: dict[str, tuple[list[dict[str, str]], list[dict[str, str]]]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, title, pick in (
            ("ttft_cdf.png", "Time to first token", lambda req, itl: _floats(req, "ttft_ms")),
            ("itl_cdf.png", "Inter-token latency", lambda req, itl: _floats(itl, "itl_ms")),
            ("latency_cdf.png", "Request latency", lambda req, itl: _floats(req, "latency_ms"))):
        fig, ax = plt.subplots(figsize=(8, 4))
        for run, (requests, itl) in runs.items():
            values = np.sort(pick([r for r in requests if r["ok"] == "1"], itl))
            if len(values):
                ax.plot(values, np.arange(1, len(values) + 1) / len(values) * 100, label=f"{run} (n={len(values)})")
        ax.set_title(f"{title}: share of samples at or below")
        ax.set_xlabel("ms")
        ax.set_ylabel("% of samples")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)
    fig, ax = plt.subplots(figsize=(8, 4))
    for run, (requests, _) in runs.items():
        ok = [r for r in requests if r["ok"] == "1"]
        if not ok:
            continue
        t0 = min(float(r["start"]) for r in requests)
        span = max(float(r["end"]) for r in requests) - t0
        width = _bucket_width(span)
        n = int(span // width) + 1
        ax.plot((np.arange(n) + 0.5) * width, _tokens_over_time(ok, t0, width, n), marker=".", label=run)
    ax.set_title("Output tokens/s over time")
    ax.set_xlabel("seconds since the run's start")
    ax.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=100)
    plt.close(fig)
    return written + [out / "throughput.png"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.versus", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=DIR",
                        help="a run's name and its loadtests.run --out directory")
    parser.add_argument("--out", type=Path, required=True, help="directory for versus.md, versus.csv and the plots")
    args = parser.parse_args(argv)
    runs: dict[str, tuple[list[dict[str, str]], list[dict[str, str]]]] = {}
    for item in args.runs:
        name, sep, directory = item.partition("=")
        if not sep or not name or name in runs:
            print(f"error: {item!r}: expected NAME=DIR with a name of its own", file=sys.stderr)
            return 2
        runs[name] = load_run(Path(directory))
        if not runs[name][0]:
            print(f"error: no samples in {directory} (locust_llm_requests*.csv of a loadtests.run)", file=sys.stderr)
            return 2
    if len(runs) < 2:
        print("error: give two runs or more", file=sys.stderr)
        return 2
    rows = compare(runs)
    if not rows:
        print("error: the runs have no request kind in common", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    first = next(iter(runs))
    text = markdown(rows, first)
    files = plots(runs, args.out)
    (args.out / "versus.md").write_text(
        f"# {' vs '.join(runs)}\n\n{text}\n\n" + "\n".join(f"![{f.stem}]({f.name})" for f in files) + "\n")
    with (args.out / "versus.csv").open("w", newline="") as f:
        fields = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(text)
    print(f"\nwrote {args.out}/: versus.md, versus.csv, " + ", ".join(f.name for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
