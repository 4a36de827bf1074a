"""`serving compare` against the gateway on fake engines: report, plots, scores, errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from serving.compare import add_compare_parser, run_compare
from serving.engine.fake import FakeEngine
from tests.load.conftest import TEST_KEY


def fake_answer(prompt: str, n: int) -> str:
    return " ".join(FakeEngine._words(prompt, n))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="serving")
    add_compare_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["compare", *argv])


def prompt_file(path: Path) -> Path:
    lines = [
        {"id": "exact", "prompt": "first prompt", "max_tokens": 4, "reference": fake_answer("first prompt", 4)},
        {"id": "contains", "messages": [{"role": "user", "content": "second prompt"}], "max_tokens": 6,
         "reference": ["not there", fake_answer("second prompt", 6).split()[2]]},
        {"id": "miss", "prompt": "third | prompt\nwith a newline", "reference": "nothing like it"},
        {"id": "free", "prompt": "no reference here"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_compare_writes_report_with_scores_and_plots(fake_gateway, tmp_path, capsys):
    out = tmp_path / "report"
    args = parse(["--base-url", fake_gateway, "--models", "fake-a,fake-b", "--prompts",
                  str(prompt_file(tmp_path / "p.jsonl")), "--out", str(out), "--api-key", TEST_KEY,
                  "--max-tokens", "8"])
    assert run_compare(args) == 0
    printed = capsys.readouterr().out
    assert "fake-a: 4/4 ok" in printed and "exact 33%, contains 67%" in printed

    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["ok"] for r in rows)
    by = {(r["prompt_id"], r["model"]): r for r in rows}
    assert by[("exact", "fake-a")]["exact_match"] and by[("exact", "fake-a")]["output_tokens"] == 4
    assert by[("contains", "fake-b")]["contains"] and not by[("contains", "fake-b")]["exact_match"]
    assert by[("miss", "fake-a")]["contains"] is False and by[("free", "fake-a")]["exact_match"] is None
    assert by[("free", "fake-a")]["output_tokens"] == 8
    # fake-a waits 30 ms for its first token, fake-b 10 ms
    assert by[("free", "fake-a")]["ttft_s"] > by[("free", "fake-b")]["ttft_s"] > 0.005

    report = (out / "report.md").read_text()
    assert "| fake-a | 4 | 0 |" in report and "| fake-b | 4 | 0 |" in report
    assert "## Outputs side by side" in report and "| fake-a | fake-b |" in report
    assert "third \\| prompt<br>with a newline" in report  # table cells stay one line
    assert fake_answer("first prompt", 4) in report and "exact match" in report
    for name in ("latency.png", "ttft.png", "tokens_per_s.png", "output_tokens.png"):
        assert f"]({name})" in report
        with Image.open(out / name) as image:
            image.verify()
    assert (out / "summary.csv").read_text().startswith("model,requests,errors,")


def test_compare_reports_failing_models(fake_gateway, tmp_path):
    out = tmp_path / "report"
    args = parse(["--base-url", fake_gateway, "--models", "fake-a,fake-broken,fake-truncated,no-such-model",
                  "--prompts", str(prompt_file(tmp_path / "p.jsonl")), "--out", str(out), "--api-key", TEST_KEY,
                  "--concurrency", "4"])
    assert run_compare(args) == 1  # the report is written; the exit status says some requests failed
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    errors = {r["model"]: r["error"] for r in rows if not r["ok"]}
    assert set(errors) == {"fake-broken", "fake-truncated", "no-such-model"}
    assert errors["fake-broken"].startswith("error event")
    assert errors["fake-truncated"].startswith("truncated stream")
    assert errors["no-such-model"].startswith("HTTP 404")
    report = (out / "report.md").read_text()
    assert "## Errors" in report and "| fake-broken | 4 | 4 |" in report and "**error:**" in report


def test_compare_without_streaming_and_bad_input(fake_gateway, tmp_path, capsys):
    prompts = prompt_file(tmp_path / "p.jsonl")
    args = parse(["--base-url", fake_gateway, "--models", "fake-a", "--prompts", str(prompts), "--out",
                  str(tmp_path / "r"), "--api-key", TEST_KEY, "--no-stream", "--route", "completion"])
    assert run_compare(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "r" / "results.jsonl").read_text().splitlines()]
    assert all(r["ok"] and r["ttft_s"] is None and r["output_tokens"] for r in rows)
    assert not (tmp_path / "r" / "ttft.png").exists()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"no_prompt": 1}\n')
    assert run_compare(parse(["--base-url", fake_gateway, "--models", "fake-a", "--prompts", str(bad)])) == 2
    assert "needs `prompt`" in capsys.readouterr().err
