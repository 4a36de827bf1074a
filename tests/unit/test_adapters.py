"""LoRA adapters loaded at runtime through the gateway (serving.gateway.adapters) on fake engines: admin keys
only, the registry shared by gateways through the store, requests routed to the base model with the
adapter's source, unloading. The real engine: tests/integration/test_routing.py."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from serving.config import load_config
from serving.engine.fake import FakeEngine
from serving.gateway import services
from serving.gateway.app import create_app
from serving.gateway.store import MemoryStore
from tests.support import Recording, assert_envelope, no_serving_env  # noqa: F401 - autouse fixture

ADMIN, USER, NARROW = "sk-test-admin-0123456789abcdef", "sk-test-user-0123456789abcdef", "sk-test-narrow-0123456789abc"


def make_app(store: MemoryStore, engine: FakeEngine):
    config = load_config(data={
        "models": [{"name": "base", "source": "/m", "runtime_adapters": True},
                   {"name": "plain", "source": "/m"},
                   {"name": "static", "source": "/m", "lora_adapters": {"static-lora": "/a"}}],
        "auth": {"enabled": True, "keys": [{"name": "admin", "key": ADMIN, "admin": True},
                                           {"name": "user", "key": USER},
                                           {"name": "narrow", "key": NARROW, "models": ["plain"]}]},
        "cache": {"mode": "off"}})
    return create_app(config, {"base": engine, "plain": FakeEngine("plain"), "static": FakeEngine("static")},
                      store=store)


def client(app, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                             headers={"authorization": f"Bearer {key}"})


@pytest.fixture
def adapter_dir(tmp_path):
    path = tmp_path / "sql-lora"
    path.mkdir()
    return str(path)


async def test_an_admin_loads_an_adapter_every_gateway_serves_it_and_unloading_makes_it_404(
        adapter_dir, monkeypatch):
    monkeypatch.setattr(services, "ADAPTERS_TTL_S", 0.05)
    store = MemoryStore()
    engine = Recording("base")
    first, second = make_app(store, engine), make_app(store, engine)  # two gateway replicas, one store
    async with client(first, ADMIN) as admin, client(second, USER) as user:
        loaded = await admin.post("/v1/load_lora_adapter",
                                  json={"lora_name": "sql-lora", "lora_path": adapter_dir, "model": "base"})
        assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'sql-lora' added successfully."
        assert engine.adapters == {"sql-lora": adapter_dir}  # one replica loaded it at once
        await asyncio.sleep(0.1)
        cards = {c["id"]: c for c in (await user.get("/v1/models")).json()["data"]}
        assert cards["sql-lora"]["parent"] == "base" and cards["sql-lora"]["root"] == "sql-lora"  # no path told
        sdk = openai.AsyncOpenAI(base_url="http://test/v1", api_key=USER, max_retries=0,
                                 http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=second),
                                                               base_url="http://test"))
        reply = await sdk.chat.completions.create(model="sql-lora", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=3)
        assert reply.model == "sql-lora"
        seen = engine.bodies[-1]
        assert seen["model"] == "sql-lora" and seen["_adapter"] == "sql-lora"
        unloaded = await admin.post("/v1/unload_lora_adapter", json={"lora_name": "sql-lora"})
        assert unloaded.status_code == 200 and unloaded.text == "Success: LoRA adapter 'sql-lora' removed successfully."
        await asyncio.sleep(0.1)
        with pytest.raises(openai.NotFoundError):
            await sdk.chat.completions.create(model="sql-lora", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=3)
        assert "sql-lora" not in {c["id"] for c in (await user.get("/v1/models")).json()["data"]}
        assert_envelope(await admin.post("/v1/unload_lora_adapter", json={"lora_name": "sql-lora"}), 404,
                        code="not_found", param="lora_name")


async def test_only_admin_keys_change_adapters_and_bad_loads_are_refused(adapter_dir):
    store = MemoryStore()
    app = make_app(store, FakeEngine("base"))
    body = {"lora_name": "x-lora", "lora_path": adapter_dir, "model": "base"}
    async with client(app, USER) as user, client(app, ADMIN) as admin:
        assert_envelope(await user.post("/v1/load_lora_adapter", json=body), 403, code="permission_denied")
        assert_envelope(await user.post("/v1/unload_lora_adapter", json={"lora_name": "x"}), 403,
                        code="permission_denied")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as anonymous:
            assert_envelope(await anonymous.post("/v1/load_lora_adapter", json=body), 401, code="missing_api_key")
        for changed, status, code, param in (
                ({"lora_path": adapter_dir + "/missing"}, 400, "adapter_not_loadable", "lora_path"),
                ({"model": "plain"}, 400, "adapters_not_enabled", "model"),
                ({"model": "nope"}, 404, "model_not_found", "model"),
                ({"model": "static-lora"}, 404, "model_not_found", "model"),  # an adapter is no base
                ({"lora_name": "plain"}, 400, "name_taken", "lora_name"),
                ({"lora_name": "static-lora", "model": "static"}, 400, "name_taken", "lora_name"),
                ({"lora_name": "bad name!"}, 400, None, "lora_name"),
                ({"lora_name": 7}, 400, None, "lora_name")):
            assert_envelope(await admin.post("/v1/load_lora_adapter", json={**body, **changed}), status, code=code,
                            param=param)
        assert (await admin.post("/v1/load_lora_adapter", json=body)).status_code == 200
        assert_envelope(await admin.post("/v1/load_lora_adapter", json=body), 400, code="name_taken",
                        param="lora_name")
        assert_envelope(await admin.post("/v1/unload_lora_adapter", json={"lora_name": "static-lora"}), 400,
                        code="configured_adapter", param="lora_name")


async def test_a_key_sees_and_uses_runtime_adapters_of_the_models_it_may_use(adapter_dir):
    store = MemoryStore()
    app = make_app(store, FakeEngine("base"))
    async with client(app, ADMIN) as admin, client(app, NARROW) as narrow:
        assert (await admin.post("/v1/load_lora_adapter", json={"lora_name": "base-sql", "lora_path": adapter_dir,
                                                                "model": "base"})).status_code == 200
        assert "base-sql" not in {c["id"] for c in (await narrow.get("/v1/models")).json()["data"]}
        refused = await narrow.post("/v1/chat/completions", json={"model": "base-sql", "max_tokens": 2,
                                                                  "messages": [{"role": "user", "content": "x"}]})
        assert_envelope(refused, 404, code="model_not_found", param="model")


async def test_a_replica_without_the_adapter_loads_it_on_its_first_request(adapter_dir, monkeypatch):
    monkeypatch.setattr(services, "ADAPTERS_TTL_S", 0.0)
    store = MemoryStore()
    loader, later = Recording("base"), Recording("base")  # the replica that loaded it, one that starts later
    async with client(make_app(store, loader), ADMIN) as admin:
        assert (await admin.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": adapter_dir,
                                                                "model": "base"})).status_code == 200
    async with client(make_app(store, later), USER) as user:
        reply = await user.post("/v1/chat/completions", json={"model": "late", "max_tokens": 2,
                                                              "messages": [{"role": "user", "content": "x"}]})
        assert reply.status_code == 200 and later.adapters == {"late": adapter_dir}
        assert later.bodies[-1]["_adapter"] == "late"


def test_an_adapter_on_object_storage_is_copied_to_the_replica_once(tmp_path, monkeypatch):
    """A remote lora_path goes through fsspec (its memory filesystem stands in for s3:// here): copied once
    under ADAPTER_CACHE, a local path used as it is."""
    import fsspec

    from serving.engine import vllm

    monkeypatch.setattr(vllm, "ADAPTER_CACHE", str(tmp_path / "cache"))
    memory = fsspec.filesystem("memory")
    memory.pipe({"/bucket/sql/adapter_config.json": b'{"r": 8}', "/bucket/sql/adapter_model.safetensors": b"w"})
    local = vllm.local_copy("memory://bucket/sql")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [local.rsplit("/", 1)[1]]
    assert open(f"{local}/adapter_config.json").read() == '{"r": 8}'
    memory.rm("/bucket/sql", recursive=True)  # a second load does not fetch again
    assert vllm.local_copy("memory://bucket/sql") == local
    assert vllm.local_copy(str(tmp_path)) == str(tmp_path)
    assert vllm.local_copy(f"file://{tmp_path}") == str(tmp_path)
