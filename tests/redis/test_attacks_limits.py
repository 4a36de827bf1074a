"""Attacks on keys and limits, against the real gateway app on a real Redis (fake engines, no Ray).

Issue 13, item 2: a flood of random keys must not switch Redis off for everyone (unknown keys are
remembered, each address may try only so many, a busy pool waits, and only Redis faults open the
breaker). Item 6: one key must not take a model (caps on concurrency, `n` and `max_tokens`; TPM
reserved at admission so concurrent requests cannot overshoot it; slots released however a request
ends; another key's TTFT holds while one key floods).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import statistics
import time
from collections import Counter

import httpx
import pytest

from serving.engine.fake import FakeEngine
from serving.engine.protocol import EngineUnavailable
from serving.gateway.auth import create_key, digest
from serving.gateway.limits import BYTES_PER_TOKEN
from serving.gateway.store import MemoryStore, RedisStore, Resilient, StoreBusy, StoreUnavailable
from tests.redis.support import (
    PROMPT_TOKENS,
    assert_envelope,
    chat_body,
    client_for,
    make_engines,
    post_chat,
    ratelimit_headers,
    settle,
    stream_and_hang_up,
    wait_for,
)
from tests.redis.test_limits import keys_cli

FLOOD = 300
# the platform's defaults: what the attack met on a running platform
DEFAULT_REDIS = {"timeout_s": 0.25, "retry_interval_s": 2.0}


def random_key() -> str:
    return "sk-srv-" + secrets.token_urlsafe(32)


def client_from(app, address: str, key: str | None = None) -> httpx.AsyncClient:
    """A client whose requests come from `address` (what the gateway sees as the source)."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(address, 40000)),
                             base_url="http://test", headers=headers, timeout=30)


class CountingStore(RedisStore):
    """A RedisStore that counts key lookups (to see which requests reached Redis)."""

    lookups = 0

    async def key_get(self, digest_: str):
        self.lookups += 1
        return await super().key_get(digest_)


# ---- item 2: a flood of bad keys ------------------------------------------------------------------


async def test_flood_of_random_keys_leaves_redis_to_valid_keys(gateway) -> None:
    """Before the fix (same test): 64 x 401, 236 x 503 auth_unavailable, the valid key's requests then
    bypassed the cache and its limits (fail-open), 236 store errors, breaker open."""
    app = gateway(auth={"enabled": True}, redis=DEFAULT_REDIS)
    resilient = app.state.services.store
    valid, _ = await create_key(resilient.store, "valid", rpm=10_000, tpm=10_000_000)
    fresh, _ = await create_key(resilient.store, "fresh", rpm=10_000, tpm=10_000_000)  # first used mid-flood
    async with client_for(app, valid) as good, client_for(app, fresh) as newcomer, client_for(app) as anyone:
        assert (await post_chat(good)).status_code == 200
        await settle(app)  # its answer is cached now

        async def attack() -> httpx.Response:
            return await post_chat(anyone, headers={"authorization": f"Bearer {random_key()}"})

        async def use() -> httpx.Response:
            await asyncio.sleep(0.01)
            return await post_chat(good)

        async def arrive() -> httpx.Response:
            await asyncio.sleep(0.01)
            return await post_chat(newcomer)

        results = await asyncio.gather(*(attack() for _ in range(FLOOD)), *(use() for _ in range(10)),
                                       *(arrive() for _ in range(3)))
        flood, during = results[:FLOOD], results[FLOOD:]
        after = [await post_chat(good) for _ in range(5)]
    statuses = Counter(r.status_code for r in flood)
    codes = Counter(r.json()["error"]["code"] for r in flood if r.status_code != 200)
    print(f"\nflood of {FLOOD} random keys: statuses {dict(statuses)}, codes {dict(codes)}; "
          f"valid key during: {[(r.status_code, r.headers.get('x-cache')) for r in during]}; "
          f"after: {[(r.status_code, r.headers.get('x-cache')) for r in after]}; "
          f"store errors {resilient.errors}, busy {resilient.busy}, "
          f"breaker {'closed' if resilient.available else 'open'}")
    # Unknown keys are refused. A lookup that is late because this one event loop is saturated by the
    # flood itself (a slow CPU: asyncio's timer fires before the loop reads Redis' answer) refuses its
    # unknown key with 503 auth_unavailable instead of 401 — never a 200, never another 5xx; what the
    # fix guarantees is below: no store error, the breaker closed, valid keys served with their limits.
    assert set(statuses) <= {401, 429, 503} and statuses[401] + statuses[503] >= FLOOD - statuses[429]
    assert set(codes) <= {"invalid_api_key", "too_many_failed_attempts", "auth_unavailable"}, codes
    assert all(r.headers.get("retry-after") for r in flood if r.status_code in (429, 503))
    # during the flood a call may be late on a loaded machine (that request goes on without Redis); none fails
    assert [r.status_code for r in during] == [200] * len(during)
    for response in after:
        assert response.status_code == 200 and response.headers["x-cache"] == "hit"
        assert ratelimit_headers(response)  # counted in Redis, not let through by the fail-open policy
    assert resilient.errors == 0 and resilient.available


async def test_each_address_may_try_only_so_many_unknown_keys(gateway, redis_url) -> None:
    store = CountingStore(redis_url)
    app = gateway(auth={"enabled": True}, limits={"failed_auth_per_source": 5, "window_s": 2}, store=store)
    known, _ = await create_key(store, "known")
    unseen, _ = await create_key(store, "unseen")
    async with client_from(app, "10.0.0.1", known) as client:
        assert (await post_chat(client)).status_code == 200  # verified on this replica
    async with client_from(app, "10.0.0.1") as attacker:
        answers = [await post_chat(attacker, headers={"authorization": f"Bearer {random_key()}"}) for _ in range(8)]
        # the same wrong key again: remembered, not looked up again
        wrong = random_key()
        lookups = store.lookups
        assert_envelope(await post_chat(attacker, headers={"authorization": f"Bearer {wrong}"}), 429,
                        code="too_many_failed_attempts")
    assert [r.status_code for r in answers] == [401] * 5 + [429] * 3
    refused = assert_envelope(answers[-1], 429, code="too_many_failed_attempts")
    assert "invalid" not in refused["message"].lower() or "unknown" in refused["message"]
    assert 1 <= int(answers[-1].headers["retry-after"]) <= 2
    assert store.lookups == lookups == 1 + 5  # the known key once, then 5 attempts: the 429s cost no lookup
    async with client_from(app, "10.0.0.1", known) as client:  # a key verified before is never held back
        assert (await post_chat(client)).status_code == 200
    async with client_from(app, "10.0.0.2") as elsewhere:  # another address has its own budget
        assert_envelope(await post_chat(elsewhere, headers={"authorization": f"Bearer {wrong}"}), 401,
                        code="invalid_api_key")
        assert store.lookups == lookups + 1
        assert_envelope(await post_chat(elsewhere, headers={"authorization": f"Bearer {wrong}"}), 401,
                        code="invalid_api_key")
        assert store.lookups == lookups + 1  # remembered as unknown: no second lookup
    async with client_from(app, "10.0.0.2", unseen) as client:
        assert (await post_chat(client)).status_code == 200
    await asyncio.sleep(2.1)  # the address's window is over
    async with client_from(app, "10.0.0.1", unseen) as client:
        assert (await post_chat(client)).status_code == 200


async def test_a_burst_of_lookups_from_one_address_is_bounded(gateway, redis_url) -> None:
    """Concurrent unknown keys from one address: at most MAX_LOOKUPS_PER_SOURCE lookups at once reach
    Redis, the rest are 429 at once; one new valid key asked by many at once is looked up once."""
    from serving.gateway.auth import MAX_LOOKUPS_PER_SOURCE

    store = CountingStore(redis_url)
    # the bound is part of the per-address budget, which is off by default (see failed_auth_per_source)
    app = gateway(auth={"enabled": True}, limits={"failed_auth_per_source": 100}, store=store)
    fresh, _ = await create_key(store, "fresh")
    async with client_from(app, "10.0.0.3") as attacker:
        answers = await asyncio.gather(*(post_chat(attacker, headers={"authorization": f"Bearer {random_key()}"})
                                         for _ in range(40)))
    statuses = Counter(r.status_code for r in answers)
    assert set(statuses) <= {401, 429} and statuses[401] <= MAX_LOOKUPS_PER_SOURCE + 1
    lookups = store.lookups
    async with client_from(app, "10.0.0.4", fresh) as client:
        answers = await asyncio.gather(*(post_chat(client) for _ in range(20)))
    assert [r.status_code for r in answers] == [200] * 20
    assert store.lookups == lookups + 1


async def test_a_full_pool_waits_instead_of_failing(redis_url) -> None:
    """Before: redis-py's pool raised MaxConnectionsError at once when all connections were busy."""
    store = RedisStore(redis_url, max_connections=2, pool_timeout_s=5)
    try:
        await store.key_put("d", {"name": "x"})
        results = await asyncio.gather(*(store.key_get("d") for _ in range(200)))
    finally:
        await store.close()
    assert results == [{"name": "x"}] * 200


async def test_waiting_for_a_turn_never_opens_the_breaker() -> None:
    class Slow(MemoryStore):
        async def key_get(self, digest_: str):
            await asyncio.sleep(0.3)
            return None

    resilient = Resilient(Slow(), timeout_s=1, retry_interval_s=5, max_concurrency=1, wait_s=0.05)
    results = await asyncio.gather(*(resilient.call("key_get", str(i)) for i in range(5)), return_exceptions=True)
    assert results[0] is None and all(isinstance(r, StoreBusy) for r in results[1:])
    assert resilient.busy == 4 and resilient.errors == 0 and resilient.available  # the breaker stays closed
    assert await resilient.call("cache_get", "k") is None


async def test_a_late_call_opens_the_breaker_only_if_redis_does_not_answer(redis_url, redis_server) -> None:
    """A busy event loop makes calls late without Redis being at fault: a timeout is a fault only when a
    ping (in the background, at least 1 s) fails too."""

    class Late(RedisStore):
        async def cache_get(self, key: str):
            await asyncio.sleep(0.2)  # as if the loop had been busy elsewhere
            return await super().cache_get(key)

    resilient = Resilient(Late(redis_url), timeout_s=0.05, retry_interval_s=5)
    try:
        for _ in range(3):
            with pytest.raises(StoreUnavailable):
                await resilient.call("cache_get", "k")
        await asyncio.sleep(0.2)  # the ping has answered
        assert resilient.errors == 0 and resilient.available and resilient.busy == 3
        redis_server.pause()  # now Redis itself does not answer
        with pytest.raises(StoreUnavailable):
            await resilient.call("cache_get", "k")
        assert await wait_for(lambda: not resilient.available, timeout=3) and resilient.errors == 1
    finally:
        redis_server.resume()
        await resilient.close()


# ---- item 6: caps on one key ----------------------------------------------------------------------


def leases(redis_client, key: str) -> int:
    return redis_client.zcard(f"serving:rl:lease:{digest(key)}")


def window_tokens(redis_client, key: str) -> int:
    return sum(int(v) for v in redis_client.hgetall(f"serving:rl:tok:{digest(key)}").values())


async def test_n_and_max_tokens_are_capped(gateway) -> None:
    """Before: n=129 was accepted (and any max_tokens)."""
    tiny = FakeEngine("tiny")
    app = gateway(auth={"enabled": True, "keys": [{"name": "cfg", "key": "cfg-key-0123456789abcdef", "max_n": 3}]},
                  limits={"max_tokens": 50}, engines=make_engines(tiny=tiny))
    store = app.state.services.store.store
    plain, _ = await create_key(store, "plain")
    capped, _ = await create_key(store, "capped", max_n=2, max_tokens=5)
    async with client_for(app, plain) as client:
        error = assert_envelope(await post_chat(client, n=129), 400, code="above_limit", param="n")
        assert "16" in error["message"]  # the platform's default
        assert (await post_chat(client, n=1e300)).status_code == 400
        assert_envelope(await post_chat(client, max_tokens=51), 400, code="above_limit", param="max_tokens")
        assert_envelope(await post_chat(client, max_completion_tokens=10**6), 400, code="above_limit",
                        param="max_completion_tokens")
        assert (await post_chat(client, n=16, max_tokens=50)).status_code == 200
    async with client_for(app, capped) as client:
        assert_envelope(await post_chat(client, n=3), 400, code="above_limit", param="n")
        assert_envelope(await post_chat(client, max_tokens=6), 400, code="above_limit", param="max_tokens")
        started = len(tiny.started)
        body = chat_body(temperature=0.5)
        del body["max_tokens"]
        answer = await client.post("/v1/chat/completions", json=body)  # no max_tokens: gets the key's cap
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 5
        completion = await client.post("/v1/completions", json={"model": "tiny", "prompt": "a b"})
        assert completion.json()["usage"]["completion_tokens"] == 5
        assert len(tiny.started) == started + 2  # the refused ones never reached the engine
    async with client_for(app, "cfg-key-0123456789abcdef") as client:  # a configuration key's own cap
        assert_envelope(await post_chat(client, n=4), 400, code="above_limit", param="n")
        assert (await post_chat(client, n=3)).status_code == 200


async def test_serving_keys_sets_and_clears_caps(gateway, redis_url, monkeypatch, capsys) -> None:
    import serving.gateway.auth as auth

    monkeypatch.setenv("SERVING_REDIS__URL", redis_url)
    monkeypatch.setattr(auth, "VERIFIED_TTL_S", 0.0)
    code, out, _ = await keys_cli(capsys, "create", "bob", "--max-concurrent", "3", "--max-n", "2", "--max-tokens", "7")
    assert code == 0
    (key,) = [word for word in out.split() if word.startswith("sk-srv-")]
    code, out, _ = await keys_cli(capsys, "list")
    header, row = out.splitlines()[0].split(), next(line for line in out.splitlines() if line.startswith("bob")).split()
    assert header[:8] == ["name", "key", "models", "rpm", "tpm", "concurrent", "n", "max_tokens"]
    assert row[3:8] == ["-", "-", "3", "2", "7"]
    app = gateway(auth={"enabled": True})
    async with client_for(app, key) as client:
        assert_envelope(await post_chat(client, n=3), 400, code="above_limit", param="n")
        code, _, _ = await keys_cli(capsys, "update", "bob", "--max-n", "none", "--max-tokens", "9", "--tpm", "5000")
        assert code == 0
        assert (await post_chat(client, n=3, max_tokens=9)).status_code == 200
        assert ratelimit_headers(await post_chat(client, max_tokens=9))["x-ratelimit-limit-tokens"] == "5000"
        assert_envelope(await post_chat(client, max_tokens=10), 400, code="above_limit")
    with pytest.raises(SystemExit) as exited:
        await keys_cli(capsys, "update", "bob", "--max-n", "0")
    assert exited.value.code == 2 and "at least 1" in capsys.readouterr().err
    code, _, err = await keys_cli(capsys, "update", "bob")
    assert code == 1 and "nothing to change" in err
    code, _, err = await keys_cli(capsys, "update", "nobody", "--rpm", "3")
    assert code == 1 and "nobody" in err


async def test_concurrent_requests_cannot_overshoot_tpm(gateway, redis_client) -> None:
    """Before: TPM 100, 20 concurrent requests of max_tokens 50 were all admitted and charged 1080 tokens."""
    app = gateway(auth={"enabled": True}, engines=make_engines(tiny=FakeEngine("tiny", itl_s=0.01)))
    body = chat_body(temperature=0.5, max_tokens=50)
    reserved = len(json.dumps(body, separators=(",", ":")).encode()) // BYTES_PER_TOKEN + 50
    tpm = 3 * reserved + 10  # room for the reservations of three at once
    key, _ = await create_key(app.state.services.store.store, "greedy", tpm=tpm)
    async with client_for(app, key) as client:
        answers = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(20)))
    await settle(app)
    admitted = [r for r in answers if r.status_code == 200]
    charged = window_tokens(redis_client, key)
    print(f"\nTPM {tpm}, 20 concurrent requests of max_tokens 50 (reserving {reserved} each): {len(admitted)} "
          f"admitted, {charged} tokens charged")
    assert len(admitted) == 3 and charged == 3 * (PROMPT_TOKENS + 50) <= tpm
    for refused in (r for r in answers if r.status_code != 200):
        error = assert_envelope(refused, 429, code="rate_limit_exceeded")
        assert f"Requested {reserved}" in error["message"] and refused.headers["retry-after"]
    # a request whose reservation alone exceeds TPM can never run: said so, at once
    too_large = assert_envelope(await client_for(app, key).post(
        "/v1/chat/completions", json=chat_body(max_tokens=tpm)), 429, code="request_too_large")
    assert "max_tokens" in too_large["message"]


async def test_concurrency_cap_holds_and_every_ending_releases_the_slot(gateway, redis_client) -> None:
    """Before: no cap (200 concurrent requests of one key were 200 on the engine at once)."""
    slow = FakeEngine("other", ttft_s=0.3, itl_s=0.01)
    app = gateway(auth={"enabled": True}, gateway={"request_timeout_s": 1.0},
                  engines=make_engines(other=slow, embedder=FakeEngine("embedder")))
    key, _ = await create_key(app.state.services.store.store, "two", max_concurrent=2, tpm=100_000)

    async def ended(label: str) -> None:
        await settle(app)
        assert await wait_for(lambda: leases(redis_client, key) == 0), f"{label}: slot still held"

    async with client_for(app, key) as client:
        # the cap: two in flight, a third refused at once, and none of them reached the engine
        first = [asyncio.create_task(post_chat(client, model="other", temperature=0.5)) for _ in range(2)]
        assert await wait_for(lambda: slow.in_flight == 2)
        assert leases(redis_client, key) == 2
        third = assert_envelope(await post_chat(client, model="other"), 429, code="concurrency_limit_exceeded")
        assert "Limit 2" in third["message"]
        assert [(await t).status_code for t in first] == [200, 200]
        await ended("finished")

        # finished: streamed, a cache hit (plain and streamed), an embedding
        assert (await post_chat(client, stream=True)).status_code == 200
        await ended("streamed")
        await settle(app)
        assert (await post_chat(client)).headers["x-cache"] in ("hit", "miss")
        assert (await post_chat(client, stream=True)).headers["x-cache"] == "hit"
        await ended("cache hit")
        assert (await client.post("/v1/embeddings", json={"model": "embedder", "input": "a b"})).status_code == 200
        await ended("embedding")
        tokens_before = window_tokens(redis_client, key)

        # errors: the engine refuses (4xx), fails mid-stream, is unavailable
        assert (await post_chat(client, max_tokens=5000, temperature=0.5)).status_code == 400
        await ended("engine 400")
        assert window_tokens(redis_client, key) == tokens_before  # refunded: nothing was generated
        app.state.services.registry.engines["tiny"] = FakeEngine("tiny", fail_after=2)
        failed = await post_chat(client, stream=True, temperature=0.5)
        assert failed.status_code == 200 and '"error"' in failed.text
        await ended("failed mid-stream")
        assert window_tokens(redis_client, key) == tokens_before + PROMPT_TOKENS + 2  # what it did use

        class Down(FakeEngine):
            async def generate(self, *args, **kwargs):
                raise EngineUnavailable("no replica")
                yield  # never reached: the yield makes generate an async generator

        app.state.services.registry.engines["tiny"] = Down("tiny")
        assert_envelope(await post_chat(client, temperature=0.5), 503, code="model_not_ready")
        await ended("engine unavailable")

        # timeout (1 s, the engine's first token comes after 5 s)
        slow.ttft_s = 5.0
        assert_envelope(await post_chat(client, model="other", temperature=0.5), 504, code="timeout")
        await ended("timeout")
    # the client goes away: mid-stream, and while waiting for a non-streamed answer
    slow.ttft_s, slow.itl_s = 0.0, 0.05
    await stream_and_hang_up(app, chat_body(model="other", stream=True, temperature=0.5, max_tokens=40),
                             after_chunks=3, key=key)
    await ended("client gone mid-stream")
    slow.ttft_s = 5.0
    await stream_and_hang_up(app, chat_body(model="other", temperature=0.5), after_s=0.2, key=key)
    await ended("client gone before a non-streamed answer")
    assert slow.in_flight == 0 and window_tokens(redis_client, key) >= tokens_before


class Slots(FakeEngine):
    """A fake engine that runs `slots` requests at once and queues the rest first come, first served (a
    replica's max_num_seqs, or Ray Serve's max_ongoing_requests)."""

    def __init__(self, name: str, *, slots: int, **kwargs):
        super().__init__(name, **kwargs)
        self.slots = asyncio.Semaphore(slots)

    async def generate(self, route, body, request_id, timeout_s=None, **_routing):
        async with self.slots:
            async for item in super().generate(route, body, request_id, timeout_s):
                yield item


async def first_token_s(app, key: str, body: dict) -> float:
    """Seconds from sending a streamed request to its first answer chunk (raw ASGI: httpx's ASGI
    transport hands over whole responses only)."""
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50001), "server": ("test", 80),
             "headers": [(b"host", b"test"), (b"content-type", b"application/json"),
                         (b"authorization", f"Bearer {key}".encode())]}
    done = asyncio.Event()
    sent = [False]
    first: list[float] = []

    async def receive() -> dict:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200, message
        if message["type"] == "http.response.body" and b'"content":"' in message.get("body", b"") and not first:
            first.append(time.perf_counter())

    started = time.perf_counter()
    await app(scope, receive, send)
    done.set()
    return first[0] - started


async def ttft_p50(app, key: str, runs: int = 8) -> float:
    body = chat_body(stream=True, temperature=0.5, max_tokens=3)
    return statistics.median([await first_token_s(app, key, body) for _ in range(runs)])


@pytest.mark.parametrize("cap", [3, None], ids=["capped", "uncapped"])
async def test_one_key_flooding_does_not_starve_another(gateway, cap) -> None:
    """Engine: 4 requests at once (0.3 s each), the rest queued in order. Key A floods (24 clients
    sending again as soon as answered or refused); key B's TTFT p50 is measured before and during the
    flood. With A capped at 3 in flight, B always finds a free slot; uncapped (the control: this test
    can fail), B waits behind A's queue."""
    engine = Slots("tiny", slots=4, ttft_s=0.05, itl_s=0.025)
    app = gateway(auth={"enabled": True}, limits={"max_concurrent": None}, engines=make_engines(tiny=engine))
    store = app.state.services.store.store
    flooder, _ = await create_key(store, "flooder", max_concurrent=cap)
    victim, _ = await create_key(store, "victim")
    alone = await ttft_p50(app, victim)
    stop = asyncio.Event()
    statuses: Counter = Counter()

    async def flood() -> None:
        async with client_for(app, flooder) as client:
            while not stop.is_set():
                response = await post_chat(client, temperature=0.5, max_tokens=10)
                statuses[response.status_code] += 1
                if response.status_code == 429:
                    await asyncio.sleep(0.05)

    flooders = [asyncio.create_task(flood()) for _ in range(24)]
    await asyncio.sleep(0.5)
    flooded = await ttft_p50(app, victim)
    stop.set()
    await asyncio.gather(*flooders)
    print(f"\nkey B's TTFT p50: alone {alone * 1000:.0f} ms, "
          f"while key A floods ({'cap ' + str(cap) if cap else 'no cap'}): "
          f"{flooded * 1000:.0f} ms; key A's answers {dict(statuses)}")
    if cap:
        assert flooded <= max(3 * alone, alone + 0.15)
        assert statuses[429] > 0 and statuses[200] > 0
    else:
        assert flooded > alone + 0.3  # starved behind the flooder's queue


# ---- item 11 (client part): TLS to an external Redis ------------------------------------------------


def _certificates(tmp_path) -> dict[str, str]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate (openssl)."""
    import subprocess

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, cwd=tmp_path, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca", "-keyout", "ca.key",
        "-out", "ca.crt")
    (tmp_path / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out",
            f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
            "-out", f"{name}.crt", "-extfile", "san.ext")
    return {name: str(tmp_path / name) for name in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


@pytest.fixture
def tls_redis(tmp_path):
    """A redis-server that speaks TLS only and requires a client certificate; yields (url, files)."""
    import shutil
    import subprocess

    from tests.support import free_port

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    files = _certificates(tmp_path)
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path), "--tls-cert-file", files["server.crt"],
         "--tls-key-file", files["server.key"], "--tls-ca-cert-file", files["ca.crt"], "--tls-auth-clients", "yes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        time.sleep(0.3)
        if process.poll() is not None:
            pytest.skip("this redis-server is built without TLS")
        yield f"rediss://localhost:{port}/0", files
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_tls_to_an_external_redis(tls_redis) -> None:
    from serving.config import ConfigError, load_config
    from serving.gateway.store import build_store

    url, files = tls_redis

    def store(**tls):
        return build_store(load_config(data={"redis": {"url": url, **tls}}).redis)

    good = store(tls_ca_file=files["ca.crt"], tls_cert_file=files["client.crt"], tls_key_file=files["client.key"])
    try:
        await good.key_put("d", {"name": "over-tls"})
        assert await good.key_get("d") == {"name": "over-tls"}
    finally:
        await good.close()
    client_cert = {"tls_cert_file": files["client.crt"], "tls_key_file": files["client.key"]}
    refusals = {"CERTIFICATE_VERIFY_FAILED": client_cert,  # the server's CA unknown
                "CERTIFICATE_REQUIRED": {"tls_ca_file": files["ca.crt"]}}  # no client certificate
    for reason, tls in refusals.items():
        bad = store(**tls)
        try:
            with pytest.raises(Exception) as caught:
                await asyncio.wait_for(bad.key_get("d"), 5)
            # TLS 1.3: the server's alert may arrive as a reset before the client reads it
            assert reason in str(caught.value) or (reason == "CERTIFICATE_REQUIRED" and "reset" in str(caught.value))
        finally:
            await bad.close()
    with pytest.raises(ConfigError, match="rediss://"):
        load_config(data={"redis": {"url": "redis://localhost:6379/0", "tls_ca_file": files["ca.crt"]}})
    with pytest.raises(ConfigError, match="go together"):
        load_config(data={"redis": {"url": url, "tls_cert_file": files["client.crt"]}})
