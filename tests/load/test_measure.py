"""The measuring pieces on their own: SSE meter, body checks, scores, prompts, reports, benchmark table."""

from __future__ import annotations

import json

import pytest

from loadtests import bench, report
from loadtests.workload import PromptSource, generation_body
from serving.compare import StreamMeter, load_prompts, measure_body, scores


def chunk(text: str | None = None, finish: str | None = None, usage: int | None = None) -> str:
    choices = ([] if text is None and finish is None
               else [{"index": 0, "delta": {"content": text}, "finish_reason": finish}])
    event = {"choices": choices}
    if usage is not None:
        event["usage"] = {"prompt_tokens": 3, "completion_tokens": usage}
    return "data: " + json.dumps(event)


def test_stream_meter_times_tokens_and_takes_usage():
    meter = StreamMeter(start=10.0)
    meter.feed(chunk(""), 10.010)  # the role chunk carries no text: not the first token
    meter.feed(chunk("a"), 10.020)
    meter.feed("", 10.020)
    meter.feed(b": keep-alive", 10.021)
    meter.feed(chunk(" b"), 10.025)
    meter.feed(chunk(" c", finish="length"), 10.035)
    meter.feed(chunk(usage=5), 10.036)
    meter.feed("data: [DONE]", 10.037)
    result = meter.finish(10.040)
    assert result.ok and result.error is None and result.text == "a b c"
    assert result.ttft == pytest.approx(0.020) and result.itl == pytest.approx([0.005, 0.010])
    assert result.output_tokens == 5 and result.prompt_tokens == 3  # usage wins over the chunk count
    assert result.latency == pytest.approx(0.040) and result.tpot == pytest.approx(0.005)
    assert result.tokens_per_s == pytest.approx(125)


@pytest.mark.parametrize("lines, error", [
    ([chunk("a"), chunk("b", finish="stop")], "truncated stream: no [DONE]"),
    ([chunk("a"), "data: [DONE]"], "truncated stream: no finish_reason"),
    ([chunk("a"), 'data: {"error": {"message": "engine failed", "code": 500}}', "data: [DONE]"],
     "error event: engine failed"),
    (["data: {not json", chunk("a", finish="stop"), "data: [DONE]"], "malformed SSE event"),
])
def test_incomplete_streams_fail(lines, error):
    meter = StreamMeter(start=0.0)
    for i, line in enumerate(lines):
        meter.feed(line, 0.01 * (i + 1))
    result = meter.finish(1.0)
    assert not result.ok and result.error.startswith(error)


def test_completion_stream_and_plain_bodies():
    meter = StreamMeter(start=0.0)
    meter.feed('data: {"choices": [{"index": 0, "text": "x", "finish_reason": "stop"}]}', 0.5)
    meter.feed("data: [DONE]", 0.6)
    assert meter.finish(0.6).ok and meter.result.output_tokens == 1  # no usage: chunks counted

    ok = measure_body(json.dumps({"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
                                  "usage": {"completion_tokens": 2, "prompt_tokens": 1}}), 200, 0.0, 0.5)
    assert ok.ok and ok.text == "hi" and ok.output_tokens == 2 and ok.ttft is None
    assert measure_body(json.dumps({"object": "list", "data": [{"embedding": [0.1]}]}), 200, 0, 1).ok
    error = measure_body(json.dumps({"error": {"message": "nope"}}), 429, 0.0, 0.1)
    assert not error.ok and error.error == "HTTP 429: nope"
    assert measure_body(json.dumps({"choices": [{"text": "x"}]}), 200, 0, 1).error == "missing finish_reason"
    assert measure_body("<html>", 502, 0, 1).error == "HTTP 502: body is not JSON"


def test_scores_ignore_case_and_spacing():
    assert scores("  Paris \n", "paris") == (True, True)
    assert scores("It is Paris.", ["Lyon", "paris"]) == (False, True)
    assert scores("Lyon", "Paris") == (False, False)


def test_prompts_from_file_and_generated(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n# a comment\n"plain string"\n'
                    '{"messages": [{"role": "user", "content": "b"}]}\n')
    items = load_prompts(path)
    assert [i["id"] for i in items] == ["1", "2", "3"] and items[1]["prompt"] == "plain string"
    body = generation_body(items[2], "m", chat=False, stream=True, max_tokens=5, ignore_eos=True)
    assert body == {"model": "m", "max_tokens": 5, "prompt": "b", "stream": True,
                    "stream_options": {"include_usage": True}, "ignore_eos": True}
    chat = generation_body({"prompt": "x", "max_tokens": 3}, "m", chat=True, stream=False, max_tokens=9,
                           temperature=0.0)
    assert chat == {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "x"}], "temperature": 0.0}

    generated = PromptSource(input_tokens=12, seed=1)
    first, second = generated.next(), generated.next()
    assert len(first["prompt"].split()) == 12 and first["prompt"] != second["prompt"]
    pool = PromptSource(input_tokens=4, pool=3, seed=0)
    assert len({pool.next()["prompt"] for _ in range(50)}) == 3
    from_file = PromptSource(path, seed=1)
    assert [from_file.next()["id"] for _ in range(3)] == ["2", "3", "1"]


def test_report_summary_from_samples(tmp_path):
    prefix = tmp_path / "run"
    rows = ["start,end,user,kind,model,ok,error,status,latency_ms,ttft_ms,tpot_ms,output_tokens,prompt_tokens,"
            "tokens_per_s,cache",
            "100.0,100.5,U,chat-stream,m,1,,200,500,100,10,41,5,82,",
            "100.2,101.2,U,chat-stream,m,1,,200,1000,300,17.5,41,5,41,",
            "101.0,101.1,U,chat-stream,m,0,boom,500,100,,,,,,"]
    (tmp_path / "run_llm_requests.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "run_llm_itl.csv").write_text("time,kind,model,itl_ms\n"
                                              "100.2,chat-stream,m,10\n100.3,chat-stream,m,20\n"
                                              "100.31,chat-stream,m,0.2\n")
    summary, files = report.build(prefix)
    row = summary[0]
    assert (row["kind"], row["model"], row["requests"], row["failures"]) == ("chat-stream", "m", 3, 1)
    assert row["duration_s"] == pytest.approx(1.2) and row["output_tokens"] == 82
    assert row["output_tokens_per_s"] == pytest.approx(82 / 1.2) and row["ttft_ms_p50"] == pytest.approx(200)
    assert row["itl_ms_p50"] == pytest.approx(10) and summary[-1]["kind"] == "all"
    assert row["glued_pct"] == pytest.approx(100 / 3)  # one gap of three under 0.5 ms: a token glued to the last
    assert {f.name for f in files} >= {"llm_summary.csv", "ttft.png", "itl.png", "throughput.png", "latency.png"}


def level(c: int, tps: float, ttft: float) -> bench.Level:
    return bench.Level(concurrency=c, requests=10, failures=0, duration_s=1.0, requests_per_s=tps / 64,
                       output_tokens_per_s=tps, ttft_p50_ms=ttft, ttft_p95_ms=ttft * 2, itl_p50_ms=2.0,
                       itl_p95_ms=4.0, tpot_p50_ms=2.0, latency_p50_ms=100.0)


def test_bench_table_and_goals():
    base = {1: level(1, 300, 13.0), 16: level(16, 1900, 50.0), 64: level(64, 2000, 200.0)}
    ours = {1: level(1, 295, 15.5), 16: level(16, 1850, 52.0), 64: level(64, 1700, 210.0)}
    # CPU seconds in the level's 1 s: 2,000 and 1,700 tokens
    base[64].cpu_s = {"vLLM API server": 0.2, "engine core": 1.0, "load generator": 0.1}
    ours[64].cpu_s = {"gateway": 0.1, "model replica": 0.2, "ray other": 0.05, "proxy": 0.01, "other": 0.02,
                      "engine core": 1.0, "load generator": 0.1}
    checked = dict(bench.goals(base, ours))
    assert list(checked.values()) == [True, False, False, True]
    assert "c=64: output throughput 0.850x" in list(checked)[1]
    # 0.38 s / 1,700 tokens against 0.2 s / 2,000 tokens: engine and load generator left out
    assert "c=64: serving layer CPU 0.224 vs 0.100 ms per output token, 2.24x" in list(checked)[2]
    text = bench.table("plain vLLM", base, ours)
    assert "| 16 | **platform / plain vLLM** | **0.974x** | **0.974x** | +2.0 ms |" in text
    merged = bench.median_levels([base, ours, base])
    assert merged[1].ttft_p50_ms == 13.0 and merged[1].requests == 30


def test_bench_load_generator_on_the_fake_gateway(fake_gateway):
    from tests.load.conftest import FAKE_A, TEST_KEY

    payloads = bench.bodies("fake-a", 0, 12, input_words=8, max_tokens=10)
    assert payloads == bench.bodies("fake-a", 0, 12, input_words=8, max_tokens=10)  # same for every server
    results, duration = bench._loop_runner()(bench.drive(fake_gateway, payloads, 4, TEST_KEY))
    lv = bench.summarize(4, results, duration)
    assert lv.failures == 0 and lv.requests == 12
    assert lv.output_tokens_per_s == pytest.approx(120 / duration)
    assert FAKE_A["ttft_s"] * 1000 <= lv.ttft_p50_ms < 300
    assert FAKE_A["itl_s"] * 1000 * 0.8 <= lv.itl_p50_ms < 100
    assert lv.glued_pct is not None and lv.glued_pct < 50  # the fake engine spaces its tokens by itl_s
    bad, _ = bench._loop_runner()(bench.drive(fake_gateway, payloads[:2], 2, "wrong-key-0123456789"))
    assert [r.error.startswith("HTTP 401") for r in bad] == [True, True]


def test_benchmark_server_process_starts_and_stops(tmp_path):
    from loadtests import servers

    server = servers.fake_gateway(servers.free_port(), tmp_path / "gw.log", ttft_s=0.0, itl_s=0.0)
    with server:
        assert server.startup_s is not None and servers.session_pids(server.proc.pid)
        payloads = bench.bodies(servers.FAKE_MODEL, 0, 4, input_words=4, max_tokens=4)
        results, _ = bench._loop_runner()(bench.drive(server.base_url, payloads, 2, servers.BENCH_KEY))
        assert all(r.ok and r.output_tokens == 4 for r in results)
    assert server.proc.poll() is not None and not servers.session_pids(server.proc.pid)


def test_bench_serves_the_model_of_a_model_file_to_both_servers(tmp_path):
    """--model: one model in the configuration's format (what the GPU comparison uses), the same
    engine arguments for plain vLLM (its argv) and the platform (its configuration file)."""
    import yaml

    from serving.demo import build_shaped_model
    from serving.engine.vllm_args import serve_argv

    shaped = build_shaped_model(tmp_path / "llama-8b-shape", "llama-8b")
    entry = yaml.safe_load(open("loadtests/models/llama-8b-shape.yaml"))
    entry["source"] = str(shaped)
    model_file = tmp_path / "model.yaml"
    model_file.write_text(yaml.safe_dump({"models": [entry]}))  # a whole configuration works too
    args = bench.parse_args(["--model", str(model_file), "--out", str(tmp_path / "out")])
    factories, name = bench.server_factories(args, tmp_path)
    assert name == "llama-8b-shape" and [label for label, _ in factories] == ["plain vLLM", "platform"]
    platform = yaml.safe_load((tmp_path / "platform.yaml").read_text())["models"][0]
    assert platform["engine_args"]["load_format"] == "dummy" and platform["resources"] == {"gpus": 1, "cpus": 4}
    from serving.config import load_config

    argv, _ = serve_argv(load_config(data={"models": [entry]}).models[0])
    assert argv[argv.index("--load-format") + 1] == "dummy" and argv[argv.index("--dtype") + 1] == "bfloat16"
    assert "llama-8b-shape on vllm" in args.engine_note and "OMP_NUM_THREADS=4" in args.engine_note
    with pytest.raises(SystemExit, match="expected one model"):
        bench.read_model_file(_write(tmp_path / "bad.yaml", "just a string"))


def _write(path, text):
    path.write_text(text)
    return path


def test_bench_drives_a_server_with_vllms_own_client(fake_gateway, tmp_path):
    """`--client vllm`: vLLM's benchmark client (what `vllm bench serve` runs) streams chat from the server and
    its results become a level of the table (the demo model's tokenizer makes its random prompts)."""
    from serving.demo import ensure_demo
    from tests.load.conftest import TEST_KEY

    model_dir, _ = ensure_demo(tmp_path / "models")
    args = bench.parse_args(["--client", "vllm", "--input-tokens", "16", "--max-tokens", "10"])
    lv = bench.vllm_client_level(fake_gateway, "fake-a", str(model_dir), 4, 12, args, TEST_KEY)
    assert (lv.requests, lv.failures) == (12, 0)
    assert lv.requests_per_s > 0 and lv.output_tokens_per_s > 0
    assert lv.ttft_p50_ms is not None and lv.ttft_p50_ms > 0 and lv.itl_p50_ms is not None
