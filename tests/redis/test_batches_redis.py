"""The Batch API's state in a real Redis: leases and fenced writes (the Lua scripts), the indexes, and the
operators' `serving batches list|show|cancel` and `serving keys usage` against batches run by a gateway."""

from __future__ import annotations

import asyncio
import io
import json
import time

import pytest_asyncio
import yaml

from serving.cli import main
from serving.config import load_config
from serving.engine.fake import FakeEngine
from serving.gateway.app import create_app
from serving.gateway.store import RedisStore
from tests.redis.support import sdk_for

KEY = "sk-test-batches-0123456789abcdef"


@pytest_asyncio.fixture(loop_scope="function")
async def store(redis_url):
    store = RedisStore(redis_url)
    yield store
    await store.close()


async def test_a_lease_has_one_holder_until_it_lapses_and_fences_the_old_holders_writes(store):
    assert await store.lease_take("batch:x", "a", 0.4)
    assert await store.lease_take("batch:x", "a", 0.4)  # renewed by its holder
    assert not await store.lease_take("batch:x", "b", 0.4)
    assert await store.record_put_fenced("batches", "owner", "x", b"from a", "batch:x", "a")
    assert not await store.record_put_fenced("batches", "owner", "x", b"from b", "batch:x", "b")
    await asyncio.sleep(0.6)  # a's lease lapses (a process that died renews nothing)
    assert await store.lease_take("batch:x", "b", 5)
    assert not await store.record_put_fenced("batches", "owner", "x", b"late a", "batch:x", "a")
    assert await store.record_get("batches", "owner", ["x"]) == [b"from a"]
    await store.lease_drop("batch:x", "a")  # not a's any more: b keeps it
    assert not await store.lease_take("batch:x", "a", 5)
    await store.lease_drop("batch:x", "b")
    assert await store.lease_take("batch:x", "a", 5)


async def test_indexes_keep_members_by_score_and_records_without_ttl_stay(store, redis_client):
    for member, score in (("m1", 3.0), ("m2", 1.0), ("m3", 2.0)):
        await store.index_add("things", member, score)
    assert await store.index_range("things") == ["m1", "m3", "m2"]
    assert await store.index_range("things", newest_first=False) == ["m2", "m3", "m1"]
    await store.index_remove("things", "m3")
    assert await store.index_range("things") == ["m1", "m2"]
    await store.record_put("batches", "owner", "kept", b"v", 0)
    assert redis_client.ttl("serving:batches:owner:kept") == -1  # no expiry: volatile-lru never evicts it


async def test_operators_list_show_and_cancel_every_keys_batches(redis_url, tmp_path, capsys):
    config_data = {"models": [{"name": "tiny", "source": "/models/tiny"}], "redis": {"url": redis_url},
                   "auth": {"enabled": True, "keys": [{"name": "team-a", "key": KEY}]}, "cache": {"mode": "off"},
                   "files": {"storage_url": f"file://{tmp_path}/files"},
                   "batches": {"poll_s": 0.05, "checkpoint_s": 0.05, "max_in_flight": 1}}
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config_data))
    app = create_app(load_config(data=config_data), {"tiny": FakeEngine("tiny", itl_s=0.05)})
    client = sdk_for(app, KEY)
    try:
        lines = [{"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "tiny", "messages": [{"role": "user", "content": f"q {i}"}], "max_tokens": 4}}
                 for i in range(30)]
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        file = await client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
        batch = await client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                            completion_window="24h")
        while (await client.batches.retrieve(batch.id)).request_counts.completed < 2:
            await asyncio.sleep(0.05)

        async def cli(*args: str) -> tuple[int, str]:
            code = await asyncio.to_thread(main, ["batches", "--config", str(config_file), *args])
            return code, capsys.readouterr().out

        code, out = await cli("list")
        assert code == 0 and batch.id in out and "team-a" in out and "in_progress" in out
        code, out = await cli("list", "--json", "--status", "in_progress")
        assert code == 0 and [b["id"] for b in json.loads(out)] == [batch.id]
        code, out = await cli("show", batch.id)
        shown = json.loads(out)
        assert code == 0 and shown["key"] == "team-a" and shown["request_counts"]["total"] == 30
        code, out = await cli("cancel", batch.id)
        assert code == 0 and "cancelling" in out
        deadline = time.monotonic() + 10
        while (done := await client.batches.retrieve(batch.id)).status != "cancelled":
            assert time.monotonic() < deadline, done.status
            await asyncio.sleep(0.05)
        assert done.request_counts.completed < 30
        code, _ = await cli("cancel", batch.id)
        assert code == 1  # nothing to cancel any more
        assert await cli("show", "batch_nope") == (1, "")
        await asyncio.sleep(0.1)  # usage is recorded in the background
        code = await asyncio.to_thread(main, ["keys", "--config", str(config_file), "usage", "team-a"])
        out = capsys.readouterr().out
        assert code == 0 and "batch requests" in out
        row = next(line.split() for line in out.splitlines() if line.split()[1:2] == ["tiny"])
        assert row[6] == str(done.request_counts.completed)  # batch requests, apart from interactive ones
    finally:
        await app.state.services.batches.stop()
        await app.state.services.store.close()


async def test_operators_add_list_and_remove_runtime_adapters(redis_url, tmp_path, capsys):
    """`serving adapters` writes the registry every gateway reads (serving.gateway.adapters)."""
    from serving.gateway.services import Registry

    config_data = {"models": [{"name": "tiny", "source": "/models/tiny", "runtime_adapters": True},
                              {"name": "plain", "source": "/models/plain"}],
                   "redis": {"url": redis_url}, "auth": {"enabled": False}}
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config_data))

    async def cli(*args: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(main, ["adapters", "--config", str(config_file), *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, out, _ = await cli("add", "tiny-sql", "--model", "tiny", "--path", "/adapters/sql")
    assert code == 0 and "tiny-sql" in out
    for bad, reason in ((("tiny-sql", "--model", "tiny", "--path", "/x"), "taken"),
                        (("other", "--model", "plain", "--path", "/x"), "does not take"),
                        (("other", "--model", "nope", "--path", "/x"), "no base model"),
                        (("bad name", "--model", "tiny", "--path", "/x"), "must match")):
        code, _, err = await cli("add", *bad)
        assert code == 1 and reason in err, (bad, err)
    code, out, _ = await cli("list")
    assert code == 0 and "tiny-sql" in out and "/adapters/sql" in out
    config = load_config(data=config_data)
    app = create_app(config, {"tiny": FakeEngine("tiny"), "plain": FakeEngine("plain")})
    registry: Registry = app.state.services.registry
    try:
        await registry.refresh(app.state.services.store)
        assert registry.lookup("tiny-sql")[0].name == "tiny" and registry.adapter_source("tiny-sql") == "/adapters/sql"
        code, out, _ = await cli("remove", "tiny-sql")
        assert code == 0
        await registry.refresh(app.state.services.store)
        assert registry.adapter_source("tiny-sql") is None
        code, _, err = await cli("remove", "tiny-sql")
        assert code == 1 and "no adapter" in err
    finally:
        await app.state.services.store.close()
