"""`serving status` against a local fake of the Kubernetes API server.

The fake is a real HTTP server on 127.0.0.1 answering the REST paths the official `kubernetes`
client calls (the RayService custom object, pods, Secrets, the service proxy to Ray Serve's REST
API); the client is configured by a kubeconfig file, exactly as for a real cluster. Behind the
proxy the fake head checks Ray's token as Ray's dashboard does (401 without it, 403 for a wrong
one), and like the API server it does not pass the Kubernetes `Authorization` header on. The RayService is
the chart's own rendering (deploy/rayservice-example.yaml: the gateways' application `serving` and
one application per model) with a status shaped like KubeRay's, checked against KubeRay's CRD; the
Serve details are checked against Ray's own schema.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import logging
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from serving.k8s import add_status_parser, run_status

ROOT = Path(__file__).resolve().parents[2]
NS, NAME, TOKEN = "serving", "serving", "test-token"
# Ray's token (the chart's <fullname>-ray-token Secret, key auth_token) and the header Ray reads it from
RAY_SECRET, RAY_TOKEN = "serving-ray-token", "rAy-t0ken-4d3f9a6b1c0e8f7a2b5d4c3e1f0a9b8c7d6e5f4a"
RAY_AUTH_HEADER = "x-ray-authorization"
ACTIVE, PENDING = "serving-raycluster-abcde", "serving-raycluster-fghij"
# the example's applications: the gateways', then one per model (named like its one deployment)
GATEWAYS, CHAT, EMBED = "serving", "model-demo-chat", "model-all-minilm-l6-v2"
APPS = (GATEWAYS, CHAT, EMBED)


def example_rayservice() -> dict:
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "rayservice-example.yaml").read_text()) if d]
    (rayservice,) = docs
    rayservice["metadata"].update(namespace=NS, uid="0f0e", generation=1)
    return rayservice


def kuberay_status(chat_app="RUNNING", chat_status="HEALTHY", ready=True, pending=False) -> dict:
    """KubeRay's status: each application with its own deployments (a model's: one, named like it)."""
    apps = {
        GATEWAYS: {"status": "RUNNING", "serveDeploymentStatuses": {"gateway": {"status": "HEALTHY"}}},
        CHAT: {"status": chat_app, "message": "" if chat_app == "RUNNING" else "Deploying app 'model-demo-chat'.",
               "serveDeploymentStatuses": {
                   CHAT: {"status": chat_status, "message": "" if chat_status == "HEALTHY" else "loading weights"}}},
        EMBED: {"status": "RUNNING", "serveDeploymentStatuses": {EMBED: {"status": "HEALTHY"}}},
    }
    status = {
        "serviceStatus": "Running" if ready else "",
        "numServeEndpoints": 2 if ready else 0,
        "observedGeneration": 1,
        "conditions": [
            {"type": "Ready", "status": "True" if ready else "False",
             "reason": "NonZeroServeEndpoints" if ready else "Initializing",
             "message": "", "lastTransitionTime": "2026-11-25T10:00:00Z"},
            {"type": "UpgradeInProgress", "status": "True" if pending else "False",
             "reason": "BothActivePendingClustersExist" if pending else "NoPendingCluster",
             "message": "", "lastTransitionTime": "2026-11-25T10:00:00Z"},
        ],
        "activeServiceStatus": {"rayClusterName": ACTIVE, "applicationStatuses": apps},
    }
    if pending:
        status["pendingServiceStatus"] = {
            "rayClusterName": PENDING,
            "applicationStatuses": {GATEWAYS: {"status": "RUNNING", "serveDeploymentStatuses": {}},
                                    CHAT: {"status": "DEPLOYING", "serveDeploymentStatuses": {}},
                                    EMBED: {"status": "DEPLOYING", "serveDeploymentStatuses": {}}}}
    return status


def serve_details(chat_states=("RUNNING",), embed_states=("RUNNING", "RUNNING")) -> dict:
    """Ray Serve's REST API: every application with its deployments and their replicas."""
    def deployment(name, states, status="HEALTHY", target=None):
        return {"name": name, "status": status, "status_trigger": "CONFIG_UPDATE_COMPLETED", "message": "",
                "deployment_config": {"name": name}, "target_num_replicas": len(states) if target is None else target,
                "required_resources": {"CPU": 1},
                "replicas": [{"replica_id": f"{name}-{i}", "state": s, "start_time_s": 1.0, "node_ip": "10.0.0.2"}
                             for i, s in enumerate(states)]}

    def application(name, status, deployments):
        return {"name": name, "route_prefix": "/" if name == GATEWAYS else None, "docs_path": None,
                "status": status, "message": "", "last_deployed_time_s": 1.0, "source": "declarative",
                "external_scaler_enabled": False, "deployments": {d["name"]: d for d in deployments}}

    chat_ready = all(s == "RUNNING" for s in chat_states)
    return {
        "proxy_location": "EveryNode", "proxies": {},
        "applications": {
            GATEWAYS: application(GATEWAYS, "RUNNING", [deployment("gateway", ["RUNNING"])]),
            CHAT: application(CHAT, "RUNNING" if chat_ready else "DEPLOYING", [
                deployment(CHAT, list(chat_states), "HEALTHY" if chat_ready else "UPDATING", target=1)]),
            EMBED: application(EMBED, "RUNNING", [deployment(EMBED, list(embed_states))]),
        },
    }


def pod(name: str, cluster: str, group: str, ready: bool = True, unschedulable: str = "") -> dict:
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    if unschedulable:
        conditions.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                           "message": unschedulable})
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": {"ray.io/cluster": cluster, "ray.io/group": group}},
            "status": {"phase": "Running" if ready else "Pending", "conditions": conditions}}


def secret(name: str, data: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS}, "type": "Opaque",
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


class FakeKubernetes:
    """The handful of Kubernetes REST paths `serving status` uses, with bearer-token auth."""

    def __init__(self):
        self.rayservices: dict[str, dict] = {}
        self.pods: list[dict] = []
        self.secrets: dict[str, dict] = {}
        self.secret_error: int | None = None  # e.g. 403: no RBAC to get Secrets
        self.serve: dict[str, dict] = {}  # service proxy name ("<svc>:<port>") -> Serve details
        self.ray_token: str | None = RAY_TOKEN  # the token the head's dashboard wants; None: auth off
        self.proxy_error: int | None = None
        self.requests: list[str] = []
        self.proxied_headers: list[dict[str, str]] = []  # what reached the head, lower-case names
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
                code, body = fake.route(url.path, query, self.headers)
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

    def route(self, path: str, query: dict, headers) -> tuple[int, dict]:
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
        if parts[:4] == ["api", "v1", "namespaces", NS] and parts[4:5] == ["secrets"] and len(parts) == 6:
            if self.secret_error:
                return self.secret_error, _status(self.secret_error, "Forbidden")
            if parts[5] in self.secrets:
                return 200, self.secrets[parts[5]]
            return 404, _status(404, "NotFound", f'secrets "{parts[5]}" not found')
        if parts[:4] == ["api", "v1", "namespaces", NS] and parts[4:5] == ["services"] and parts[6:7] == ["proxy"]:
            if self.proxy_error:
                return self.proxy_error, _status(self.proxy_error, "Forbidden")
            # the API server keeps its own credentials: the head never sees Authorization
            forwarded = {k.lower(): v for k, v in headers.items() if k.lower() != "authorization"}
            self.proxied_headers.append(forwarded)
            refused = self.ray_refuses(forwarded)
            if refused:
                return refused
            if parts[5] in self.serve and "/".join(parts[7:]) == "api/serve/applications":
                return 200, self.serve[parts[5]]
            return 503, _status(503, "ServiceUnavailable")
        return 404, _status(404, "NotFound")

    def ray_refuses(self, headers: dict[str, str]) -> tuple[int, dict] | None:
        """Ray's dashboard with token auth (http_token_authentication): Authorization, else
        x-ray-authorization; none -> 401, a wrong one -> 403; with auth off anything passes."""
        if self.ray_token is None:
            return None
        sent = headers.get("authorization") or headers.get(RAY_AUTH_HEADER)
        if not sent:
            return 401, {"error": "Unauthorized: Missing authentication token"}
        if sent != f"Bearer {self.ray_token}":
            return 403, {"error": "Forbidden: Invalid authentication token"}
        return None


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
    fake.secrets[RAY_SECRET] = secret(RAY_SECRET, {"auth_token": RAY_TOKEN})


def test_fixtures_have_the_shapes_kuberay_and_ray_produce():
    import jsonschema
    from ray.serve.schema import ServeInstanceDetails

    crd = yaml.load((ROOT / "tests" / "helm" / "schemas" / "ray.io_rayservices.yaml").read_text(),
                    Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    for status in (kuberay_status(), kuberay_status("DEPLOYING", "UPDATING", ready=False, pending=True)):
        jsonschema.validate({**example_rayservice(), "status": status}, schema)
    ServeInstanceDetails.model_validate(serve_details())
    ServeInstanceDetails.model_validate(serve_details(("STARTING",)))
    # the fixtures name the example's applications, which serving.app's entry points build
    from serving import app as serving_app
    from serving import k8s

    # the chart turns Ray's token auth on and names its Secret, which the fake serves
    auth_options = example_rayservice()["spec"]["rayClusterConfig"]["authOptions"]
    assert auth_options == {"mode": "token", "secretName": RAY_SECRET}
    apps = yaml.safe_load(example_rayservice()["spec"]["serveConfigV2"])["applications"]
    assert tuple(app["name"] for app in apps) == APPS
    assert [app["import_path"] for app in apps] == [
        serving_app.GATEWAY_IMPORT_PATH, serving_app.MODEL_IMPORT_PATH, serving_app.MODEL_IMPORT_PATH]
    assert (k8s.GATEWAY_IMPORT_PATH, k8s.MODEL_IMPORT_PATH) == (
        serving_app.GATEWAY_IMPORT_PATH, serving_app.MODEL_IMPORT_PATH)


def test_a_serving_platform_reports_every_model_ready(fake, kubeconfig, capsys):
    serve_healthy(fake)
    assert run_status(status_cli(kubeconfig, "--name", NAME)) == 0
    out = capsys.readouterr().out
    assert "RayService serving/serving: Ready (Running), 2 serve endpoint(s)" in out
    assert f"cluster {ACTIVE} (active): cpu 1/1 ready, headgroup 1/1 ready" in out
    assert "applications: 3/3 RUNNING" in out
    # one row per model, from its own application (the embedder runs two replicas, the chat model one)
    for line in ("(gateway)         gateway                 HEALTHY  1/1       yes",
                 "demo-chat         model-demo-chat         HEALTHY  1/1       yes",
                 "all-minilm-l6-v2  model-all-minilm-l6-v2  HEALTHY  2/2       yes"):
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
    assert status["applications"] == [{"name": app, "status": "RUNNING", "message": ""} for app in APPS]
    rows = [(d["model"], d["application"], d["deployment"]) for d in status["deployments"]]
    assert rows == [("(gateway)", GATEWAYS, "gateway"), ("demo-chat", CHAT, CHAT), ("all-minilm-l6-v2", EMBED, EMBED)]
    by_model = {d["model"]: d for d in status["deployments"]}
    assert by_model["demo-chat"]["adapters"] == ["demo-chat-lora"] and by_model["all-minilm-l6-v2"]["adapters"] == []
    assert by_model["demo-chat"]["replica_states"] == {"RUNNING": 1}
    assert by_model["all-minilm-l6-v2"]["replica_states"] == {"RUNNING": 2}
    assert by_model["all-minilm-l6-v2"]["replicas_target"] == 2


def test_a_loading_model_and_an_unschedulable_pod_are_reported(fake, kubeconfig, capsys):
    """One model's application redeploys (its replica loads); the other model and the gateways run on."""
    serve_healthy(fake, chat_app="DEPLOYING", chat_status="UPDATING")
    fake.pods.append(pod("serving-cpu-z", ACTIVE, "cpu", ready=False,
                         unschedulable="0/3 nodes are available: 3 Insufficient cpu."))
    fake.serve[f"{NAME}-head-svc:dashboard"] = serve_details(("STARTING",))
    assert run_status(status_cli(kubeconfig)) == 1
    out = capsys.readouterr().out
    assert "RayService serving/serving: Ready (Running)" in out  # the gateway Service still serves
    assert "cpu 1/2 ready" in out and "waiting: serving-cpu-z: 0/3 nodes are available: 3 Insufficient cpu." in out
    assert "applications: 2/3 RUNNING (model-demo-chat DEPLOYING)" in out
    assert "application model-demo-chat: DEPLOYING - Deploying app 'model-demo-chat'." in out
    assert "demo-chat         model-demo-chat         UPDATING  0/1 (1 STARTING)  no" in out
    assert "all-minilm-l6-v2  model-all-minilm-l6-v2  HEALTHY   2/2               yes" in out
    assert "(gateway)         gateway                 HEALTHY   1/1               yes" in out


def test_a_platform_not_yet_serving(fake, kubeconfig, capsys):
    serve_healthy(fake, chat_app="DEPLOYING", chat_status="UPDATING", ready=False)
    fake.serve[f"{NAME}-head-svc:dashboard"] = serve_details(("STARTING",))
    assert run_status(status_cli(kubeconfig, "-o", "json")) == 1
    status = json.loads(capsys.readouterr().out)
    assert status["serving"] is False and status["ready"] is False
    assert [d["ready"] for d in status["deployments"]] == [True, False, True]


def test_an_upgrade_shows_both_clusters(fake, kubeconfig, capsys):
    serve_healthy(fake, pending=True)
    fake.pods.append(pod("serving-new-head", PENDING, "headgroup", ready=False))
    assert run_status(status_cli(kubeconfig)) == 0  # traffic is still served by the active cluster
    out = capsys.readouterr().out
    assert "upgrade in progress" in out
    assert (f"cluster {PENDING} (pending): headgroup 0/1 ready; "
            "applications 1/3 RUNNING (model-demo-chat DEPLOYING, model-all-minilm-l6-v2 DEPLOYING)") in out


def test_without_access_to_ray_serve_the_spec_and_kuberay_statuses_are_used(fake, kubeconfig, capsys):
    serve_healthy(fake, chat_app="DEPLOYING", chat_status="UPDATING")
    fake.proxy_error = 403
    assert run_status(status_cli(kubeconfig, "-o", "json")) == 1
    status = json.loads(capsys.readouterr().out)
    assert status["replicas_source"] == "spec (Ray Serve API unavailable: 403 Forbidden)"
    by_model = {d["model"]: d for d in status["deployments"]}
    # each model's status from its own application in KubeRay's status, targets from its own args
    chat, embed = by_model["demo-chat"], by_model["all-minilm-l6-v2"]
    assert (chat["status"], chat["message"], chat["ready"]) == ("UPDATING", "loading weights", False)
    assert (embed["status"], embed["ready"]) == ("HEALTHY", True)
    assert chat["replicas_running"] is None and chat["replicas_target"] == "1"
    assert by_model["(gateway)"]["status"] == "HEALTHY" and by_model["(gateway)"]["replicas_target"] == "1"
    assert [a["status"] for a in status["applications"]] == ["RUNNING", "DEPLOYING", "RUNNING"]


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
    assert run_status(status_cli(kubeconfig, "--name", "someone-else")) == 2
    assert "RayService someone-else runs no serving.app:gateway_builder application" in capsys.readouterr().err


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


# Ray's token auth: the dashboard behind the service proxy wants the token


def test_the_ray_token_is_sent_and_the_replicas_are_read(fake, kubeconfig, capsys, caplog):
    caplog.set_level(logging.DEBUG)  # the kubernetes client and urllib3 log at debug: not the token either
    serve_healthy(fake)
    assert run_status(status_cli(kubeconfig, "-o", "json")) == 0
    captured = capsys.readouterr()
    status = json.loads(captured.out)
    assert status["replicas_source"] == "ray-serve"
    assert {d["model"]: d["replicas_running"] for d in status["deployments"]} == {
        "(gateway)": 1, "demo-chat": 1, "all-minilm-l6-v2": 2}
    assert f"/api/v1/namespaces/{NS}/secrets/{RAY_SECRET}" in fake.requests
    assert [h.get(RAY_AUTH_HEADER) for h in fake.proxied_headers] == [f"Bearer {RAY_TOKEN}"]
    for text in (captured.out, captured.err, caplog.text):
        assert RAY_TOKEN not in text


def test_a_wrong_token_is_refused_and_not_printed(fake, kubeconfig, capsys):
    serve_healthy(fake)
    fake.ray_token = "the-token-the-head-really-has"
    assert run_status(status_cli(kubeconfig)) == 0  # KubeRay's statuses still say healthy
    captured = capsys.readouterr()
    assert "replicas from spec (Ray Serve API unavailable: 403 Forbidden)" in captured.out
    assert RAY_TOKEN not in captured.out + captured.err


@pytest.mark.parametrize("setup, reason", [
    (lambda fake: setattr(fake, "secret_error", 403), f"cannot read Secret {RAY_SECRET}: 403 Forbidden"),
    (lambda fake: fake.secrets.clear(), f"cannot read Secret {RAY_SECRET}: 404 Not Found"),
    (lambda fake: fake.secrets.update({RAY_SECRET: secret(RAY_SECRET, {"other": "x"})}),
     f"Secret {RAY_SECRET} has no auth_token"),
    (lambda fake: fake.secrets[RAY_SECRET]["data"].update(auth_token="%%not base64%%"),
     f"Secret {RAY_SECRET}: auth_token is not base64 of text"),
])
def test_without_the_token_secret_the_spec_is_used_with_the_reason(fake, kubeconfig, capsys, setup, reason):
    serve_healthy(fake, chat_app="DEPLOYING", chat_status="UPDATING")
    setup(fake)
    assert run_status(status_cli(kubeconfig, "-o", "json")) == 1
    status = json.loads(capsys.readouterr().out)
    assert status["replicas_source"] == f"spec (Ray Serve API unavailable: {reason})"
    by_model = {d["model"]: d for d in status["deployments"]}
    assert by_model["demo-chat"]["replicas_running"] is None and by_model["demo-chat"]["replicas_target"] == "1"
    assert (by_model["demo-chat"]["status"], by_model["all-minilm-l6-v2"]["status"]) == ("UPDATING", "HEALTHY")
    assert fake.proxied_headers == []  # no tokenless request the head would refuse anyway


@pytest.mark.parametrize("auth_options", [None, {"mode": "disabled"}])
def test_with_token_auth_off_no_secret_is_read_and_no_header_sent(fake, kubeconfig, capsys, auth_options):
    serve_healthy(fake)
    fake.ray_token = None
    cluster = fake.rayservices[NAME]["spec"]["rayClusterConfig"]
    cluster.pop("authOptions")
    if auth_options:
        cluster["authOptions"] = auth_options
    assert run_status(status_cli(kubeconfig, "-o", "json")) == 0
    assert json.loads(capsys.readouterr().out)["replicas_source"] == "ray-serve"
    assert not [r for r in fake.requests if "/secrets/" in r]
    assert len(fake.proxied_headers) == 1 and RAY_AUTH_HEADER not in fake.proxied_headers[0]


def test_token_auth_without_a_secret_name_uses_kuberays_secret(fake, kubeconfig, capsys):
    """KubeRay generates the Secret, named like the RayCluster, when authOptions names none."""
    serve_healthy(fake)
    del fake.rayservices[NAME]["spec"]["rayClusterConfig"]["authOptions"]["secretName"]
    fake.secrets = {ACTIVE: secret(ACTIVE, {"auth_token": RAY_TOKEN})}
    assert run_status(status_cli(kubeconfig, "-o", "json")) == 0
    assert json.loads(capsys.readouterr().out)["replicas_source"] == "ray-serve"
    assert [h.get(RAY_AUTH_HEADER) for h in fake.proxied_headers] == [f"Bearer {RAY_TOKEN}"]
