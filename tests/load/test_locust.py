"""The locust users, run headless for a few seconds by `python -m loadtests.run` against fake engines."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from tests.load.conftest import TEST_KEY, run_module

PLOTS = ("ttft.png", "itl.png", "latency.png", "throughput.png")


def stats(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    with (out / "locust_stats.csv").open() as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


def write_profile(path: Path, users: int, run_time: str, classes: list[str], **options: object) -> Path:
    lines = [f"users = {users}", f"spawn_rate = {users}", f'run_time = "{run_time}"', 'stop_timeout = "5s"',
             "user_classes = [" + ", ".join(f'"{c}"' for c in classes) + "]", "[options]"]
    lines += [f"{k} = {v!r}".replace("'", '"') for k, v in options.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def good_run(fake_gateway, tmp_path_factory) -> tuple[Path, "object"]:
    tmp = tmp_path_factory.mktemp("locust-good")
    profile = write_profile(tmp / "all.toml", 6, "6s",
                            ["ChatStreamUser", "ChatUser", "CompletionUser", "EmbeddingUser", "CacheMixUser",
                             "MultiModelUser"],
                            models="fake-a,fake-b", embedding_models="fake-embed", output_tokens=16, input_tokens=8)
    done = run_module(["loadtests.run", "--profile", str(profile), "--base-url", fake_gateway, "--out",
                       str(tmp / "out"), "--api-key", TEST_KEY])
    return tmp / "out", done


def test_llm_metrics_in_locust_stats(good_run):
    out, done = good_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = stats(out)
    for kind in ("chat-stream", "chat", "completion-stream", "multi-stream"):
        assert any(t == kind and int(r["Request Count"]) > 0 for (t, _), r in rows.items()), kind
    assert int(rows[("embedding", "fake-embed")]["Request Count"]) > 0
    assert int(rows[("", "Aggregated")]["Failure Count"]) == 0
    # fake-a: 30 ms to the first token, 4 ms between tokens, 16 tokens
    ttft = float(rows[("TTFT", "fake-a")]["Average Response Time"])
    assert 25 <= ttft <= 500, ttft
    itl = float(rows[("ITL", "fake-a")]["Average Response Time"])
    assert 2 <= itl <= 100, itl
    tpot = float(rows[("TPOT", "fake-a")]["Average Response Time"])
    assert 2 <= tpot <= 100, tpot
    tokens = rows[("TOKENS/S", "fake-a")]
    assert 16 < float(tokens["Average Response Time"]) < 1000  # 16 tokens in ~90 ms: ~180 tokens/s
    assert float(tokens["Average Content Size"]) == 16  # output tokens per request
    assert int(rows[("THROUGHPUT", "output tokens/s")]["Request Count"]) >= 4  # one a second
    assert float(rows[("THROUGHPUT", "output tokens/s")]["Average Response Time"]) > 50
    assert ("TTFT", "fake-b") in rows and ("TTFT", "fake-embed") not in rows


def test_cache_heavy_mix_reports_hits(good_run):
    out, _ = good_run
    with (out / "locust_llm_requests.csv").open() as f:
        cached = [r for r in csv.DictReader(f) if r["kind"].startswith("cache")]
    assert cached and all(r["ok"] == "1" for r in cached)
    if any(r["cache"] for r in cached):  # the server tells hits from misses: locust's stats do too
        rows = stats(out)
        assert any(t == "CACHE" and n.endswith(" hit") for t, n in rows)


def test_reports_written_and_plots_open(good_run):
    out, done = good_run
    html = (out / "report.html").read_text()
    assert "TTFT" in html and "ITL" in html
    with (out / "locust_stats_history.csv").open() as f:
        history = list(csv.DictReader(f))
    assert any(r["Type"] == "TTFT" for r in history)
    for name in PLOTS:
        with Image.open(out / name) as image:
            image.verify()
            assert image.size[0] >= 400
    with (out / "llm_summary.csv").open() as f:
        summary = {(r["kind"], r["model"]): r for r in csv.DictReader(f)}
    model, row = next((m, r) for (k, m), r in summary.items() if k == "chat-stream")
    # fake-a: 30 ms to the first token and 4 ms between tokens, fake-b 10 ms and 2 ms
    assert int(row["failures"]) == 0 and 8 <= float(row["ttft_ms_p50"]) <= 500
    assert 1.5 <= float(row["itl_ms_p50"]) <= 100 and float(row["output_tokens_per_s"]) > 0
    assert f"| chat-stream | {model} |" in done.stdout  # the summary table is printed


def test_failed_and_truncated_streams_and_bad_keys_are_failures(fake_gateway, tmp_path):
    # three users: fake-broken (error event mid-stream), fake-truncated (no finish_reason, no [DONE]),
    # fake-a with a key the gateway does not know
    profile = write_profile(tmp_path / "bad.toml", 3, "3s", ["ChatStreamUser"],
                            models="fake-broken,fake-truncated,fake-a", output_tokens=8)
    done = run_module(["loadtests.run", "--profile", str(profile), "--base-url", fake_gateway, "--out",
                       str(tmp_path / "out"), "--api-key", f"{TEST_KEY},{TEST_KEY},wrong-key-0123456789"])
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    rows = stats(tmp_path / "out")
    for model in ("fake-broken", "fake-truncated", "fake-a"):
        row = rows[("chat-stream", model)]
        assert int(row["Request Count"]) > 0 and row["Failure Count"] == row["Request Count"], model
        assert ("TTFT", model) not in rows  # no metrics from failed requests
    with (tmp_path / "out" / "locust_failures.csv").open() as f:
        errors = {r["Name"]: r["Error"] for r in csv.DictReader(f)}
    assert "error event" in errors["fake-broken"]
    assert "truncated stream" in errors["fake-truncated"]
    assert "401" in errors["fake-a"]


def test_two_runs_side_by_side(fake_gateway, tmp_path):
    """`loadtests.versus` on two real locust runs of the same profile: against fake-a (30 ms to the first
    token, 4 ms between tokens), then fake-b (10 ms, 2 ms) — as if against two servers."""
    for model in ("fake-a", "fake-b"):
        profile = write_profile(tmp_path / f"{model}.toml", 3, "4s", ["ChatStreamUser"], models=model,
                                output_tokens=16)
        done = run_module(["loadtests.run", "--profile", str(profile), "--base-url", fake_gateway, "--out",
                           str(tmp_path / model), "--api-key", TEST_KEY])
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = tmp_path / "versus"
    done = run_module(["loadtests.versus", f"slow={tmp_path / 'fake-a'}", f"fast={tmp_path / 'fake-b'}",
                       "--out", str(out)])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with (out / "versus.csv").open() as f:
        rows = {(r["kind"], r["run"]): r for r in csv.DictReader(f)}
    assert set(rows) == {("chat-stream", "slow"), ("chat-stream", "fast"), ("all", "slow"), ("all", "fast")}
    fast, slow = rows[("chat-stream", "fast")], rows[("chat-stream", "slow")]
    assert int(fast["failures"]) == int(slow["failures"]) == 0
    assert float(fast["vs_ttft_ms_p50"]) == pytest.approx(float(fast["ttft_ms_p50"]) - float(slow["ttft_ms_p50"]))
    assert float(fast["vs_ttft_ms_p50"]) < -10 and float(fast["vs_itl_ms_p50"]) < -1
    assert float(fast["vs_output_tokens_per_s"]) > 1.3  # closed-loop users: shorter answers, more of them
    assert slow["vs_ttft_ms_p50"] == ""  # the first run is the reference
    report = (out / "versus.md").read_text()
    assert "**fast / slow**" in report and "![ttft_cdf](ttft_cdf.png)" in report
    for name in ("ttft_cdf.png", "itl_cdf.png", "latency_cdf.png", "throughput.png"):
        with Image.open(out / name) as image:
            image.verify()
    assert run_module(["loadtests.versus", f"only={tmp_path / 'fake-a'}", "--out", str(out)]).returncode == 2
    empty = run_module(["loadtests.versus", f"a={tmp_path / 'fake-a'}", f"b={tmp_path}", "--out", str(out)])
    assert empty.returncode == 2 and "no samples" in empty.stderr


def test_multi_turn_conversations_resend_their_history(fake_gateway, tmp_path):
    """The multi-turn profile's user (loadtests/profiles/multi-turn.toml) for a few seconds: every turn after
    the first carries the earlier turns, answers included, and its rows stand apart from first turns."""
    profile = write_profile(tmp_path / "turns.toml", 2, "4s", ["MultiTurnChatUser"], models="fake-a",
                            output_tokens=4, input_tokens=20, turns=3)
    done = run_module(["loadtests.run", "--profile", str(profile), "--base-url", fake_gateway, "--out",
                       str(tmp_path / "out"), "--api-key", TEST_KEY])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = stats(tmp_path / "out")
    first, later = rows[("TTFT", "fake-a [turn 1]")], rows[("TTFT", "fake-a [turn 2+]")]
    assert int(first["Request Count"]) > 0 and int(later["Request Count"]) >= int(first["Request Count"])
    with (tmp_path / "out" / "locust_llm_requests.csv").open() as f:
        prompts = [int(r["prompt_tokens"]) for r in csv.DictReader(f) if r["kind"] == "multi-turn" and r["ok"] == "1"]
    assert max(prompts) > min(prompts)  # later turns carry the history: longer prompts
