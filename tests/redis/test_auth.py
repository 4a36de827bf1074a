"""API keys on a real Redis: stored hashed, 401 without a valid key, model scopes, expiry, revocation."""

from __future__ import annotations

import asyncio
import logging
import time

import openai
import pytest

import serving.gateway.auth as auth
from serving.gateway.auth import create_key, digest, revoke_key
from tests.redis.support import assert_envelope, chat_body, client_for, post_chat, sdk_for

CONFIG_KEY = "cfg-0123456789abcdef-secret"


def raw_store(app):
    """The RedisStore under the gateway's Resilient wrapper (same event loop as the test)."""
    return app.state.services.store.store


def dump_redis(client) -> bytes:
    """Every key and value in the database, as one blob to search."""
    parts = []
    for key in client.scan_iter():
        parts.append(key)
        kind = client.type(key)
        if kind == b"string":
            parts.append(client.get(key))
        elif kind == b"hash":
            for field, value in client.hgetall(key).items():
                parts += [field, value]
        elif kind == b"set":
            parts += list(client.smembers(key))
        elif kind == b"zset":  # the rate limits' index of subjects (and leases)
            parts += list(client.zrange(key, 0, -1))
        else:
            raise AssertionError(f"unexpected Redis type {kind!r} at {key!r}")
    return b"\n".join(parts)


async def test_keys_are_stored_hashed(gateway, redis_client, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    app = gateway(auth={"enabled": True, "keys": [{"name": "from-config", "key": CONFIG_KEY, "rpm": 100}]})
    key, record = await create_key(raw_store(app), "alice", rpm=100, tpm=10_000)
    assert key.startswith("sk-srv-") and len(key) > 40
    async with client_for(app, key) as client:
        assert (await post_chat(client)).status_code == 200
        assert (await post_chat(client, stream=True)).status_code == 200
    async with client_for(app, CONFIG_KEY) as client:
        assert (await post_chat(client)).status_code == 200
    async with client_for(app, key + "x") as client:  # a wrong key goes through the logs' paths too
        assert (await post_chat(client)).status_code == 401
    await app.state.services.drain()

    blob = dump_redis(redis_client)
    assert digest(key).encode() in blob  # the key is there, by its digest
    secret = key[len("sk-srv-"):]
    for clear in (key, secret, secret[:16], secret[-16:], CONFIG_KEY):
        assert clear.encode() not in blob
        assert clear not in caplog.text
    assert record["hint"].endswith(key[-4:]) and secret not in record["hint"]


@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Bearer   ", "Basic dXNlcjpwYXNz", "sk-srv-abc"])
async def test_missing_or_malformed_authorization_is_401(gateway, authorization) -> None:
    app = gateway(auth={"enabled": True})
    await create_key(raw_store(app), "alice")
    headers = {"authorization": authorization} if authorization is not None else {}
    async with client_for(app) as client:
        assert_envelope(await post_chat(client, headers), 401, code="missing_api_key")
        assert_envelope(await client.get("/v1/models", headers=headers), 401, code="missing_api_key")
        response = await client.post("/v1/embeddings", json={"model": "embedder", "input": "x"}, headers=headers)
        assert_envelope(response, 401, code="missing_api_key")


async def test_unknown_key_is_401(gateway) -> None:
    app = gateway(auth={"enabled": True})
    key, _ = await create_key(raw_store(app), "alice")
    for wrong in ("sk-srv-" + "A" * 43, key[:-1], key.upper()):
        async with client_for(app, wrong) as client:
            error = assert_envelope(await post_chat(client), 401, code="invalid_api_key")
            assert error["type"] == "authentication_error"
            assert wrong not in error["message"]
            assert_envelope(await client.get("/v1/models"), 401, code="invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        await sdk_for(app, "sk-srv-unknown-0000000000000000").chat.completions.create(**chat_body())
    async with client_for(app, key) as client:
        assert (await post_chat(client)).status_code == 200


async def test_expired_key_is_401(gateway) -> None:
    app = gateway(auth={"enabled": True})
    store = raw_store(app)
    key, record = await create_key(store, "old", expires_in_days=30)
    async with client_for(app, key) as client:
        assert (await post_chat(client)).status_code == 200
    auth_ = app.state.services.auth
    auth_._verified.clear()  # forget that it was verified a moment ago
    await store.key_put(digest(key), {**record, "expires_at": time.time() - 1})
    async with client_for(app, key) as client:
        assert_envelope(await post_chat(client), 401, code="invalid_api_key")
        assert_envelope(await client.get("/v1/models"), 401, code="invalid_api_key")


async def test_key_stops_working_at_its_expiry(gateway) -> None:
    app = gateway(auth={"enabled": True})
    key, _ = await create_key(raw_store(app), "short-lived", expires_in_days=1.0 / 86400)  # one second
    async with client_for(app, key) as client:
        assert (await post_chat(client)).status_code == 200
        await asyncio.sleep(1.2)
        assert_envelope(await post_chat(client), 401, code="invalid_api_key")


async def test_model_outside_the_keys_scope_is_404_without_leaking_names(gateway) -> None:
    app = gateway(auth={"enabled": True})
    key, _ = await create_key(raw_store(app), "tiny-only", models=["tiny"])
    async with client_for(app, key) as client:
        assert (await post_chat(client, model="tiny")).status_code == 200
        forbidden = await post_chat(client, model="other")
        unknown = await post_chat(client, model="no-such-model")
        error = assert_envelope(forbidden, 404, code="model_not_found")
        assert error["param"] == "model"
        # exactly the answer for a model that does not exist: nothing tells the two apart
        assert error["message"] == unknown.json()["error"]["message"].replace("no-such-model", "other")
        assert "tiny" not in forbidden.text and "embedder" not in forbidden.text
        assert_envelope(await post_chat(client, model="tiny-lora"), 404, code="model_not_found")
        response = await client.post("/v1/embeddings", json={"model": "embedder", "input": "x"})
        assert_envelope(response, 404, code="model_not_found")
        assert "tiny" not in response.text

        listed = (await client.get("/v1/models")).json()
        assert [m["id"] for m in listed["data"]] == ["tiny"]
        assert (await client.get("/v1/models/tiny")).status_code == 200
        assert_envelope(await client.get("/v1/models/other"), 404, code="model_not_found")
    engines = app.state.services.registry.engines
    assert len(engines["other"].started) == 0 and len(engines["embedder"].started) == 0

    sdk = sdk_for(app, key)
    assert [m.id async for m in sdk.models.list()] == ["tiny"]
    with pytest.raises(openai.NotFoundError):
        await sdk.chat.completions.create(**chat_body(model="other"))


async def test_key_with_all_models_lists_all(gateway) -> None:
    app = gateway(auth={"enabled": True})
    key, _ = await create_key(raw_store(app), "everything")
    sdk = sdk_for(app, key)
    assert sorted([m.id async for m in sdk.models.list()]) == ["embedder", "other", "tiny", "tiny-lora"]
    answer = await sdk.chat.completions.create(**chat_body(model="tiny-lora"))
    assert answer.model == "tiny-lora"


async def test_keys_from_the_configuration_work(gateway, redis_client) -> None:
    app = gateway(auth={"enabled": True, "keys": [{"name": "embed-only", "key": CONFIG_KEY, "models": ["embedder"]}]})
    sdk = sdk_for(app, CONFIG_KEY)
    result = await sdk.embeddings.create(model="embedder", input=["hello world"])
    assert len(result.data[0].embedding) == 8
    assert [m.id async for m in sdk.models.list()] == ["embedder"]
    with pytest.raises(openai.NotFoundError):
        await sdk.chat.completions.create(**chat_body())
    with pytest.raises(openai.AuthenticationError):
        await sdk_for(app, CONFIG_KEY[:-1]).embeddings.create(model="embedder", input="x")
    assert redis_client.hlen("serving:keys") == 0  # configuration keys are not copied into Redis


async def test_revoked_key_stops_working(gateway, monkeypatch) -> None:
    monkeypatch.setattr(auth, "VERIFIED_TTL_S", 0.0)
    app = gateway(auth={"enabled": True})
    store = raw_store(app)
    key, _ = await create_key(store, "leaver")
    other, _ = await create_key(store, "stayer")
    async with client_for(app, key) as client:
        assert (await post_chat(client)).status_code == 200
        await revoke_key(store, "leaver")
        assert_envelope(await post_chat(client), 401, code="invalid_api_key")
    async with client_for(app, other) as client:
        assert (await post_chat(client)).status_code == 200


async def test_revocation_takes_effect_within_verified_ttl(gateway, monkeypatch) -> None:
    monkeypatch.setattr(auth, "VERIFIED_TTL_S", 0.5)
    app = gateway(auth={"enabled": True})
    store = raw_store(app)
    key, _ = await create_key(store, "leaver")
    async with client_for(app, key) as client:
        assert (await post_chat(client)).status_code == 200
        await revoke_key(store, "leaver")
        revoked_at = time.monotonic()
        while (await post_chat(client)).status_code == 200:
            assert time.monotonic() - revoked_at < 0.5 + 0.3, "revoked key still accepted after VERIFIED_TTL_S"
            await asyncio.sleep(0.05)
        assert_envelope(await post_chat(client), 401, code="invalid_api_key")


async def test_auth_off_needs_no_key(gateway) -> None:
    app = gateway(auth={"enabled": False})
    async with client_for(app) as client:
        assert (await post_chat(client)).status_code == 200
        listed = (await client.get("/v1/models")).json()
        assert sorted(m["id"] for m in listed["data"]) == ["embedder", "other", "tiny", "tiny-lora"]
    async with client_for(app, "anything-at-all") as client:
        assert (await post_chat(client, model="other")).status_code == 200
