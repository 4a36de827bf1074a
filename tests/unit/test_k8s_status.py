"""`serving status` against a local fake of the Kubernetes API server.

The fake is a real HTTP server on 127.0.0.1 answering the REST paths the official `kubernetes`
client calls (the RayService custom object, pods, the service proxy to Ray Serve's REST API);
the client is configured by a kubeconfig file, exactly as for a real cluster. The RayService is
the chart's own rendering (deploy/rayservice-example.yaml) with a status shaped like KubeRay's,
checked against KubeRay's CRD; the Serve details are checked against Ray's own schema.
"""

from __future__ import annotations

import argparse
import copy
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from serving.k8s import add_status_parser, run_status

ROOT = Path(__file__).resolve().parents[2]
NS, NAME, TOKEN = "serving", "serving", "test-token"
ACTIVE, PENDING = "serving-raycluster-abcde", "serving-raycluster-fghij"


def example_rayservice() -> dict:
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "rayservice-example.yaml").read_text()) if d]
    (rayservice,) = docs
    rayservice["metadata"].update(namespace=NS, uid="0f0e", generation=1)
    return rayservice


def kuberay_status(app_status="RUNNING", model_status="HEALTHY", ready=True, pending=False) -> dict:
    deployments = {"gateway": {"status": "HEALTHY"},
                   "model-demo-chat": {"status": model_status, "message": "" if ready else "loading weights"},
                   "model-all-minilm-l6-v2": {"status": "HEALTHY"}}
    status = {
        "serviceStatus": "Running" if ready else "",
        "numServeEndpoints": 2 if ready else 0,
        "observedGeneration": 1,
        "conditions": [
            {"type": "Ready", "status": "True" if ready else "False", "reason": "NonZeroServeEndpoints" if ready else "Initializing",
             "message": "", "lastTransitionTime": "2026-11-25T10:00:00Z"},
            {"type": "UpgradeInProgress", "status": "True" if pending else "False",
             "reason": "BothActivePendingClustersExist" if pending else "NoPendingCluster",
             "message": "", "lastTransitionTime": "2026-11-25T10:00:00Z"},
        ],
        "activeServiceStatus": {
            "rayClusterName": ACTIVE,
            "applicationStatuses": {"serving": {"status": app_status, "serveDeploymentStatuses": deployments}},
        },
    }
    if pending:
        status["pendingServiceStatus"] = {
            "rayClusterName": PENDING,
            "applicationStatuses": {"serving": {"status": "DEPLOYING", "serveDeploymentStatuses": {}}}}
    return status


def serve_details(model_states=("RUNNING",)) -> dict:
    def deployment(name, states, status="HEALTHY", target=None):
        return {"name": name, "status": status, "status_trigger": "CONFIG_UPDATE_COMPLETED", "message": "",
                "deployment_config": {"name": name}, "target_num_replicas": len(states) if target is None else target,
                "required_resources": {"CPU": 1},
                "replicas": [{"replica_id": f"{name}-{i}", "state": s, "start_time_s": 1.0, "node_ip": "10.0.0.2"}
                             for i, s in enumerate(states)]}

    chat_status = "HEALTHY" if all(s == "RUNNING" for s in model_states) else "UPDATING"
    return {
        "proxy_location": "EveryNode", "proxies": {},
        "applications": {"serving": {
            "name": "serving", "route_prefix": "/", "docs_path": None, "status": "RUNNING", "message": "",
            "last_deployed_time_s": 1.0, "source": "declarative", "external_scaler_enabled": False,
            "deployments": {
                "gateway": deployment("gateway", ["RUNNING"]),
                "model-demo-chat": deployment("model-demo-chat", list(model_states), chat_status, target=1),
                "model-all-minilm-l6-v2": deployment("model-all-minilm-l6-v2", ["RUNNING"]),
            }}},
    }


def pod(name: str, cluster: str, group: str, ready: bool = True, unschedulable: str = "") -> dict:
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    if unschedulable:
        conditions.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable})
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": {"ray.io/cluster": cluster, "ray.io/group": group}},
            "status": {"phase": "Running" if ready else "Pending", "conditions": conditions}}


class FakeKubernetes:
    """The handful of Kubernetes REST paths `serving status` uses, with bearer-token auth."""

    def __init__(self):
        self.rayservices: dict[str, dict] = {}
        self.pods: list[dict] = []
        self.serve: dict[str, dict] = {}  # service proxy name ("<svc>:<port>") -> Serve details
        self.proxy_error: int | None = None
        self.requests: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                fake.requests.append(self.path)
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._send(401, _status(401, "Unauthorized"))
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                code, body = fake.route(url.path, query)
                self._send(code, body)

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def route(self, path: str, query: dict) -> tuple[int, dict]:
        # like the API server: %-escapes in a path segment (e.g. "svc%3Aport") are decoded
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
        if parts[:5] == ["apis", "ray.io", "v1", "namespaces", NS] and parts[5:6] == ["rayservices"]:
            if len(parts) == 6:
                return 200, {"apiVersion": "ray.io/v1", "kind": "RayServiceList", "metadata": {},
                             "items": list(self.rayservices.values())}
            if parts[6] in self.rayservices:
                return 200, self.rayservices[parts[6]]
            return 404, _status(404, "NotFound", f'rayservices.ray.io "{parts[6]}" not found')
        if parts[:4] == ["api", "v1", "namespaces", NS] and parts[4:5] == ["pods"]:
            selector = dict(s.split("=", 1) for s in query.get("labelSelector", [""])[0].split(",") if s)
            items = [p for p in self.pods if selector.items() <= p["metadata"]["labels"].items()]
            return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}
        if parts[:4] == ["api", "v1", "namespaces", NS] and parts[4:5] == ["services"] and parts[6:7] == ["proxy"]:
            if self.proxy_error:
                return self.proxy_error, _status(self.proxy_error, "Forbidden")
            if parts[5] in self.serve and "/".join(parts[7:]) == "api/serve/applications":
                return 200, self.serve[parts[5]]
            return 503, _status(503, "ServiceUnavailable")
        return 404, _status(404, "NotFound")


def _status(code: int, reason: str, message: str = "") -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code,
            "message": message or reason}


@pytest.fixture
def fake():
    server = FakeKubernetes()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture
def kubeconfig(tmp_path, fake) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
        "users": [{"name": "me", "user": {"token": TOKEN}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me", "namespace": NS}}],
    }))
    return path


def status_cli(kubeconfig: Path, *argv: str) -> argparse.Namespace:
    """Parse as the `serving` CLI will once status is wired into it."""
    parser = argparse.ArgumentParser(prog="serving")
    add_status_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["status", "--kubeconfig", str(kubeconfig), *argv])


def serve_healthy(fake: FakeKubernetes, **status) -> None:
    rayservice = example_rayservice()
    rayservice["status"] = kuberay_status(**status)
    fake.rayservices[NAME] = rayservice
    fake.pods = [pod("serving-head-x", ACTIVE, "headgroup"), pod("serving-cpu-y", ACTIVE, "cpu")]
    fake.serve[f"{NAME}-head-svc:dashboard"] = serve_details()


def test_fixtures_have_the_shapes_kuberay_and_ray_produce():
    import jsonschema
    from ray.serve.schema import ServeInstanceDetails

    crd = yaml.load((ROOT / "tests" / "helm" / "schemas" / "ray.io_rayservices.yaml").read_text(),
                    Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    for status in (kuberay_status(), kuberay_status(ready=False, pending=True)):
        jsonschema.validate({**example_rayservice(), "status": status}, schema)
    ServeInstanceDetails.model_validate(serve_details())
    ServeInstanceDetails.model_validate(serve_details(("STARTING",)))


def test_a_serving_platform_reports_every_model_ready(fake, kubeconfig, capsys):
    serve_healthy(fake)
    assert run_status(status_cli(kubeconfig, "--name", NAME)) == 0
    out = capsys.readouterr().out
    assert "RayService serving/serving: Ready (Running), 2 serve endpoint(s)" in out
    assert f"cluster {ACTIVE} (active): cpu 1/1 ready, headgroup 1/1 ready" in out
    assert "application serving: RUNNING" in out
    for line in ("demo-chat         model-demo-chat         HEALTHY  1/1       yes",
                 "all-minilm-l6-v2  model-all-minilm-l6-v2  HEALTHY  1/1       yes"):
        assert line in out, out
    assert "demo-chat serves LoRA adapters: demo-chat-lora" in out
    assert "replicas from ray-serve" in out
    # the real REST paths, with the credentials of the kubeconfig
    assert f"/apis/ray.io/v1/namespaces/{NS}/rayservices/{NAME}" in fake.requests
    decoded = [urllib.parse.unquote(r) for r in fake.requests]
    assert f"/api/v1/namespaces/{NS}/pods?labelSelector=ray.io/cluster={ACTIVE}" in decoded
    proxied = [urllib.parse.unquote(r) for r in fake.requests if "/proxy/" in r]
    assert proxied == [f"/api/v1/namespaces/{NS}/services/{NAME}-head-svc:dashboard/proxy/api/serve/applications/"]


def test_json_output(fake, kubeconfig, capsys):
    serve_healthy(fake)
    assert run_status(status_cli(kubeconfig, "-o", "json")) == 0  # namespace from the context, the only RayService
    status = json.loads(capsys.readouterr().out)
    assert status["ready"] is True and status["namespace"] == NS and status["name"] == NAME
    by_model = {d["model"]: d for d in status["deployments"]}
    assert by_model["demo-chat"]["adapters"] == ["demo-chat-lora"]
    assert by_model["demo-chat"]["replica_states"] == {"RUNNING": 1}
    assert by_model["(gateway)"]["deployment"] == "gateway"


def test_a_loading_model_and_an_unschedulable_pod_are_reported(fake, kubeconfig, capsys):
    serve_healthy(fake, app_status="DEPLOYING", model_status="UPDATING", ready=False)
    fake.pods.append(pod("serving-cpu-z", ACTIVE, "cpu", ready=False,
                         unschedulable="0/3 nodes are available: 3 Insufficient cpu."))
    fake.serve[f"{NAME}-head-svc:dashboard"] = serve_details(("STARTING",))
    assert run_status(status_cli(kubeconfig)) == 1
    out = capsys.readouterr().out
    assert "RayService serving/serving: not serving" in out
    assert "cpu 1/2 ready" in out and "waiting: serving-cpu-z: 0/3 nodes are available: 3 Insufficient cpu." in out
    assert "demo-chat         model-demo-chat         UPDATING  0/1 (1 STARTING)  no" in out


def test_an_upgrade_shows_both_clusters(fake, kubeconfig, capsys):
    serve_healthy(fake, pending=True)
    fake.pods.append(pod("serving-new-head", PENDING, "headgroup", ready=False))
    assert run_status(status_cli(kubeconfig)) == 0  # traffic is still served by the active cluster
    out = capsys.readouterr().out
    assert "upgrade in progress" in out
    assert f"cluster {PENDING} (pending): headgroup 0/1 ready; application DEPLOYING" in out


def test_without_access_to_ray_serve_the_spec_and_kuberay_statuses_are_used(fake, kubeconfig, capsys):
    serve_healthy(fake)
    fake.proxy_error = 403
    assert run_status(status_cli(kubeconfig, "-o", "json")) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["replicas_source"] == "spec (Ray Serve API unavailable: 403 Forbidden)"
    chat = next(d for d in status["deployments"] if d["model"] == "demo-chat")
    assert chat["status"] == "HEALTHY" and chat["replicas_running"] is None and chat["replicas_target"] == "1"


def test_errors_exit_2_with_a_message(fake, kubeconfig, capsys):
    assert run_status(status_cli(kubeconfig, "--name", "nope")) == 2
    assert "404" in capsys.readouterr().err
    serve_healthy(fake)
    other = copy.deepcopy(fake.rayservices[NAME])
    other["metadata"]["name"] = "serving-b"
    fake.rayservices["serving-b"] = other
    unrelated = copy.deepcopy(other)
    unrelated["metadata"]["name"] = "someone-else"
    unrelated["spec"]["serveConfigV2"] = "applications: [{name: x, import_path: other.app:build}]"
    fake.rayservices["someone-else"] = unrelated
    assert run_status(status_cli(kubeconfig)) == 2
    assert "2 serving RayServices in namespace serving (serving, serving-b): pass --name" in capsys.readouterr().err


def test_wrong_credentials_are_an_error(fake, tmp_path, capsys):
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
        "users": [{"name": "me", "user": {"token": "wrong"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}}]}))
    serve_healthy(fake)
    assert run_status(status_cli(path, "--namespace", NS, "--name", NAME)) == 2
    assert "401" in capsys.readouterr().err


def test_no_kubeconfig_and_no_cluster_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(var, raising=False)
    parser = argparse.ArgumentParser(prog="serving")
    add_status_parser(parser.add_subparsers(dest="command", required=True))
    assert run_status(parser.parse_args(["status"])) == 2
    assert "no usable kubeconfig" in capsys.readouterr().err
