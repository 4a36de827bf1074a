"""Summary CSV and PNG plots from a locust run's LLM samples (no locust import: runs anywhere).

    python -m loadtests.report results/smoke/locust      # the --llm-samples prefix of a run

Reads PREFIX_llm_requests*.csv and PREFIX_llm_itl*.csv (one pair per locust process) and writes,
next to them: llm_summary.csv (per request kind and model, and all together), ttft.png and itl.png
(p50/p90/p99 over time), throughput.png (output tokens/s and requests/s over time, with the user
count from locust's PREFIX_stats_history.csv when present) and latency.png.
"""

from __future__ import annotations

import csv
import glob
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)
GLUED_MS = 0.5  # an inter-token gap shorter than this: the token reached the reader with the one before


def read_csvs(pattern: str) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for path in sorted(glob.glob(pattern)):
        with open(path, newline="") as f:
            rows.extend(csv.DictReader(f))
    return rows


def _floats(rows: list[dict[str, str]], key: str) -> np.ndarray:
    return np.array([float(r[key]) for r in rows if r.get(key) not in (None, "")], dtype=float)


def _pcts(values: np.ndarray) -> dict[str, float | None]:
    if not len(values):
        return {f"p{p}": None for p in PERCENTILES}
    return {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}


def summarize(requests: list[dict[str, str]], itl: list[dict[str, str]]) -> list[dict[str, Any]]:
    """One row per (kind, model) and a last row for everything."""
    groups: dict[tuple[str, str], list[dict[str, str]]] = {}
    for r in requests:
        groups.setdefault((r["kind"], r["model"]), []).append(r)
    keys = sorted(groups) + [("all", "all")]
    out = []
    for kind, model in keys:
        rows = requests if kind == "all" else groups[(kind, model)]
        ok = [r for r in rows if r["ok"] == "1"]
        if not rows:
            continue
        start, end = min(float(r["start"]) for r in rows), max(float(r["end"]) for r in rows)
        duration = max(end - start, 1e-9)
        tokens = float(_floats(ok, "output_tokens").sum())
        gaps = _floats([g for g in itl if kind == "all" or (g["kind"], g["model"]) == (kind, model)], "itl_ms")
        row: dict[str, Any] = {"kind": kind, "model": model, "requests": len(rows), "failures": len(rows) - len(ok),
                               "duration_s": round(duration, 3), "requests_per_s": len(ok) / duration,
                               "output_tokens": int(tokens), "output_tokens_per_s": tokens / duration}
        for name, values in (("ttft_ms", _floats(ok, "ttft_ms")), ("itl_ms", gaps), ("tpot_ms", _floats(ok, "tpot_ms")),
                             ("latency_ms", _floats(ok, "latency_ms"))):
            row.update({f"{name}_{k}": v for k, v in _pcts(values).items()})
        # how smoothly text reaches the reader: tokens that arrive glued to the one before come in bursts
        row["glued_pct"] = 100 * float((gaps < GLUED_MS).mean()) if len(gaps) else None
        tps = _floats(ok, "tokens_per_s")
        row["tokens_per_s_per_request_mean"] = float(tps.mean()) if len(tps) else None
        out.append(row)
    return out


def _bucket_width(duration: float) -> float:
    return float(max(1, math.ceil(duration / 60)))


def _over_time(times: np.ndarray, values: np.ndarray, t0: float,
               width: float) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    idx = ((times - t0) // width).astype(int)
    buckets = sorted(set(idx.tolist()))
    xs = np.array([(b + 0.5) * width for b in buckets])
    series = {p: np.array([np.percentile(values[idx == b], p) for b in buckets]) for p in PERCENTILES}
    return xs, series


def _tokens_over_time(ok: list[dict[str, str]], t0: float, width: float, n: int) -> np.ndarray:
    """Each request's output tokens spread evenly from its first token to its end."""
    out = np.zeros(n)
    for r in ok:
        tokens = float(r["output_tokens"] or 0)
        if not tokens:
            continue
        start = float(r["start"]) + (float(r["ttft_ms"]) / 1000 if r["ttft_ms"] else 0.0)
        end = max(float(r["end"]), start + 1e-6)
        for b in range(max(0, int((start - t0) // width)), min(n, int((end - t0) // width) + 1)):
            lo, hi = t0 + b * width, t0 + (b + 1) * width
            overlap = max(0.0, min(end, hi) - max(start, lo))
            out[b] += tokens * overlap / (end - start)
    return out / width


def _users_over_time(history: list[dict[str, str]], t0: float) -> tuple[np.ndarray, np.ndarray] | None:
    agg = [h for h in history if h.get("Name") == "Aggregated" and h.get("Timestamp")]
    if not agg:
        return None
    return (np.array([float(h["Timestamp"]) - t0 for h in agg]), np.array([float(h["User Count"]) for h in agg]))


def write_plots(requests: list[dict[str, str]], itl: list[dict[str, str]], out: Path,
                history: list[dict[str, str]] | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not requests:
        return []
    t0 = min(float(r["start"]) for r in requests)
    t1 = max(float(r["end"]) for r in requests)
    width = _bucket_width(t1 - t0)
    ok = [r for r in requests if r["ok"] == "1"]
    written = []

    def percentile_plot(name: str, title: str, times: np.ndarray, values: np.ndarray) -> None:
        fig, ax = plt.subplots(figsize=(8, 4))
        if len(values):
            xs, series = _over_time(times, values, t0, width)
            for p, ys in series.items():
                ax.plot(xs, ys, marker=".", label=f"p{p}")
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{title} (per {width:.0f} s)")
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)

    with_ttft = [r for r in ok if r["ttft_ms"]]
    percentile_plot("ttft.png", "Time to first token",
                    np.array([float(r["start"]) + float(r["ttft_ms"]) / 1000 for r in with_ttft]),
                    _floats(with_ttft, "ttft_ms"))
    percentile_plot("itl.png", "Inter-token latency", _floats(itl, "time"), _floats(itl, "itl_ms"))
    percentile_plot("latency.png", "Request latency", _floats(ok, "end"), _floats(ok, "latency_ms"))

    n = int((t1 - t0) // width) + 1
    xs = (np.arange(n) + 0.5) * width
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(xs, _tokens_over_time(ok, t0, width, n), marker=".", color="tab:blue", label="output tokens/s")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3)
    right = ax.twinx()
    done = np.bincount(((_floats(ok, "end") - t0) // width).astype(int), minlength=n)[:n] / width
    failed = np.bincount(((_floats([r for r in requests if r["ok"] != "1"], "end") - t0) // width).astype(int),
                         minlength=n)[:n] / width
    right.plot(xs, done, color="tab:green", marker=".", label="requests/s")
    if failed.any():
        right.plot(xs, failed, color="tab:red", marker="x", label="failures/s")
    users = _users_over_time(history or [], t0)
    if users is not None:
        right.step(users[0], users[1], where="post", color="tab:gray", alpha=0.6, label="users")
    right.set_ylabel("requests/s, users")
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left")
    ax.set_title(f"Throughput (per {width:.0f} s)")
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=100)
    plt.close(fig)
    written.append(out / "throughput.png")
    return written


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def markdown_table(summary: list[dict[str, Any]]) -> str:
    cols = [("kind", "kind"), ("model", "model"), ("requests", "requests"), ("failures", "failures"),
            ("requests_per_s", "req/s"), ("output_tokens_per_s", "out tok/s"), ("ttft_ms_p50", "TTFT p50 ms"),
            ("ttft_ms_p99", "TTFT p99 ms"), ("itl_ms_p50", "ITL p50 ms"), ("itl_ms_p99", "ITL p99 ms"),
            ("glued_pct", f"gaps < {GLUED_MS} ms %"), ("tpot_ms_p50", "TPOT p50 ms"),
            ("latency_ms_p50", "latency p50 ms"),
            ("latency_ms_p99", "latency p99 ms")]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(row[c[0]]) for c in cols) + " |" for row in summary]
    return "\n".join(lines)


def build(prefix: str | Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """Summary rows and the files written, from the samples under `prefix`."""
    prefix = str(prefix)
    out = Path(prefix).parent
    requests = read_csvs(f"{glob.escape(prefix)}_llm_requests*.csv")
    itl = read_csvs(f"{glob.escape(prefix)}_llm_itl*.csv")
    history = read_csvs(f"{glob.escape(prefix)}_stats_history.csv")
    summary = summarize(requests, itl)
    files = []
    if summary:
        with (out / "llm_summary.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(summary[0]))
            writer.writeheader()
            writer.writerows(summary)
        files.append(out / "llm_summary.csv")
        (out / "llm_summary.md").write_text(markdown_table(summary) + "\n")
        files.append(out / "llm_summary.md")
    files += write_plots(requests, itl, out, history)
    return summary, files


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__)
        return 2
    summary, files = build(args[0])
    if not summary:
        print(f"no samples under {args[0]}_llm_requests*.csv", file=sys.stderr)
        return 1
    print(markdown_table(summary))
    print("\n".join(f"wrote {f}" for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
