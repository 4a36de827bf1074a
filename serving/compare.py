"""`serving compare`: the same prompts to several served models, and a Markdown report with plots.

Works against any OpenAI-compatible base URL (the platform, plain vLLM, a hosted API). Each prompt
goes to every model in turn (streamed chat by default, so time to first token is measured); the
report has per-model latency, TTFT, output tokens/s and output lengths (table and PNG plots), the
outputs side by side per prompt, and — when the prompt file gives a `reference` — exact-match and
contains scores.

The prompt file is JSONL, one request per line: `{"prompt": "..."}` or `{"messages": [...]}`, with
optional `id`, `max_tokens` and `reference` (a string or a list of accepted strings).

This module also holds the measuring SSE parser that the load generators in loadtests/ share, so a
stream counts as a success by one rule everywhere: it must end with `data: [DONE]`, carry a
`finish_reason`, and hold no error event. It imports nothing heavy at module level (the CLI imports
it to build its parser); matplotlib is imported only to draw.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

# ------------------------------------------------------------------------------------ measuring


@dataclass
class Measured:
    """One request as the client saw it. Times in seconds (perf_counter based)."""

    ok: bool = False
    error: str | None = None
    status: int | None = None
    latency: float | None = None  # request sent -> last byte
    ttft: float | None = None  # request sent -> first chunk carrying text (streams only)
    itl: list[float] = field(default_factory=list)  # gaps between chunks carrying text
    output_tokens: int = 0  # usage.completion_tokens, else the number of chunks carrying text
    prompt_tokens: int | None = None
    text: str = ""
    finish_reason: str | None = None
    cache: str | None = None  # the x-cache response header, when the server sends one

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (vLLM's benchmark definition)."""
        if self.ttft is None or self.latency is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    @property
    def tokens_per_s(self) -> float | None:
        if not self.latency or not self.output_tokens:
            return None
        return self.output_tokens / self.latency


class StreamMeter:
    """Feeds on SSE lines as they arrive and measures one streamed chat or text completion."""

    def __init__(self, start: float):
        self.start = start
        self.result = Measured()
        self._last: float | None = None
        self._chunks = 0
        self._usage: int | None = None
        self._done = False

    def feed(self, line: str | bytes, now: float) -> None:
        if isinstance(line, bytes):
            line = line.decode("utf-8", "replace")
        line = line.strip()
        if not line.startswith("data:"):
            return  # blank separators, comments, `event:` lines
        payload = line[5:].strip()
        if payload == "[DONE]":
            self._done = True
            return
        try:
            event = json.loads(payload)
        except json.JSONDecodeError:
            self.result.error = self.result.error or f"malformed SSE event: {payload[:80]!r}"
            return
        if not isinstance(event, dict):
            return
        if event.get("error") is not None:
            self.result.error = self.result.error or f"error event: {_error_message(event)}"
            return
        for choice in event.get("choices") or ():
            piece = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
            if piece:
                self._token(piece, now)
            if choice.get("finish_reason") is not None:
                self.result.finish_reason = choice["finish_reason"]
        usage = event.get("usage")
        if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
            self._usage = int(usage["completion_tokens"])
            self.result.prompt_tokens = usage.get("prompt_tokens")

    def _token(self, piece: str, now: float) -> None:
        if self._last is None:
            self.result.ttft = now - self.start
        else:
            self.result.itl.append(now - self._last)
        self._last = now
        self._chunks += 1
        self.result.text += piece

    @property
    def chunks(self) -> int:
        """Chunks carrying text so far (a running token count before the final usage arrives)."""
        return self._chunks

    def finish(self, now: float) -> Measured:
        """The measurement; `ok` only for a complete stream: [DONE], a finish_reason, no error event."""
        result = self.result
        result.latency = now - self.start
        result.output_tokens = self._usage if self._usage is not None else self._chunks
        if result.error is None and not self._done:
            result.error = "truncated stream: no [DONE]"
        if result.error is None and result.finish_reason is None:
            result.error = "truncated stream: no finish_reason"
        result.ok = result.error is None
        return result


def measure_body(body: bytes | str, status: int, start: float, now: float) -> Measured:
    """Measure a non-streamed answer (chat, completion or embeddings)."""
    result = Measured(status=status, latency=now - start)
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        result.error = f"HTTP {status}: body is not JSON"
        return result
    if status != 200 or (isinstance(payload, dict) and payload.get("error") is not None):
        result.error = f"HTTP {status}: {_error_message(payload)}"
        return result
    usage = payload.get("usage") or {}
    result.prompt_tokens = usage.get("prompt_tokens")
    if payload.get("object") == "list":  # embeddings
        result.ok = bool(payload.get("data"))
        result.error = None if result.ok else "no embeddings in the answer"
        return result
    choices = payload.get("choices") or []
    if not choices or choices[0].get("finish_reason") is None:
        result.error = "no choices" if not choices else "missing finish_reason"
        return result
    first = choices[0]
    result.text = (first.get("message") or {}).get("content") or first.get("text") or ""
    result.finish_reason = first["finish_reason"]
    result.output_tokens = int(usage.get("completion_tokens") or 0)
    result.ok = True
    return result


def _error_message(payload: Any) -> str:
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict):
            return str(error.get("message", error))[:200]
        if error is not None:
            return str(error)[:200]
        if "detail" in payload:
            return str(payload["detail"])[:200]
    return str(payload)[:200]


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def measure(client: Any, url: str, body: dict[str, Any], headers: dict[str, str]) -> Measured:
    """Send one request with an httpx.AsyncClient and measure it (streamed when body["stream"])."""
    start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            cache = response.headers.get("x-cache")
            if not body.get("stream") or response.status_code != 200 or \
                    not response.headers.get("content-type", "").startswith("text/event-stream"):
                raw = await response.aread()
                result = measure_body(raw, response.status_code, start, time.perf_counter())
            else:
                meter = StreamMeter(start)
                async for line in response.aiter_lines():
                    meter.feed(line, time.perf_counter())
                result = meter.finish(time.perf_counter())
            result.status, result.cache = response.status_code, cache
            return result
    except Exception as exc:  # noqa: BLE001 - any transport failure is this request's failure
        return Measured(error=f"{type(exc).__name__}: {exc}"[:200], latency=time.perf_counter() - start)


# ------------------------------------------------------------------------------------ prompts


def load_prompts(path: str | Path) -> list[dict[str, Any]]:
    """One request per JSONL line: `prompt` (str) or `messages` (list); optional id, max_tokens, reference."""
    prompts: list[dict[str, Any]] = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON: {exc}") from exc
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict) or not (isinstance(item.get("prompt"), str)
                                              or isinstance(item.get("messages"), list)):
            raise ValueError(f"{path}:{number}: needs `prompt` (a string) or `messages` (a list)")
        item.setdefault("id", str(len(prompts) + 1))
        prompts.append(item)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def prompt_text(item: dict[str, Any]) -> str:
    if isinstance(item.get("prompt"), str):
        return item["prompt"]
    return "\n".join(str(m.get("content", "")) for m in item["messages"] if isinstance(m, dict))


def chat_messages(item: dict[str, Any]) -> list[dict[str, Any]]:
    return item["messages"] if isinstance(item.get("messages"), list) else [{"role": "user", "content": item["prompt"]}]


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def scores(output: str, reference: Any) -> tuple[bool, bool]:
    """(exact match, contains) against a reference string or any of a list of them, ignoring case and spacing."""
    refs = [reference] if isinstance(reference, str) else [str(r) for r in reference or ()]
    out = _normalize(output)
    return any(out == _normalize(r) for r in refs), any(_normalize(r) in out for r in refs)


# ------------------------------------------------------------------------------------ running


@dataclass
class CompareOptions:
    base_url: str
    models: list[str]
    prompts: list[dict[str, Any]]
    api_key: str | None = None
    max_tokens: int = 64
    temperature: float | None = 0.0
    stream: bool = True
    route: str = "chat"  # chat | completion
    concurrency: int = 1
    timeout_s: float = 120.0
    extra: dict[str, Any] = field(default_factory=dict)


def request_body(opts: CompareOptions, item: dict[str, Any], model: str) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"model": model, "max_tokens": item.get("max_tokens", opts.max_tokens), **opts.extra}
    if opts.temperature is not None:
        body["temperature"] = opts.temperature
    if opts.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if opts.route == "completion":
        return "/completions", {**body, "prompt": prompt_text(item)}
    return "/chat/completions", {**body, "messages": chat_messages(item)}


async def run_prompts(opts: CompareOptions) -> list[dict[str, Any]]:
    """Every prompt to every model; rows in prompt order, then model order."""
    import httpx

    base = opts.base_url.rstrip("/")
    headers = auth_headers(opts.api_key)
    gate = asyncio.Semaphore(max(1, opts.concurrency))
    limits = httpx.Limits(max_connections=max(4, opts.concurrency * 2))
    async with httpx.AsyncClient(timeout=opts.timeout_s, limits=limits) as client:

        async def one(index: int, item: dict[str, Any], model: str) -> dict[str, Any]:
            path, body = request_body(opts, item, model)
            async with gate:
                result = await measure(client, base + path, body, headers)
            return _row(index, item, model, result)

        jobs = [one(i, item, model) for i, item in enumerate(opts.prompts) for model in opts.models]
        return list(await asyncio.gather(*jobs))


def _row(index: int, item: dict[str, Any], model: str, result: Measured) -> dict[str, Any]:
    row = {"prompt_index": index, "prompt_id": item["id"], "model": model, "ok": result.ok, "error": result.error,
           "status": result.status, "latency_s": result.latency, "ttft_s": result.ttft,
           "output_tokens": result.output_tokens if result.ok else None,
           "tokens_per_s": result.tokens_per_s if result.ok else None, "finish_reason": result.finish_reason,
           "text": result.text, "exact_match": None, "contains": None}
    if "reference" in item and result.ok:
        row["exact_match"], row["contains"] = scores(result.text, item["reference"])
    return row


# ------------------------------------------------------------------------------------ report


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _column(rows: list[dict[str, Any]], key: str) -> list[float]:
    """The values of `key` in `rows`, those that are set."""
    return [r[key] for r in rows if r[key] is not None]


def summarize(rows: list[dict[str, Any]], models: list[str]) -> list[dict[str, Any]]:
    out = []
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        good = [r for r in mine if r["ok"]]
        lat, ttft, tps, toks = (_column(good, key) for key in ("latency_s", "ttft_s", "tokens_per_s", "output_tokens"))
        scored = [r for r in good if r["exact_match"] is not None]
        out.append({
            "model": model, "requests": len(mine), "errors": len(mine) - len(good),
            "latency_p50_s": _pct(lat, 50), "latency_p95_s": _pct(lat, 95),
            "ttft_p50_s": _pct(ttft, 50), "ttft_p95_s": _pct(ttft, 95),
            "tokens_per_s_mean": statistics.fmean(tps) if tps else None,
            "output_tokens_mean": statistics.fmean(toks) if toks else None,
            "output_chars_mean": statistics.fmean(len(r["text"]) for r in good) if good else None,
            "scored": len(scored),
            "exact_match": sum(r["exact_match"] for r in scored) / len(scored) if scored else None,
            "contains": sum(r["contains"] for r in scored) / len(scored) if scored else None,
        })
    return out


PLOTS = {  # file -> (row key, title, axis label, scale)
    "latency.png": ("latency_s", "Request latency", "ms", 1000.0),
    "ttft.png": ("ttft_s", "Time to first token", "ms", 1000.0),
    "tokens_per_s.png": ("tokens_per_s", "Output tokens/s per request", "tokens/s", 1.0),
    "output_tokens.png": ("output_tokens", "Output length", "tokens", 1.0),
}


def write_plots(rows: list[dict[str, Any]], models: list[str], out: Path) -> list[str]:
    """One box plot per metric, a box per model; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, (key, title, unit, scale) in PLOTS.items():
        data = [[r[key] * scale for r in rows if r["model"] == m and r["ok"] and r[key] is not None] for m in models]
        if not any(data):
            continue
        fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(models) + 2), 4))
        ax.boxplot([d or [float("nan")] for d in data], showmeans=True)
        ax.set_xticks(range(1, len(models) + 1), models, rotation=15 if len(models) > 3 else 0)
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(name)
    return written


def _fmt(value: Any, scale: float = 1.0, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and scale != 1.0:
        value *= scale
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _cell(text: str, limit: int) -> str:
    text = text if len(text) <= limit else text[:limit] + "…"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or " "


def render_markdown(opts: CompareOptions, rows: list[dict[str, Any]], summary: list[dict[str, Any]],
                    plots: Iterable[str], max_chars: int = 400) -> str:
    has_refs = any(s["scored"] for s in summary)
    lines = ["# Model comparison", "",
             f"{len(opts.prompts)} prompt(s) × {len(opts.models)} model(s) against `{opts.base_url}`, "
             f"route {opts.route}, {'streamed' if opts.stream else 'not streamed'}, max_tokens {opts.max_tokens}, "
             f"temperature {opts.temperature if opts.temperature is not None else 'server default'}, "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}.", "",
             "| model | requests | errors | latency p50 ms | latency p95 ms | TTFT p50 ms | TTFT p95 ms "
             "| tokens/s (mean) | output tokens (mean) | output chars (mean) |"
             + (" exact match | contains |" if has_refs else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if has_refs else "")]
    for s in summary:
        line = (f"| {s['model']} | {s['requests']} | {s['errors']} | {_fmt(s['latency_p50_s'], 1000)} | "
                f"{_fmt(s['latency_p95_s'], 1000)} | {_fmt(s['ttft_p50_s'], 1000)} | {_fmt(s['ttft_p95_s'], 1000)} | "
                f"{_fmt(s['tokens_per_s_mean'])} | {_fmt(s['output_tokens_mean'])} | {_fmt(s['output_chars_mean'])} |")
        if has_refs:
            line += f" {_fmt(s['exact_match'], 100, 0)}% | {_fmt(s['contains'], 100, 0)}% |"
        lines.append(line)
    if has_refs:
        lines += ["", "Scores count prompts with a `reference`, ignoring case and spacing: *exact match* when the "
                      "output equals a reference, *contains* when a reference appears in it."]
    lines += [""] + [f"![{p[:-4]}]({p})" for p in plots]
    errors = [r for r in rows if not r["ok"]]
    if errors:
        lines += ["", "## Errors", "", "| prompt | model | error |", "|---|---|---|"]
        lines += [f"| {r['prompt_id']} | {r['model']} | {_cell(str(r['error']), 200)} |" for r in errors]
    lines += ["", "## Outputs side by side", ""]
    by_prompt: dict[int, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_index"], {})[r["model"]] = r
    for index, item in enumerate(opts.prompts):
        lines += [f"### Prompt {item['id']}", "", "> " + _cell(prompt_text(item), max_chars), ""]
        if "reference" in item:
            ref = item["reference"]
            lines += ["Reference: " + _cell(ref if isinstance(ref, str) else " / ".join(map(str, ref)), max_chars), ""]
        lines += ["| " + " | ".join(opts.models) + " |", "|" + "---|" * len(opts.models)]
        cells, facts = [], []
        for model in opts.models:
            r = by_prompt[index][model]
            cells.append(_cell(r["text"], max_chars) if r["ok"] else f"**error:** {_cell(str(r['error']), 200)}")
            fact = f"{_fmt(r['output_tokens'])} tok, {_fmt(r['latency_s'], 1000, 0)} ms" if r["ok"] else "–"
            if r["exact_match"] is not None:
                fact += ", " + ("exact" if r["exact_match"] else "contains" if r["contains"] else "no match")
            facts.append(fact)
        lines += ["| " + " | ".join(cells) + " |", "| " + " | ".join(facts) + " |", ""]
    return "\n".join(lines)


def write_report(opts: CompareOptions, rows: list[dict[str, Any]], out: Path, max_chars: int = 400) -> Path:
    """report.md, results.jsonl, summary.csv and the PNG plots in `out`; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows, opts.models)
    plots = write_plots(rows, opts.models, out)
    with (out / "results.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    report = out / "report.md"
    report.write_text(render_markdown(opts, rows, summary, plots, max_chars))
    return report


def compare(opts: CompareOptions, out: Path, max_chars: int = 400) -> tuple[Path, list[dict[str, Any]]]:
    rows = asyncio.run(run_prompts(opts))
    return write_report(opts, rows, out, max_chars), rows


# ------------------------------------------------------------------------------------ CLI


def add_compare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`serving compare ...` on the CLI's subparsers."""
    p = subparsers.add_parser("compare", help="send the same prompts to several models and write a report",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--models", required=True, help="comma-separated model names")
    p.add_argument("--prompts", required=True, type=Path, help="JSONL: prompt or messages, optional reference")
    p.add_argument("--out", type=Path, default=Path("compare-report"), help="report directory (default: %(default)s)")
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer (default: $OPENAI_API_KEY)")
    p.add_argument("--max-tokens", type=int, default=64, help="per prompt unless the line sets max_tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="default 0 (comparable outputs); <0: server default")
    p.add_argument("--route", choices=["chat", "completion"], default="chat")
    p.add_argument("--no-stream", dest="stream", action="store_false", help="no streaming (no TTFT)")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight at once (default 1: no interference)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--max-chars", type=int, default=400, help="output characters shown per cell")
    return p


def run_compare(args: argparse.Namespace) -> int:
    """0: every request succeeded; 1: the report was written but some requests failed; 2: bad input."""
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        prompts = load_prompts(args.prompts)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not models:
        print("error: --models names no model", file=sys.stderr)
        return 2
    opts = CompareOptions(base_url=args.base_url, models=models, prompts=prompts,
                          api_key=args.api_key or os.environ.get("OPENAI_API_KEY"), max_tokens=args.max_tokens,
                          temperature=None if args.temperature < 0 else args.temperature, stream=args.stream,
                          route=args.route, concurrency=args.concurrency, timeout_s=args.timeout)
    report, rows = compare(opts, args.out, args.max_chars)
    for s in summarize(rows, models):
        print(f"{s['model']}: {s['requests'] - s['errors']}/{s['requests']} ok, latency p50 "
              f"{_fmt(s['latency_p50_s'], 1000)} ms, TTFT p50 {_fmt(s['ttft_p50_s'], 1000)} ms, "
              f"{_fmt(s['tokens_per_s_mean'])} tokens/s"
              + (f", exact {_fmt(s['exact_match'], 100, 0)}%, contains {_fmt(s['contains'], 100, 0)}%"
                 if s["scored"] else ""))
    print(f"report: {report}")
    return 0 if all(r["ok"] for r in rows) else 1
