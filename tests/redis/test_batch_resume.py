"""Kill the process running a batch mid-way (SIGKILL: no shutdown, its lease left to lapse): another gateway
process resumes the batch from its last checkpoint; every line is in the output exactly once, none lost.
Real processes, real Redis, the official openai SDK; FakeEngines (the real platform: tests/integration)."""

from __future__ import annotations

import collections
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from tests.support import free_port

LINES = 80
ROOT = Path(__file__).resolve().parents[2]


def start(redis_url: str, storage: str, log: Path) -> tuple[subprocess.Popen, openai.OpenAI]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tests.redis.batch_gateway", redis_url, storage, str(port),
                                str(log)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, "the gateway did not start"
        time.sleep(0.1)
    return process, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)


def test_a_batch_whose_process_is_killed_resumes_elsewhere_without_loss_or_duplicates(redis_url, tmp_path):
    storage, log = f"file://{tmp_path}/files", tmp_path / "engine.log"
    first, client = start(redis_url, storage, log)
    second = None
    try:
        lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "tiny", "messages": [{"role": "user", "content": f"line-{i}"}], "max_tokens": 6}}
                 for i in range(LINES)]
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        file = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
        batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
        deadline = time.monotonic() + 60
        while client.batches.retrieve(batch.id).request_counts.completed < 12:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)  # mid-batch: lines in flight, some finished and not checkpointed
        first.wait()
        ran_before = collections.Counter(log.read_text().split())
        assert len(ran_before) < LINES, "the batch was over before the kill: nothing left to resume"
        second, client = start(redis_url, storage, log)
        deadline = time.monotonic() + 90
        while (done := client.batches.retrieve(batch.id)).status != "completed":
            assert done.status in ("validating", "in_progress", "finalizing") and time.monotonic() < deadline, done
            time.sleep(0.1)
        assert done.request_counts.total == LINES and done.request_counts.completed == LINES
        assert done.request_counts.failed == 0 and done.error_file_id is None
        rows = [json.loads(r) for r in client.files.content(done.output_file_id).text.splitlines()]
        ids = [row["custom_id"] for row in rows]
        assert sorted(ids) == sorted(f"line-{i}" for i in range(LINES))  # each line once: none lost, none twice
        assert all(row["response"]["status_code"] == 200 for row in rows)
        ran = collections.Counter(log.read_text().split())
        assert set(ran) == set(ids)
        # only what the killed process had in flight or finished after its last checkpoint ran again
        twice = [line for line, count in ran.items() if count > 1]
        print(f"\nbatch resume: {len(ran_before)} lines started before the kill, {len(twice)} ran again after it")
        assert len(twice) <= 4 + 2 * 4  # max_in_flight, plus what two checkpoint intervals can finish
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(10)
