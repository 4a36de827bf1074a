"""The Files and Batch APIs through the gateway with the official openai SDK against fake engines (no Ray,
no vLLM): upload, create, poll, results equal to interactive answers, bad lines in the error file with the
interactive status, cancel, expiry, usage, priority, leases. The real platform and a process killed
mid-batch: tests/integration/test_batches.py and tests/redis/test_batch_resume.py."""

from __future__ import annotations

import asyncio
import io
import json
import time

import httpx
import openai
import pytest
import pytest_asyncio

from serving.config import ServingConfig, load_config
from serving.engine.fake import FakeEngine
from serving.gateway.app import create_app
from serving.gateway.auth import digest
from serving.gateway.batches import KIND
from serving.gateway.store import MemoryStore
from tests.support import Recording, assert_envelope, no_serving_env  # noqa: F401 - autouse fixture

KEY, OTHER = "sk-test-one-0123456789abcdef", "sk-test-two-0123456789abcdef"
LIMITED = "sk-test-rpm-0123456789abcdef"


def make_config(tmp_path, **batches) -> ServingConfig:
    return load_config(data={
        "models": [{"name": "tiny", "source": "/models/tiny"},
                   {"name": "embedder", "source": "/models/embedder", "kind": "embed"},
                   {"name": "no-batch", "source": "/models/tiny", "batches": False}],
        "auth": {"enabled": True, "keys": [{"name": "one", "key": KEY}, {"name": "two", "key": OTHER},
                                           {"name": "rpm", "key": LIMITED, "rpm": 3}]},
        "cache": {"mode": "off"},
        "files": {"storage_url": f"file://{tmp_path}/files", "max_bytes": 64 * 1024},
        "batches": {"poll_s": 0.05, "checkpoint_s": 0.05, "checkpoint_lines": 4, "lease_s": 2.0, **batches},
    })


@pytest.fixture
def engine() -> Recording:
    return Recording("tiny")


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest_asyncio.fixture(loop_scope="function")
async def app(engine, store, tmp_path):
    app = create_app(make_config(tmp_path), {"tiny": engine, "embedder": FakeEngine("embedder"),
                                             "no-batch": FakeEngine("no-batch")}, store=store)
    yield app
    await app.state.services.batches.stop()


def sdk(app, key: str = KEY) -> openai.AsyncOpenAI:
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key=key, max_retries=0, http_client=client)


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def chat_line(custom_id: str, content: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 6,
                     "temperature": 0, **body}}


async def upload(client: openai.AsyncOpenAI, lines: list[dict]):
    return await client.files.create(file=("input.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")


async def finished(client: openai.AsyncOpenAI, batch_id: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        batch = await client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        await asyncio.sleep(0.05)


async def lines_of(client: openai.AsyncOpenAI, file_id: str | None) -> dict[str, dict]:
    if file_id is None:
        return {}
    text = (await client.files.content(file_id)).text
    rows = [json.loads(line) for line in text.splitlines() if line]
    by_id = {row["custom_id"]: row for row in rows}
    assert len(by_id) == len(rows), "a custom_id is in the file twice"
    return by_id


# ------------------------------------------------------------------------------- files


async def test_a_file_is_uploaded_listed_read_and_deleted_by_its_key_only(app):
    client, other = sdk(app), sdk(app, OTHER)
    data = jsonl([chat_line("a", "hi")])
    file = await upload(client, [chat_line("a", "hi")])
    assert file.id.startswith("file-") and file.purpose == "batch" and file.bytes == len(data)
    assert file.filename == "input.jsonl" and file.status == "processed"
    assert file.expires_at == file.created_at + 30 * 86400  # OpenAI's default for purpose batch
    assert (await client.files.retrieve(file.id)).id == file.id
    assert (await client.files.content(file.id)).content == data
    assert [f.id for f in (await client.files.list()).data] == [file.id]
    # another key sees nothing of it
    assert (await other.files.list()).data == []
    for call in (other.files.retrieve, other.files.content, other.files.delete):
        with pytest.raises(openai.NotFoundError):
            await call(file.id)
    deleted = await client.files.delete(file.id)
    assert deleted.deleted is True and deleted.id == file.id
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(file.id)
    assert (await client.files.list()).data == []


async def test_uploads_the_server_does_not_take_are_refused_in_openais_envelope(app):
    client = sdk(app)
    with pytest.raises(openai.BadRequestError) as refused:
        await client.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    assert refused.value.body["param"] == "purpose"
    with pytest.raises(openai.BadRequestError) as refused:
        await client.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="batch",
                                  expires_after={"anchor": "created_at", "seconds": 60})
    assert refused.value.body["param"] == "expires_after.seconds"
    with pytest.raises(openai.APIStatusError) as too_big:
        await client.files.create(file=("a.jsonl", io.BytesIO(b"x" * (65 * 1024))), purpose="batch")
    assert too_big.value.status_code == 413 and too_big.value.body["code"] == "file_too_large"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as raw:
        headers = {"authorization": f"Bearer {KEY}"}
        assert_envelope(await raw.post("/v1/files", json={"purpose": "batch"}, headers=headers), 415)
        assert_envelope(await raw.post("/v1/files", headers=headers, files={"purpose": (None, "batch")}), 400,
                        param="file")
        assert_envelope(await raw.post("/v1/files", files={"purpose": (None, "batch")}), 401, code="missing_api_key")
    expiring = await client.files.create(file=("b.jsonl", io.BytesIO(b"{}\n")), purpose="batch",
                                         expires_after={"anchor": "created_at", "seconds": 7200})
    assert expiring.expires_at == expiring.created_at + 7200


# ------------------------------------------------------------------------------- batches


async def test_a_batch_answers_each_line_as_the_interactive_route_does(app, engine):
    client = sdk(app)
    good = [chat_line(f"good-{i}", f"question number {i}") for i in range(9)]
    bad = [
        {**chat_line("unknown-model", "x"), "body": {**chat_line("", "x")["body"], "model": "nope"}},
        {**chat_line("wrong-url", "x"), "url": "/v1/embeddings"},
        {**chat_line("unknown-url", "x"), "url": "/v1/nothing"},
        {**chat_line("wrong-method", "x"), "method": "GET"},
        chat_line("wrong-type", "x", n="2"),
        chat_line("typo", "x", temprature=0.5),
        chat_line("streams", "x", stream=True),
        {**chat_line("embed-model", "x"), "body": {**chat_line("", "x")["body"], "model": "embedder"}},
        {**chat_line("not-batchable", "x"), "body": {**chat_line("", "x")["body"], "model": "no-batch"}},
    ]
    file = await upload(client, good + bad)
    batch = await client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                        completion_window="24h", metadata={"job": "eval"})
    assert batch.id.startswith("batch_") and batch.status == "validating" and batch.metadata == {"job": "eval"}
    assert batch.expires_at == batch.created_at + 86400
    done = await finished(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts.total == 18 and done.request_counts.completed == 9 and done.request_counts.failed == 9
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.model is None
    outputs, errors = await lines_of(client, done.output_file_id), await lines_of(client, done.error_file_id)
    assert set(outputs) == {line["custom_id"] for line in good}
    # each line's answer is what the same request sent interactively gets (ids and times aside)
    for line in good[:3]:
        raw = await client.chat.completions.with_raw_response.create(**line["body"])
        interactive = raw.http_response.json()
        answer = outputs[line["custom_id"]]
        assert answer["error"] is None and answer["id"].startswith("batch_req_")
        assert answer["response"]["status_code"] == 200
        body = answer["response"]["body"]
        assert body["choices"] == interactive["choices"] and body["usage"] == interactive["usage"]
        assert body["model"] == interactive["model"] and body["id"] != interactive["id"]
    expected = {"unknown-model": (404, "model_not_found"), "wrong-url": (400, "invalid_url"),
                "unknown-url": (404, "unknown_url"), "wrong-method": (405, "method_not_allowed"),
                "wrong-type": (400, None), "typo": (400, "unknown_parameter"), "streams": (400, None),
                "embed-model": (400, "wrong_route"), "not-batchable": (400, "model_not_batchable")}
    assert set(errors) == set(expected)
    for custom_id, (status, code) in expected.items():
        response = errors[custom_id]["response"]
        assert response["status_code"] == status, (custom_id, response)
        assert response["body"]["error"]["code"] == code and response["body"]["error"]["message"]
    # the engine saw the batch lines at the batch priority, the interactive ones at the default
    batch_bodies = [b for b in engine.bodies if b.get("priority") == 10]
    assert len(batch_bodies) == 9
    assert all("priority" not in b for b in engine.bodies[-3:])
    assert done.usage.output_tokens == 9 * 6 and done.usage.input_tokens > 0
    # the files are the batch's key's, of purpose batch_output
    output = await client.files.retrieve(done.output_file_id)
    assert output.purpose == "batch_output" and output.filename == f"{batch.id}_output.jsonl"
    with pytest.raises(openai.NotFoundError):
        await sdk(app, OTHER).files.content(done.output_file_id)


async def test_a_client_cannot_set_the_engine_priority_of_an_interactive_request(app, engine):
    await sdk(app).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=2, extra_body={"priority": -100})
    assert "priority" not in engine.bodies[-1]


async def test_embeddings_and_responses_batches(app, engine):
    client = sdk(app)
    embed = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "embedder", "input": f"text {i}"}} for i in range(3)]
    batch = await client.batches.create(input_file_id=(await upload(client, embed)).id, endpoint="/v1/embeddings",
                                        completion_window="24h")
    done = await finished(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 3 and done.model == "embedder"
    outputs = await lines_of(client, done.output_file_id)
    interactive = await client.embeddings.create(model="embedder", input="text 1")
    assert outputs["e1"]["response"]["body"]["data"][0]["embedding"] == interactive.data[0].embedding
    responses = [{"custom_id": "r", "method": "POST", "url": "/v1/responses",
                  "body": {"model": "tiny", "input": "Hello", "max_output_tokens": 4}}]
    batch = await client.batches.create(input_file_id=(await upload(client, responses)).id,
                                        endpoint="/v1/responses", completion_window="24h")
    done = await finished(client, batch.id)
    body = (await lines_of(client, done.output_file_id))["r"]["response"]["body"]
    assert body["object"] == "response" and body["usage"]["output_tokens"] == 4
    stored = await client.responses.retrieve(body["id"])  # stored, as an interactive turn with store
    assert stored.output_text == "".join(p["text"] for p in body["output"][0]["content"])


async def test_a_malformed_input_file_fails_the_batch_naming_its_lines(app):
    client = sdk(app)
    data = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n' \
           b'not json\n' \
           b'{"method": "POST", "url": "/v1/chat/completions", "body": {}}\n' \
           b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'
    file = await client.files.create(file=("bad.jsonl", io.BytesIO(data)), purpose="batch")
    batch = await client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
    assert batch.status == "failed" and batch.failed_at
    assert [(e.line, e.code) for e in batch.errors.data] == [(2, "invalid_json_line"),
                                                              (3, "missing_required_parameter"),
                                                              (4, "duplicate_custom_id")]
    assert (await client.batches.retrieve(batch.id)).status == "failed"


async def test_batch_requests_are_checked_like_any_request(app):
    client, other = sdk(app), sdk(app, OTHER)
    file = await upload(client, [chat_line("a", "hi")])
    with pytest.raises(openai.NotFoundError):  # another key's file
        await other.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    for params, param in (({"endpoint": "/v1/moderations"}, "endpoint"), ({"completion_window": "1h"},
                                                                           "completion_window"),
                          ({"metadata": {"k": "v" * 600}}, "metadata")):
        args = {"input_file_id": file.id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **params}
        with pytest.raises(openai.BadRequestError) as refused:
            await client.batches.create(**args)
        assert refused.value.body["param"] == param
    batch = await client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        await other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        await other.batches.cancel(batch.id)
    assert (await other.batches.list()).data == []
    await finished(client, batch.id)
    with pytest.raises(openai.ConflictError):
        await client.batches.cancel(batch.id)
    listed = await client.batches.list(limit=10)
    assert [b.id for b in listed.data] == [batch.id] and listed.has_more is False


async def test_cancel_stops_the_remaining_lines_within_seconds(store, tmp_path):
    engine = FakeEngine("tiny", itl_s=0.05)  # 6 tokens: 0.3 s a line
    app = create_app(make_config(tmp_path, max_in_flight=2), {"tiny": engine, "embedder": FakeEngine("embedder"),
                                                              "no-batch": FakeEngine("no-batch")}, store=store)
    client = sdk(app)
    try:
        lines = [chat_line(f"c{i}", f"q {i}") for i in range(40)]
        batch = await client.batches.create(input_file_id=(await upload(client, lines)).id,
                                            endpoint="/v1/chat/completions", completion_window="24h")
        while (await client.batches.retrieve(batch.id)).request_counts.completed < 2:
            await asyncio.sleep(0.05)
        asked = time.monotonic()
        cancelling = await client.batches.cancel(batch.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at
        done = await finished(client, batch.id)
        took = time.monotonic() - asked
        assert done.status == "cancelled" and done.cancelled_at and took < 5, (done.status, took)
        outputs, errors = await lines_of(client, done.output_file_id), await lines_of(client, done.error_file_id)
        assert len(outputs) + len(errors) == 40 and 2 <= len(outputs) < 40
        assert {row["error"]["code"] for row in errors.values()} == {"batch_cancelled"}
        assert done.request_counts.completed == len(outputs) and done.request_counts.failed == len(errors)
        assert engine.in_flight == 0 and engine.aborted  # lines in flight were aborted at the engine
    finally:
        await app.state.services.batches.stop()


async def test_a_batch_past_its_window_expires_with_the_rest_in_the_error_file(app, store):
    client = sdk(app)
    app.state.services.batches._loop = asyncio.get_running_loop().create_future()  # nothing runs it yet
    batch = await client.batches.create(input_file_id=(await upload(client, [chat_line("a", "x")])).id,
                                        endpoint="/v1/chat/completions", completion_window="24h")
    owner = next(iter(store._indexes["files-owners"]))
    record = json.loads((await store.record_get(KIND, owner, [batch.id]))[0])
    record["batch"]["expires_at"] = int(time.time()) - 1
    await store.record_put(KIND, owner, batch.id, json.dumps(record).encode(), 0)
    app.state.services.batches._loop = None
    app.state.services.batches.wake()
    done = await finished(client, batch.id)
    assert done.status == "expired" and done.expired_at and done.output_file_id is None
    assert (await lines_of(client, done.error_file_id))["a"]["error"]["code"] == "batch_expired"


async def test_batch_usage_is_recorded_apart_and_uses_no_rpm(app, store):
    client = sdk(app, LIMITED)  # 3 requests a minute
    lines = [chat_line(f"u{i}", f"q {i}") for i in range(6)]
    batch = await client.batches.create(input_file_id=(await upload(client, lines)).id,
                                        endpoint="/v1/chat/completions", completion_window="24h")
    owner = digest(LIMITED)
    deadline = time.monotonic() + 20
    while json.loads((await store.record_get(KIND, owner, [batch.id]))[0])["batch"]["status"] != "completed":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)  # read from the store: polling through the API would use the key's RPM
    done = await client.batches.retrieve(batch.id)
    assert done.request_counts.completed == 6  # 6 lines, and 3 API calls so far: within an RPM of 3
    await asyncio.sleep(0.05)  # the usage is recorded in the background
    usage = await store.usage_get(owner)
    (day,) = usage.values()
    assert day["tiny"]["batch_requests"] == 6 and day["tiny"]["batch_completion_tokens"] == 36
    assert "requests" not in day["tiny"]  # no interactive request of this key ran a model


async def test_a_replica_that_lost_the_lease_records_nothing(store):
    assert await store.lease_take("batch:x", "a", 10)
    assert not await store.lease_take("batch:x", "b", 10)
    assert await store.record_put_fenced(KIND, "o", "x", b"1", "batch:x", "a")
    assert not await store.record_put_fenced(KIND, "o", "x", b"2", "batch:x", "b")
    await store.lease_drop("batch:x", "b")  # not b's: nothing happens
    assert not await store.lease_take("batch:x", "b", 10)
    await store.lease_drop("batch:x", "a")
    assert await store.lease_take("batch:x", "b", 10)
    assert not await store.record_put_fenced(KIND, "o", "x", b"3", "batch:x", "a")
    assert (await store.record_get(KIND, "o", ["x"])) == [b"1"]


async def test_batch_lines_are_counted_in_their_own_metrics_not_the_interactive_ones(app):
    from prometheus_client import generate_latest

    client = sdk(app)
    lines = [chat_line("ok", "hi"), {**chat_line("bad", "x"), "body": {**chat_line("", "x")["body"], "model": "nope"}}]
    batch = await client.batches.create(input_file_id=(await upload(client, lines)).id,
                                        endpoint="/v1/chat/completions", completion_window="24h")
    assert (await finished(client, batch.id)).status == "completed"
    text = generate_latest(app.state.services.metrics.backend.registry).decode()
    assert 'serving_batch_lines_total{model="tiny",result="completed"} 1.0' in text
    assert 'serving_batch_lines_total{model="unknown",result="failed"} 1.0' in text  # never the client's name
    assert 'serving_batch_lines_pending{model="tiny"} 0.0' in text
    assert 'serving_batch_lines_in_flight{model="tiny"} 0.0' in text
    assert "serving_requests_total{" not in text  # no interactive request ran


# ------------------------------------------------------------------------------- what an attack review found


async def test_the_batch_keeps_its_own_input_when_the_uploaded_file_is_deleted(store, tmp_path):
    engine = FakeEngine("tiny", itl_s=0.02)
    app = create_app(make_config(tmp_path), {"tiny": engine, "embedder": FakeEngine("embedder"),
                                             "no-batch": FakeEngine("no-batch")}, store=store)
    client = sdk(app)
    try:
        app.state.services.batches._loop = asyncio.get_running_loop().create_future()  # not started yet
        file = await upload(client, [chat_line(f"d{i}", "x") for i in range(5)])
        batch = await client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                            completion_window="24h")
        await client.files.delete(file.id)
        app.state.services.batches._loop = None
        app.state.services.batches.wake()
        done = await finished(client, batch.id)
        assert done.status == "completed" and done.request_counts.completed == 5
        # the storage losing the batch's own copy fails the batch at once instead of stalling a runner slot
        await app.state.services.batches.stop()
        app.state.services.batches._loop = asyncio.get_running_loop().create_future()  # not started yet
        second = await client.batches.create(input_file_id=(await upload(client, [chat_line("e", "x")])).id,
                                             endpoint="/v1/chat/completions", completion_window="24h")
        (tmp_path / "files" / "batches" / second.id / "input.jsonl").unlink()
        app.state.services.batches._loop = None
        app.state.services.batches.wake()
        failed = await finished(client, second.id)
        assert failed.status == "failed" and failed.errors.data[0].code == "input_file_missing"
    finally:
        await app.state.services.batches.stop()


async def test_odd_json_types_and_digits_are_400s_not_500s(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                 headers={"authorization": f"Bearer {KEY}"}) as raw:
        file = (await raw.post("/v1/files", files={"file": ("a.jsonl", jsonl([chat_line("a", "x")])),
                                                   "purpose": (None, "batch")})).json()
        for body, param, code in (({"endpoint": ["/v1/chat/completions"]}, "endpoint", "invalid_value"),
                                  ({"endpoint": {}}, "endpoint", "invalid_value"),
                                  ({"completion_window": ["24h"]}, "completion_window", "invalid_value"),
                                  ({"output_expires_after": {"anchor": "created_at", "seconds": 3600, "x": 1}},
                                   "output_expires_after", None)):
            create = {"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h",
                      **body}
            assert_envelope(await raw.post("/v1/batches", json=create), 400, param=param, code=code)
        for seconds in ("³⁶⁰⁰", "٣٦٠٠", "9" * 5000):
            form = {"purpose": (None, "batch"), "expires_after[anchor]": (None, "created_at"),
                    "expires_after[seconds]": (None, seconds), "file": ("a.jsonl", b"{}\n")}
            assert_envelope(await raw.post("/v1/files", files=form), 400, param="expires_after.seconds")
        odd = jsonl([{**chat_line("a", "x"), "body": {**chat_line("", "x")["body"], "model": ["tiny"]}}])
        odd_file = (await raw.post("/v1/files", files={"file": ("o.jsonl", odd), "purpose": (None, "batch")})).json()
        created = await raw.post("/v1/batches", json={"input_file_id": odd_file["id"],
                                                      "endpoint": "/v1/chat/completions", "completion_window": "24h"})
        assert created.status_code == 200 and created.json()["model"] is None
        bom = b"\xef\xbb\xbf" + jsonl([chat_line("a", "x")])
        bom_file = (await raw.post("/v1/files", files={"file": ("b.jsonl", bom), "purpose": (None, "batch")})).json()
        created = await raw.post("/v1/batches", json={"input_file_id": bom_file["id"],
                                                      "endpoint": "/v1/chat/completions", "completion_window": "24h"})
        assert created.json()["status"] == "validating"  # a UTF-8 byte order mark is not a broken first line


async def test_a_revoked_key_stops_its_running_batch(store, tmp_path, monkeypatch):
    from serving.gateway import batch_runner
    from serving.gateway.auth import create_key, revoke_key

    monkeypatch.setattr(batch_runner, "KEY_CHECK_S", 0.1)
    engine = FakeEngine("tiny", itl_s=0.05)
    app = create_app(make_config(tmp_path, max_in_flight=1), {"tiny": engine, "embedder": FakeEngine("embedder"),
                                                              "no-batch": FakeEngine("no-batch")}, store=store)
    key, _ = await create_key(store, "temporary")
    client = sdk(app, key)
    try:
        batch = await client.batches.create(input_file_id=(await upload(client, [chat_line(f"r{i}", "x")
                                                                                 for i in range(40)])).id,
                                            endpoint="/v1/chat/completions", completion_window="24h")
        owner = digest(key)
        while json.loads((await store.record_get(KIND, owner, [batch.id]))[0])["batch"]["request_counts"][
                "completed"] < 2:
            await asyncio.sleep(0.05)
        await revoke_key(store, "temporary")
        deadline = time.monotonic() + 5
        while (record := json.loads((await store.record_get(KIND, owner, [batch.id]))[0]))["batch"]["status"] \
                != "cancelled":
            assert time.monotonic() < deadline, record["batch"]["status"]
            await asyncio.sleep(0.05)
        counts = record["batch"]["request_counts"]
        assert counts["completed"] < 40 and counts["completed"] + counts["failed"] == 40
        started = len(engine.started)
        await asyncio.sleep(0.3)
        assert len(engine.started) == started  # nothing more runs for the revoked key
    finally:
        await app.state.services.batches.stop()


async def test_an_engine_that_fails_outright_fails_the_line_not_the_batch(store, tmp_path):
    class Broken(FakeEngine):
        def generate(self, *args, **kwargs):  # an adapter bug: raises before it is iterated
            raise RuntimeError("boom")

    app = create_app(make_config(tmp_path), {"tiny": Broken("tiny"), "embedder": FakeEngine("embedder"),
                                             "no-batch": FakeEngine("no-batch")}, store=store)
    client = sdk(app)
    try:
        batch = await client.batches.create(input_file_id=(await upload(client, [chat_line(f"b{i}", "x")
                                                                                 for i in range(3)])).id,
                                            endpoint="/v1/chat/completions", completion_window="24h")
        done = await finished(client, batch.id)
        assert done.status == "completed" and done.request_counts.failed == 3 and done.request_counts.completed == 0
        errors = await lines_of(client, done.error_file_id)
        assert {row["response"]["status_code"] for row in errors.values()} == {500}
        assert errors["b0"]["response"]["body"]["error"]["message"] != "boom"  # masked
    finally:
        await app.state.services.batches.stop()


async def test_listing_pages_by_creation_and_survives_deleting_as_it_goes(app):
    client = sdk(app)
    ids = [(await client.files.create(file=(f"{i}.jsonl", io.BytesIO(b"{}\n")), purpose="batch")).id
           for i in range(7)]
    assert [f.id for f in (await client.files.list()).data] == ids[::-1]  # newest first, also within a second
    assert [f.id for f in (await client.files.list(order="asc")).data] == ids
    deleted = 0
    async for file in client.files.list(limit=2):  # the usual cleanup loop: its cursor's file is gone
        await client.files.delete(file.id)
        deleted += 1
    assert deleted == 7 and (await client.files.list()).data == []


async def test_a_key_may_have_so_many_unfinished_batches(store, tmp_path):
    app = create_app(make_config(tmp_path, max_active_per_key=2), {"tiny": FakeEngine("tiny"),
                                                                   "embedder": FakeEngine("embedder"),
                                                                   "no-batch": FakeEngine("no-batch")}, store=store)
    app.state.services.batches._loop = asyncio.get_running_loop().create_future()  # nothing runs them
    client = sdk(app)
    file = await upload(client, [chat_line("a", "x")])
    for _ in range(2):
        await client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.RateLimitError) as refused:
        await client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert refused.value.body["code"] == "batch_limit_exceeded"
    # another key is not held back by this one's
    await sdk(app, OTHER).batches.create(input_file_id=(await upload(sdk(app, OTHER), [chat_line("a", "x")])).id,
                                         endpoint="/v1/chat/completions", completion_window="24h")


def test_runners_take_batches_in_turn_from_each_key():
    from serving.gateway.batch_runner import fair_order

    members = ["a/1", "a/2", "a/3", "b/1", "a/4", "c/1", "b/2"]
    assert fair_order(members) == ["a/1", "b/1", "c/1", "a/2", "b/2", "a/3", "a/4"]
