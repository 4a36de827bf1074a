"""Fault suite on the real app: a replica killed mid-stream, overload, a redeploy under load, bad input.

Marked `fault`; conftest runs these after every other integration test, since they disturb the
shared platform (a replica is killed and replaced, the application is redeployed).
Each test prints what a client saw (sent / succeeded / failed) for the issue note.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import psutil
import pytest

from tests.integration.conftest import API_KEY, NO_CACHE

pytestmark = [pytest.mark.integration, pytest.mark.fault]

AUTH = {"authorization": f"Bearer {API_KEY}", **NO_CACHE}
# ignore_eos (vLLM's sampling parameter): the length is max_tokens on every CPU; greedy decoding of the random
# demo model reaches its end-of-sequence token at a place that differs with the CPU's float arithmetic
LONG = {"model": "demo-chat-b", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 900,
        "temperature": 0, "ignore_eos": True, "stream": True}


def replicas(deployment: str) -> list[dict]:
    """The live replica actors of a deployment (each model has an application of its own)."""
    import ray._private.state as state

    app = "serving" if deployment == "gateway" else deployment
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [a for a in state.actors().values() if (a.get("Name") or "").startswith(prefix) and a["State"] == "ALIVE"]


def replica_names(deployment: str) -> set[str]:
    return {a["Name"] for a in replicas(deployment)}


def _running(deployment: str) -> int:
    """Running replicas as Ray Serve's controller counts them (a loading replica is not running)."""
    from ray import serve

    app = serve.status().applications[deployment]
    return app.deployments[deployment].replica_states.get("RUNNING", 0)


def wait_until(predicate, timeout: float, step: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def test_replica_killed_mid_stream(platform, client):
    import ray

    victim = replicas("model-demo-chat-b")
    assert len(victim) == 1
    events, started = [], time.monotonic()
    with httpx.Client(base_url=platform, timeout=60, headers=AUTH) as http:
        with http.stream("POST", "/chat/completions", json=LONG) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            events = [next(lines) for _ in range(6)]
            ray.kill(ray.get_actor(victim[0]["Name"], namespace="serve"), no_restart=True)
            killed = time.monotonic()
            events += [line for line in lines if line]
    ended = time.monotonic()
    assert events[-1] == "data: [DONE]"
    assert '"error"' in events[-2]  # the stream says why it ended, in-band
    assert ended - killed < 15, f"the stream hung for {ended - killed:.1f}s"
    # while the replacement loads: /ready names the model, and its requests get 503 + Retry-After at once
    root = platform.removesuffix("/v1")
    ready = None

    def not_ready() -> bool:
        nonlocal ready
        ready = httpx.get(f"{root}/ready", timeout=10, headers=AUTH)  # names only for a key that may see them
        return ready.status_code == 503

    assert wait_until(not_ready, timeout=30), ready.text
    assert ready.json()["models"]["demo-chat-b"] is False and "demo-chat-b" in ready.json()["error"]["message"]
    loading = None

    def refused() -> bool:
        # Each gateway replica refreshes its view of the replicas every 2 s: one whose view is still
        # stale admits the request, and Ray's router holds it until a replica is back. Such a request
        # is given up after 3 s here (the disconnect cancels it), and the next try meets the refusal.
        nonlocal loading
        try:
            loading = httpx.post(f"{platform}/chat/completions", headers=AUTH, timeout=3,
                                 json={**LONG, "stream": False, "max_tokens": 4})
        except httpx.TimeoutException:
            return False
        return loading.status_code == 503

    assert wait_until(refused, timeout=20, step=0.2), loading and loading.text
    # other models are not affected while demo-chat-b is down
    other = client.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4)
    assert other.choices[0].message.content
    assert loading.status_code == 503 and loading.headers["retry-after"] == "5", loading.text
    assert loading.json()["error"]["code"] == "model_not_ready"
    # Ray Serve replaces the replica; the SDK's own retries carry a request through
    assert wait_until(lambda: replicas("model-demo-chat-b")
                      and replicas("model-demo-chat-b")[0]["Name"] != victim[0]["Name"], timeout=240)
    # the replacement actor exists at once; loading its engine takes 20-60 s here, past the SDK's retries
    assert wait_until(lambda: _running("model-demo-chat-b") == 1, timeout=240)
    patient = openai.OpenAI(base_url=platform, api_key=API_KEY, max_retries=8, timeout=120, default_headers=NO_CACHE)
    again = patient.chat.completions.create(model="demo-chat-b", messages=[{"role": "user", "content": "back?"}],
                                            max_tokens=4)
    assert again.choices[0].message.content
    print(f"\nreplica kill: 1 stream cut after {killed - started:.1f}s, ended in-band {ended - killed:.2f}s later;"
          f" /ready 503 naming demo-chat-b; non-streamed during the reload: {loading.status_code}"
          f" {loading.json()['error']['code']}; after replacement: 200 (SDK retries)")


async def _flood(platform: str, n: int, body: dict) -> list[tuple[int, float, str]]:
    async def one(http: httpx.AsyncClient) -> tuple[int, float, str]:
        started = time.monotonic()
        async with http.stream("POST", "/chat/completions", json=body) as response:
            status, retry = response.status_code, response.headers.get("retry-after", "")
            async for _ in response.aiter_bytes():
                if status != 200:
                    break
            return status, time.monotonic() - started, retry

    async with httpx.AsyncClient(base_url=platform, timeout=300, headers=AUTH,
                                 limits=httpx.Limits(max_connections=n)) as http:
        return await asyncio.gather(*(one(http) for _ in range(n)))


def test_overload_is_refused_at_once_and_gateway_memory_stays_flat(platform, platform_config):
    model = platform_config.model("demo-chat-b")
    capacity = model.max_ongoing_requests + model.max_queued_requests * platform_config.gateway.replicas
    gateways = [psutil.Process(a["Pid"]) for a in replicas("gateway")]
    rss_before = sum(p.memory_info().rss for p in gateways)
    body = {**LONG, "max_tokens": 120}
    results = []
    for _ in range(3):  # a sustained overload, not one burst
        results += asyncio.run(_flood(platform, 3 * capacity, body))
    rss_after = sum(p.memory_info().rss for p in gateways)
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    assert len(ok) + len(refused) == len(results), {r[0] for r in results}
    assert ok and refused
    assert all(r[2] for r in refused)  # Retry-After on every refusal
    assert max(r[1] for r in refused) < 5  # refused at once, not after waiting in a queue
    growth = (rss_after - rss_before) / 2**20
    assert growth < 50, f"gateway memory grew {growth:.0f} MiB under overload"
    print(f"\noverload: sent {len(results)}, succeeded {len(ok)}, refused 503 {len(refused)} "
          f"(slowest refusal {max(r[1] for r in refused):.2f}s); gateway RSS {rss_before / 2**20:.0f} -> "
          f"{rss_after / 2**20:.0f} MiB")


class Load:
    """Clients sending requests in threads until stopped; every answer is recorded as
    (model, status), a stream that ended without `data: [DONE]` as status 599."""

    def __init__(self, platform: str, work: list[tuple[str, dict]], threads: int):
        self.platform, self.work = platform, work
        self.results: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        time.sleep(2)
        assert self.results, "no request finished before the change"
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=180)

    def _run(self) -> None:
        with httpx.Client(base_url=self.platform, timeout=120, headers=AUTH) as http:
            while not self._stop.is_set():
                for path, body in self.work:
                    self.results.append((body["model"], self._one(http, path, body)))

    @staticmethod
    def _one(http: httpx.Client, path: str, body: dict) -> int:
        try:
            if not body.get("stream"):
                return http.post(path, json=body).status_code
            with http.stream("POST", path, json=body) as stream:
                text = "".join(stream.iter_text())
            return stream.status_code if text.endswith("data: [DONE]\n\n") and '"error"' not in text else 599
        except httpx.HTTPError:
            return 598

    def failed(self, model: str | None = None) -> list[tuple[str, int]]:
        return [r for r in self.results if r[1] != 200 and (model is None or r[0] == model)]

    def summary(self) -> str:
        failed = len(self.failed())
        return f"sent {len(self.results)}, succeeded {len(self.results) - failed}, failed {failed}"


CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "steady"}], "max_tokens": 40, "stream": True}
EMBED = {"model": "all-minilm-l6-v2", "input": "steady"}


def test_one_model_changed_restarts_that_model_alone(platform, deployed):
    """On the KubeRay path (the Serve config PUT to Serve's REST API): demo-chat-b's engine
    arguments change and the embedding model scales out. demo-chat-b's replica restarts; every other
    replica actor is the same one before and after, and not one request to them fails meanwhile."""
    before = {d: replica_names(d) for d in ("gateway", "model-demo-chat", "model-demo-chat-b",
                                             "model-all-minilm-l6-v2")}
    assert all(before.values()), before
    changed = deployed.config.model_copy(deep=True)
    # an engine argument that changes nothing the later tests rely on (demo-chat-b holds at most 4 requests)
    changed.models[1].engine_args = {**changed.models[1].engine_args, "max_num_seqs": 32}
    changed.models[2].replicas = 2
    started = time.monotonic()
    with Load(platform, [("/chat/completions", CHAT), ("/embeddings", EMBED)], threads=3) as load:
        deployed.apply(changed)
        assert wait_until(lambda: not replica_names("model-demo-chat-b") & before["model-demo-chat-b"], 120)
        time.sleep(2)
    print(f"\none model changed under load ({time.monotonic() - started:.0f}s): {load.summary()}")
    assert load.failed() == []
    assert replica_names("gateway") == before["gateway"]
    assert replica_names("model-demo-chat") == before["model-demo-chat"]
    embed = replica_names("model-all-minilm-l6-v2")
    assert len(embed) == 2 and before["model-all-minilm-l6-v2"] < embed  # scaled in place
    assert len(replica_names("model-demo-chat-b")) == 1  # a new replica, with the new arguments


def test_gateway_roll_under_streaming_load_cuts_no_stream(platform, deployed):
    """A gateway-only change rolls both gateway replicas; each drains (HAProxy stops sending to it,
    it finishes its streams) so no stream is cut and no request fails; no model replica restarts."""
    before = {d: replica_names(d) for d in ("gateway", "model-demo-chat", "model-all-minilm-l6-v2")}
    changed = deployed.config.model_copy(deep=True)
    changed.gateway.max_tools -= 1
    long_chat = {**CHAT, "max_tokens": 150}
    started = time.monotonic()
    with Load(platform, [("/chat/completions", long_chat), ("/embeddings", EMBED),
                         ("/chat/completions", {**long_chat, "stream": False})], threads=4) as load:
        deployed.apply(changed)
        assert wait_until(lambda: not replica_names("gateway") & before["gateway"], 180), "old gateways live on"
        time.sleep(2)
    print(f"\ngateway roll under streaming load ({time.monotonic() - started:.0f}s): {load.summary()}")
    assert load.failed() == []
    assert len(replica_names("gateway")) == 2
    assert replica_names("model-demo-chat") == before["model-demo-chat"]
    assert replica_names("model-all-minilm-l6-v2") == before["model-all-minilm-l6-v2"]


@pytest.mark.parametrize("body, param", [
    ({"model": "demo-chat", "messages": [{"role": "user", "content": "word " * 5000}], "max_tokens": 4}, None),
    ({"model": "demo-chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**7}, "max_tokens"),
    ({"model": "demo-chat", "messages": [{"role": "user", "content": "x"}], "n": 10**6}, "n"),
    ({"model": "demo-chat", "messages": [{"role": "user", "content": "x"}], "temprature": 0}, "temprature"),
    ({"model": "no-such-adapter", "messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "demo-chat", "messages": []}, None),
])
def test_bad_input_gets_a_clear_4xx(http, body, param):
    response = http.post("/v1/chat/completions", json=body)
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert error["message"]
    if param:
        assert param in (error.get("param") or "") + error["message"]


def test_malformed_bodies(http):
    cases = {
        "invalid utf-8": (b'{"model": "demo-chat", "messages": "\xff\xfe"}', 400),
        "deeply nested": (b'{"model": "demo-chat", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400),
        "not json": (b"model=demo-chat", 400),
    }
    for name, (content, status) in cases.items():
        response = http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
        assert response.status_code == status, (name, response.text)
    huge = http.post("/v1/chat/completions", content=b"x" * (5 * 2**20), headers={"content-type": "application/json"})
    assert huge.status_code == 413
    form = http.post("/v1/chat/completions", content=b"a=b",
                     headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415


def test_request_timeout_ends_the_engine_work(platform, deployed):
    """With a gateway request timeout of 1 s a longer generation is cut and aborted."""
    from ray import serve

    changed = deployed.config.model_copy(deep=True)
    changed.gateway.request_timeout_s = 1
    gateways = replica_names("gateway")
    deployed.apply(changed)
    assert wait_until(lambda: not replica_names("gateway") & gateways, 180)
    handle = serve.get_deployment_handle("model-demo-chat-b", app_name="model-demo-chat-b")

    def generated_by(request) -> tuple[httpx.Response, float, float]:
        before = handle.stats.remote().result()
        started = time.monotonic()
        with httpx.Client(base_url=platform, timeout=60, headers=AUTH) as http:
            response = request(http)
        elapsed = time.monotonic() - started
        assert wait_until(lambda: handle.stats.remote().result()["unfinished"] == 0, timeout=15)
        time.sleep(1)
        return response, elapsed, handle.stats.remote().result()["generation_tokens"] - before["generation_tokens"]

    streamed, t_stream, tokens_stream = generated_by(
        lambda http: http.post("/chat/completions", json={**LONG, "max_tokens": 2000}))
    whole, t_whole, tokens_whole = generated_by(
        lambda http: http.post("/chat/completions", json={**LONG, "stream": False, "max_tokens": 2000}))
    events = [line for line in streamed.text.split("\n\n") if line]
    assert streamed.status_code == 200 and events[-1] == "data: [DONE]" and '"timeout"' in events[-2]
    assert whole.status_code == 504 and whole.json()["error"]["code"] == "timeout"
    assert t_stream < 5 and t_whole < 5
    # a request that ran on would generate all 2000 tokens; aborted ones stop where the timeout cut them
    assert tokens_stream < 2000 and tokens_whole < 2000, (tokens_stream, tokens_whole)
    print(f"\ntimeout: 2 requests sent (stream, non-stream), cut after 1 s: in-band timeout + [DONE], 504;"
          f" engine work aborted after {tokens_stream:.0f} and {tokens_whole:.0f} of 2000 tokens")
