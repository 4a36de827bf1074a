"""The Grafana dashboard's key panels drawn as PNGs from a real Prometheus (Grafana is not needed).

    python -m loadtests.dashboard_plots http://127.0.0.1:9090 --since 15m --out docs/img
    python -m loadtests.dashboard_plots http://prom:9090 --start 1718000000 --end 1718000900 --model 'demo-chat.*'

The queries are the dashboard's own (helm/serving/files/dashboards/serving.json, found by panel title),
run with /api/v1/query_range after the same variable substitution Grafana does ($model, $__rate_interval,
$__interval, ...), so a PNG shows what the panel shows. tests/integration/test_dashboard.py runs every
panel query against a Prometheus that scrapes the real platform and calls draw() at its end.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "helm" / "serving" / "files" / "dashboards" / "serving.json"

# PNG name -> dashboard panel titles drawn side by side
KEY_PANELS: dict[str, tuple[str, ...]] = {
    "requests": ("Requests/s per model", "Error ratio per model"),
    "ttft": ("Time to first token p50/p95/p99 (gateway)", "Time to first token p50/p95/p99 (vLLM engines)"),
    "tokens": ("Tokens/s per model (gateway)",),
    "engines": ("KV cache use per replica", "Queue depth per replica", "Running requests per replica"),
    "cache": ("Response cache hit ratio per model", "Cache lookups/s by result", "Prefix cache hit ratio (vLLM)"),
}
_UNITS = {"s": "seconds", "reqps": "requests/s", "percentunit": "%", "short": ""}


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that queries (rows, nested in collapsed rows or not, are left out)."""
    out = []
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            out.extend(p for p in panel.get("panels", []) if p.get("type") != "row")
        else:
            out.append(panel)
    return out


def panel(dashboard: dict[str, Any], title: str) -> dict[str, Any]:
    for p in panels(dashboard):
        if p["title"] == title:
            return p
    raise KeyError(f"the dashboard has no panel titled {title!r}")


def substitute(expr: str, *, model: str = ".*", rate_interval: str = "30s", interval: str = "15s",
               range_: str = "1h") -> str:
    """Grafana's variables as Grafana fills them in (the model variable's "All" is the regex .*)."""
    values = {"model": model, "__rate_interval": rate_interval, "__interval": interval, "__range": range_,
              "__interval_ms": str(_seconds(interval) * 1000), "__range_s": str(_seconds(range_)),
              "datasource": "prometheus"}

    def one(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")
        return values[name]

    # longest names first: $__rate_interval before $__range, $__interval_ms before $__interval
    return re.sub(r"\$\{(\w+)\}|\$(__rate_interval|__interval_ms|__interval|__range_s|__range|model|datasource)\b",
                  one, expr)


def _seconds(duration: str) -> int:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    total = 0.0
    for number, unit in re.findall(r"(\d+)(ms|s|m|h|d)", duration):
        total += int(number) * units[unit]
    return max(1, int(total))


def legend(fmt: str, labels: dict[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt or "")
    text = " ".join(text.split()) or ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"
    return " " + text if text.startswith("_") else text  # matplotlib's legend drops labels starting with _


def query_range(base: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    response = httpx.get(f"{base.rstrip('/')}/api/v1/query_range",
                         params={"query": expr, "start": start, "end": end, "step": step}, timeout=30)
    body = response.json()
    if body.get("status") != "success":
        raise RuntimeError(f"query_range failed for {expr!r}: {body.get('error', body)}")
    return body["data"]["result"]


def panel_series(base: str, p: dict[str, Any], start: float, end: float, step: float,
                 **variables: str) -> list[tuple[str, list[float], list[float]]]:
    """(legend, timestamps, values) of every series of every target of a panel."""
    series = []
    for target in p["targets"]:
        expr = substitute(target["expr"], **variables)
        for result in query_range(base, expr, start, end, step):
            times = [float(t) for t, _ in result["values"]]
            values = [float(v) for _, v in result["values"]]
            series.append((legend(target.get("legendFormat", ""), result["metric"]), times, values))
    return series


def draw(base: str, start: float, end: float, out_dir: str | Path, *, step: float | None = None,
         rate_interval: str | None = None, model: str = ".*", dashboard: dict[str, Any] | None = None,
         key_panels: dict[str, tuple[str, ...]] = KEY_PANELS) -> list[Path]:
    """One PNG per KEY_PANELS entry in out_dir, from Prometheus at base between start and end (unix s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    dashboard = dashboard or load_dashboard()
    step = step or max(1.0, (end - start) / 300)
    rate_interval = rate_interval or f"{max(60, int(4 * step))}s"
    variables = {"model": model, "rate_interval": rate_interval, "interval": f"{int(step)}s",
                 "range_": f"{max(1, int(end - start))}s"}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, titles in key_panels.items():
        fig, axes = plt.subplots(1, len(titles), figsize=(6.4 * len(titles), 4.2), squeeze=False)
        for ax, title in zip(axes[0], titles, strict=True):
            p = panel(dashboard, title)
            unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
            series = panel_series(base, p, start, end, step, **variables)
            for label, times, values in series:
                ax.plot([datetime.fromtimestamp(t) for t in times], values, label=label, linewidth=1.4)
            if not series:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="red")
            ax.set_title(title, fontsize=10)
            ax.set_ylabel(_UNITS.get(unit, unit))
            if unit == "percentunit":
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:.0f}%"))
            ax.set_ylim(bottom=0)
            finite = [v for _, _, values in series for v in values if math.isfinite(v)]
            if unit == "percentunit" or (finite and max(finite) == 0):
                ax.set_ylim(top=1.05 if unit == "percentunit" else 1)
            ax.set_xlim(datetime.fromtimestamp(start), datetime.fromtimestamp(end))
            ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
            ax.tick_params(axis="x", labelrotation=30, labelsize=8)
            ax.grid(True, alpha=0.3)
            if series:
                ax.legend(fontsize=7, loc="upper left", ncol=2 if len(series) > 6 else 1)
        fig.suptitle(f"{dashboard['title']}: {', '.join(titles)}  [rate window {rate_interval}]", fontsize=9,
                     color="dimgray")
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prometheus", help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--since", default="1h", help="time range ending now (e.g. 15m, 2h); ignored with --start")
    parser.add_argument("--start", type=float, help="range start (unix seconds)")
    parser.add_argument("--end", type=float, help="range end (unix seconds, default now)")
    parser.add_argument("--step", type=float, help="resolution in seconds (default: range/300, at least 1)")
    parser.add_argument("--rate-interval", help="$__rate_interval (default: 4 steps, at least 60s)")
    parser.add_argument("--model", default=".*", help="regex for the $model variable (default: all models)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"), help="output directory")
    args = parser.parse_args(argv)
    end = args.end or time.time()
    start = args.start or end - _seconds(args.since)
    for path in draw(args.prometheus, start, end, args.out, step=args.step, rate_interval=args.rate_interval,
                     model=args.model):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
