"""Issue 13, items 9 and 11 (chart): Ray's control plane is closed and Redis cannot be flooded out.

Each test performs the attack on what the chart renders, with Ray's and Redis' own code where the
decision is theirs (Ray's token middleware and token loader in a subprocess with a pod's resolved
environment, a real redis-server started with the rendered arguments), and sees it fail:

- another pod reaches the Ray dashboard, GCS, Ray Serve's gRPC ports       -> NetworkPolicy (default on)
- a caller without Ray's token submits a job through the dashboard          -> 401 (token auth, default on)
- head and workers disagree on token auth (a worker cannot join)            -> one mode, one Secret everywhere
- a model replica (third-party model code) reads the API keys or the Redis
  password from its environment                                             -> those live on the head only
- a cache flood fills Redis and takes API keys down with it                 -> maxmemory + volatile-lru
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import helm_python as helm
import pytest
import redis
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _generate_available_node_types_from_ray_cr_spec

from tests.helm.render import (
    NAMESPACE,
    RELEASE,
    ROOT,
    applications,
    k8s,
    one,
    render,
    scenario_objects,
    scenario_values,
)
from tests.helm.validate import k8s_errors, pod_template_errors, rayservice_errors
from tests.support import free_port

FULLNAME = f"{RELEASE}-serving"
TOKEN_SECRET = f"{FULLNAME}-ray-token"
RAY_PODS = {"app.kubernetes.io/name": "serving", "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": "ray"}
GATEWAY_RESOURCE = "serving_gateway"
# Secrets only the gateways read (serving.gatewayEnv)
GATEWAY_ONLY = {"SERVING_REDIS__URL", "SERVING_REDIS__PASSWORD", "SERVING_AUTH__KEYS", "SERVING_REDIS__TLS_CA_FILE"}


def cluster_of(objects: list[dict]) -> dict:
    return one(objects, "RayService")["spec"]["rayClusterConfig"]


def ray_containers(objects: list[dict]) -> dict[str, dict]:
    """The Ray container of the head and of each worker group, by group name."""
    cluster = cluster_of(objects)
    out = {"head": cluster["headGroupSpec"]["template"]["spec"]["containers"][0]}
    out.update({g["groupName"]: g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]})
    return out


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# --------------------------------------------------------------------------------------------
# NetworkPolicy: who reaches which port of which pod
# --------------------------------------------------------------------------------------------

def _selects(selector: dict | None, labels: dict) -> bool:
    """Kubernetes label-selector semantics ({} selects everything)."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        present, value = expr["key"] in labels, labels.get(expr["key"])
        op = expr["operator"]
        if (op == "In" and value not in expr["values"]) or (op == "NotIn" and value in expr["values"]) or \
                (op == "Exists" and not present) or (op == "DoesNotExist" and present):
            return False
    return True


def _peer_matches(peer_rule: dict, peer: dict) -> bool:
    if "ipBlock" in peer_rule:
        if "ip" not in peer:
            return False
        ip, block = ipaddress.ip_address(peer["ip"]), peer_rule["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(c) for c in block.get("except", []))
    if "namespace" not in peer:  # an address outside the pod network (node, API server)
        return False
    ns_ok = (_selects(peer_rule["namespaceSelector"], peer["ns_labels"]) if "namespaceSelector" in peer_rule
             else peer["namespace"] == NAMESPACE)
    pod_ok = _selects(peer_rule["podSelector"], peer["labels"]) if "podSelector" in peer_rule else True
    return ns_ok and pod_ok


def reachable(objects: list[dict], target: dict, port: int, peer: dict) -> bool:
    """Whether `peer` may open `port` on a pod labelled `target` under the rendered NetworkPolicies."""
    policies = [o["spec"] for o in objects if o["kind"] == "NetworkPolicy"
                and _selects(o["spec"]["podSelector"], target)
                and "Ingress" in o["spec"].get("policyTypes", ["Ingress"])]
    if not policies:
        return True  # a pod no policy selects accepts everyone
    for policy in policies:
        for rule in policy.get("ingress") or []:
            ports_ok = not rule.get("ports") or any(
                p["port"] <= port <= p.get("endPort", p["port"]) for p in rule["ports"])
            from_ok = "from" not in rule or any(_peer_matches(f, peer) for f in rule["from"])
            if ports_ok and from_ok:
                return True
    return False


def _pod(namespace: str, **labels: str) -> dict:
    return {"namespace": namespace, "ns_labels": {"kubernetes.io/metadata.name": namespace}, "labels": labels}


HEAD = {**RAY_PODS, "ray.io/node-type": "head"}
WORKER = {**RAY_PODS, "ray.io/node-type": "worker"}
REDIS = {"app.kubernetes.io/name": "serving", "app.kubernetes.io/instance": RELEASE,
         "app.kubernetes.io/component": "redis"}
PEERS = {
    "pod in another namespace": _pod("tenant-x", app="curl"),
    "other pod in the release's namespace": _pod(NAMESPACE, app="curl"),
    "prometheus": _pod("monitoring", app="prometheus"),
    "kuberay operator": _pod("kuberay-system", **{"app.kubernetes.io/name": "kuberay-operator"}),
    "ray worker of the release": _pod(NAMESPACE, **WORKER),
}
# gateway, metrics, dashboard (+ job submission), GCS, Ray client, dashboard agent, Serve replica gRPC, any
PORTS = (8000, 8080, 8265, 6379, 10001, 52365, 40000, 12345)
ALL = set(PORTS)


def open_ports(objects: list[dict], target: dict, peer: dict) -> set[int]:
    return {port for port in PORTS if reachable(objects, target, port, peer)}


def test_by_default_only_the_gateway_port_is_open_outside_the_release():
    objects = scenario_objects("default")
    for target in (HEAD, WORKER):
        assert open_ports(objects, target, PEERS["pod in another namespace"]) == {8000}
        assert open_ports(objects, target, PEERS["other pod in the release's namespace"]) == {8000}
        assert open_ports(objects, target, PEERS["prometheus"]) == {8000, 8080}
        assert open_ports(objects, target, PEERS["kuberay operator"]) == {8000, 8265}
        assert open_ports(objects, target, PEERS["ray worker of the release"]) == ALL  # Ray needs them all
        # the API server's service proxy (`serving status`) is not let in unless dashboardFrom says so
        assert not reachable(objects, target, 8265, {"ip": "10.0.0.5"})


def test_the_check_sees_the_attack_succeed_without_the_policy():
    """Before: no NetworkPolicy, every pod in the cluster reaches the dashboard, GCS and gRPC."""
    objects = render({"networkPolicy": {"enabled": False}})
    assert open_ports(objects, HEAD, PEERS["pod in another namespace"]) == ALL
    assert reachable(objects, REDIS, 6379, PEERS["pod in another namespace"])


def test_network_policy_has_exactly_the_intended_rules():
    ray = one(scenario_objects("default"), "NetworkPolicy", "-ray")["spec"]
    assert ray["podSelector"] == {"matchLabels": RAY_PODS} and ray["policyTypes"] == ["Ingress"]
    tcp = lambda *ports: [{"port": p, "protocol": "TCP"} for p in ports]  # noqa: E731
    assert ray["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": RAY_PODS}}]},
        {"from": [{"namespaceSelector": {},
                   "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}],
         "ports": tcp(8265, 8000)},
        {"ports": tcp(8000)},
        {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
         "ports": tcp(8080)},
    ]


def test_redis_accepts_only_the_head_pods(scenario):
    objects = scenario_objects(scenario)
    if not any(o["kind"] == "StatefulSet" for o in objects):
        return  # external Redis: its network is not the chart's
    assert reachable(objects, REDIS, 6379, _pod(NAMESPACE, **HEAD))
    assert reachable(objects, REDIS, 6379, _pod(NAMESPACE, **{**RAY_PODS, "ray.io/node-type": "redis-cleanup"}))
    for peer in ("ray worker of the release", "pod in another namespace", "other pod in the release's namespace",
                 "kuberay operator"):
        assert not reachable(objects, REDIS, 6379, PEERS[peer]), peer


def test_every_scenario_renders_a_policy_that_keeps_rays_ports_in(scenario):
    objects = scenario_objects(scenario)
    for target in (HEAD, WORKER):
        for name, peer in PEERS.items():
            if name != "ray worker of the release":
                assert not open_ports(objects, target, peer) & {6379, 10001, 52365, 40000, 12345}, (scenario, name)


def test_metrics_and_dashboard_peers_are_configurable():
    objects = render({"networkPolicy": {"metricsFrom": [], "dashboardFrom": [{"ipBlock": {"cidr": "10.0.0.0/24"}}]}})
    assert not reachable(objects, HEAD, 8080, PEERS["prometheus"])  # [] closes the metrics port
    assert reachable(objects, HEAD, 8265, {"ip": "10.0.0.5"})  # the API server, for `serving status`
    assert not reachable(objects, HEAD, 6379, {"ip": "10.0.0.5"})


# --------------------------------------------------------------------------------------------
# Ray token auth: on, the same on head and workers, enforced by Ray's own code
# --------------------------------------------------------------------------------------------

def test_token_auth_is_on_and_alike_on_head_and_every_worker_group(scenario):
    objects = scenario_objects(scenario)
    cluster = cluster_of(objects)
    assert cluster["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET}
    assert len(base64.b64decode(one(objects, "Secret", "-ray-token")["data"]["auth_token"])) >= 32
    seen = set()
    for container in ray_containers(objects).values():
        env = env_of(container)
        seen.add((env["RAY_AUTH_MODE"]["value"],
                  json.dumps(env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"], sort_keys=True)))
    assert seen == {("token", json.dumps({"key": "auth_token", "name": TOKEN_SECRET}, sort_keys=True))}
    # KubeRay >= 1.5 validates authOptions.mode token against the Ray version
    assert tuple(int(p) for p in cluster["rayVersion"].split(".")) >= (2, 52, 0)


def test_token_auth_can_be_disabled_but_only_explicitly_everywhere():
    objects = render({"ray": {"auth": {"mode": "disabled"}}})
    cluster = cluster_of(objects)
    assert cluster["authOptions"] == {"mode": "disabled"}
    assert cluster["autoscalerOptions"]["env"] == [{"name": "RAY_AUTH_MODE", "value": "disabled"}]
    for name, container in ray_containers(objects).items():
        env = env_of(container)
        assert env["RAY_AUTH_MODE"]["value"] == "disabled" and "RAY_AUTH_TOKEN" not in env, name
    assert not [o for o in objects if o["metadata"]["name"].endswith("-ray-token")]
    assert not rayservice_errors(k8s(one(objects, "RayService")))


def test_an_existing_token_secret_is_used_by_kuberay_and_every_pod():
    objects = render({"ray": {"auth": {"existingSecret": "my-ray-token"}}})
    assert cluster_of(objects)["authOptions"]["secretName"] == "my-ray-token"
    secrets = {env_of(c)["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]
               for c in ray_containers(objects).values()}
    assert secrets == {"my-ray-token"}
    assert not [o for o in objects if o["metadata"]["name"].endswith("-ray-token")]


def test_token_auth_needs_a_ray_that_has_it():
    with pytest.raises(helm.HelmRenderError, match="needs Ray >= 2.52"):
        render({"ray": {"version": "2.51.0"}})
    render({"ray": {"version": "2.51.0", "auth": {"mode": "disabled"}}})


def _kuberay_pods(objects: list[dict]) -> dict[str, dict]:
    """The Ray containers as KubeRay (ray-operator/controllers/ray/common/pod.go) completes them.

    With authOptions.mode token, SetContainerTokenAuthEnvVars adds RAY_AUTH_MODE=token and
    RAY_AUTH_TOKEN (authOptions.secretName, key auth_token) to the Ray container of the head and of
    every worker, to the autoscaler sidecar and to the workers' wait-gcs-ready init container, each
    only where the variable is not set yet. With authOptions unset or mode disabled it adds nothing.
    The init container starts from a copy of the worker's Ray container env (DefaultWorkerPodTemplate)."""
    cluster = cluster_of(objects)
    containers = {name: json.loads(json.dumps(c)) for name, c in ray_containers(objects).items()}
    if cluster["enableInTreeAutoscaling"]:
        containers["autoscaler"] = {"env": list(cluster.get("autoscalerOptions", {}).get("env", []))}
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    containers["wait-gcs-ready"] = {"env": json.loads(json.dumps(worker.get("env", [])))}
    options = cluster.get("authOptions") or {}
    if options.get("mode") == "token":
        secret = options.get("secretName") or "<raycluster name>"
        for container in containers.values():
            names = {e["name"] for e in container.setdefault("env", [])}
            if "RAY_AUTH_MODE" not in names:
                container["env"].append({"name": "RAY_AUTH_MODE", "value": "token"})
            if "RAY_AUTH_TOKEN" not in names:
                container["env"].append({"name": "RAY_AUTH_TOKEN", "valueFrom": {
                    "secretKeyRef": {"name": secret, "key": "auth_token"}}})
    return containers


def _resolved_env(objects: list[dict], container: dict) -> dict[str, str]:
    """RAY_* variables as the kubelet resolves them (values and the chart's Secrets)."""
    secrets = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "Secret"}
    env = {}
    for var in container.get("env", []):
        if not var["name"].startswith("RAY_AUTH"):
            continue
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = base64.b64decode(secrets[ref["name"]][ref["key"]]).decode()
    return env


PROBE = r"""
import asyncio, json, sys
import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
from ray._private.authentication.http_token_authentication import get_token_auth_middleware
from ray._raylet import AuthenticationTokenLoader

# what `ray start` decides (an unset mode turns token auth on when a token exists), then Ray's own
# dashboard middleware in front of a job-submission-like route and a health route
enabled = maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
header = AuthenticationTokenLoader.instance().get_token_for_http_header() if enabled else {}

async def main():
    async def ok(request):
        return web.Response(text="ran")
    app = web.Application(middlewares=[get_token_auth_middleware(aiohttp, ["/api/gcs_healthz"], ["/static/"])])
    app.router.add_post("/api/jobs/", ok)
    app.router.add_get("/api/gcs_healthz", ok)
    out = {"token_auth": enabled, "header": header}
    async with TestClient(TestServer(app)) as client:
        for name, request in json.loads(sys.argv[1]).items():
            out[name] = (await client.request(request["method"], request["path"], headers=request["headers"])).status
    print(json.dumps(out))

asyncio.run(main())
"""


def ray_node(env: dict[str, str], requests: dict[str, dict] | None = None, *, token_file: str | None = None) -> dict:
    """What a Ray process with this environment decides, and what its dashboard answers to `requests`.

    Runs Ray's authentication code in a fresh interpreter (Ray reads its mode once per process); no
    Ray node is started. HOME is empty unless `token_file` puts a token in ~/.ray/auth_token."""
    with tempfile.TemporaryDirectory() as home:
        if token_file is not None:
            (Path(home) / ".ray").mkdir()
            (Path(home) / ".ray" / "auth_token").write_text(token_file)
        full = {"PATH": os.environ["PATH"], "HOME": home, **env}
        done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(requests or {})], env=full, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _post(headers: dict[str, str] | None = None, path: str = "/api/jobs/") -> dict:
    return {"method": "POST" if path == "/api/jobs/" else "GET", "path": path, "headers": headers or {}}


def test_rays_own_code_locks_the_dashboard_and_admits_every_node_of_the_release():
    objects = scenario_objects("two-gpu-types")
    pods = _kuberay_pods(objects)
    head_env = _resolved_env(objects, pods.pop("head"))
    others = {name: ray_node(_resolved_env(objects, c)) for name, c in pods.items()}
    assert set(others) >= {"gpu-h100", "gpu-l4", "autoscaler", "wait-gcs-ready"}
    token = head_env["RAY_AUTH_TOKEN"]
    requests = {
        "anonymous job submission": _post(),
        "wrong token": _post({"authorization": "Bearer not-the-token"}),
        # `serving status` and KubeRay through the API server's service proxy, which keeps the
        # Authorization header for itself: Ray's fallback header
        "x-ray-authorization": _post({"x-ray-authorization": f"Bearer {token}"}),
        "kubelet probe": _post(path="/api/gcs_healthz"),
        **{f"from {name}": _post(node["header"]) for name, node in others.items()},
    }
    head = ray_node(head_env, requests)
    assert head["token_auth"] is True
    assert head["anonymous job submission"] == 401 and head["wrong token"] == 403
    assert head["x-ray-authorization"] == 200 and head["kubelet probe"] == 200
    for name, node in others.items():
        assert node["token_auth"] is True, name  # same mode: a worker can join
        assert head[f"from {name}"] == 200, name  # same token: and is admitted


def test_before_the_fix_head_and_workers_could_disagree():
    """Before: no authOptions, no RAY_AUTH_MODE. KubeRay adds nothing, and a head that finds a token
    (Ray 2.60 turns token auth on when RAY_AUTH_MODE is unset and a token exists) refuses its
    workers; without one, the dashboard runs anyone's jobs. Both are what the check above rules out."""
    objects = scenario_objects("default")
    for container in ray_containers(objects).values():
        container["env"] = [e for e in container["env"] if not e["name"].startswith("RAY_AUTH")]
    del cluster_of(objects)["authOptions"]
    pods = _kuberay_pods(objects)
    assert all(not _resolved_env(objects, c) for c in pods.values())  # KubeRay set nothing
    worker = ray_node({})
    head = ray_node({}, {"worker joins": _post(worker["header"])}, token_file="a-token-left-on-the-head")
    assert head["token_auth"] is True and worker["token_auth"] is False and head["worker joins"] == 401
    open_head = ray_node({}, {"anonymous job submission": _post()})
    assert open_head["anonymous job submission"] == 200


def test_explicitly_disabled_stays_disabled_even_with_a_token_on_the_node():
    objects = render({"ray": {"auth": {"mode": "disabled"}}})
    for name, container in _kuberay_pods(objects).items():
        assert ray_node(_resolved_env(objects, container), token_file="stray")["token_auth"] is False, name


def test_the_dashboard_listens_on_the_pod_network_for_the_operator_only():
    """The operator deploys serveConfigV2 through the dashboard over the pod network, so it cannot bind
    loopback: what protects it is the policy (8265 from the operator and dashboardFrom only) and the
    token (above)."""
    objects = scenario_objects("default")
    head = cluster_of(objects)["headGroupSpec"]["rayStartParams"]
    assert head["dashboard-host"] == "0.0.0.0"
    allowed = {name for name, peer in PEERS.items() if reachable(objects, HEAD, 8265, peer)}
    assert allowed == {"kuberay operator", "ray worker of the release"}


# --------------------------------------------------------------------------------------------
# Secrets only where the gateways run
# --------------------------------------------------------------------------------------------

def test_gateway_secrets_are_on_the_head_alone(scenario):
    objects = scenario_objects(scenario)
    values = scenario_values(scenario)
    secret_names = {f"{FULLNAME}-api-keys", f"{FULLNAME}-redis", "redis-auth", "serving-api-keys",
                    values.get("apiKeys", {}).get("existingSecret")} - {None, ""}
    containers = ray_containers(objects)
    head = env_of(containers.pop("head"))
    assert {"SERVING_AUTH__KEYS", "SERVING_REDIS__URL"} <= set(head)
    for name, container in containers.items():
        env = env_of(container)
        assert not GATEWAY_ONLY & set(env), name
        refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in env.values() if "valueFrom" in e}
        assert not refs & secret_names, (name, refs)
        assert "envFrom" not in container, name


def test_only_the_head_offers_the_gateways_resource_as_rays_autoscaler_reads_it(scenario):
    rayservice = one(scenario_objects(scenario), "RayService")
    node_types = _generate_available_node_types_from_ray_cr_spec(rayservice["spec"]["rayClusterConfig"])
    replicas = {**{"replicas": 1}, **scenario_values(scenario).get("gateway", {})}["replicas"]
    assert node_types["headgroup"]["resources"][GATEWAY_RESOURCE] == replicas
    assert [n for n, t in node_types.items() if GATEWAY_RESOURCE in t["resources"]] == ["headgroup"]


def test_no_model_replica_fits_on_the_head(scenario):
    """The head advertises no GPU and only the gateways' CPUs: a model replica cannot be placed there."""
    rayservice = one(scenario_objects(scenario), "RayService")
    head = _generate_available_node_types_from_ray_cr_spec(rayservice["spec"]["rayClusterConfig"])["headgroup"]
    gateway = {"cpus": 1, "replicas": 1, **scenario_values(scenario).get("gateway", {})}
    spare_cpus = head["resources"]["CPU"] - gateway["cpus"] * gateway["replicas"]
    for model in yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][1:]:
        resources = model["args"].get("resources", {})
        gpus, cpus = resources.get("gpus", 0), resources.get("cpus", 1)
        assert gpus > head["resources"].get("GPU", 0) or cpus > spare_cpus, model["name"]


@pytest.mark.parametrize("values,message", [
    ({"models": [{"name": "tiny", "source": "org/tiny", "resources": {"cpus": 0}}]}, "fits in the head pod"),
    ({"gateway": {"cpus": 0.5}, "models": [{"name": "tiny", "source": "org/tiny", "resources": {"cpus": 0.5}}]},
     "fits in the head pod"),
    ({"head": {"rayStartParams": {"resources": '"{\\"x\\": 1}"'}}}, "would replace the head's serving_gateway"),
    ({"workers": {"groups": {"gpu": {"rayStartParams": {"resources": '"{\\"serving_gateway\\": 9}"'}}}}},
     "gateways would run on that group's pods"),
])
def test_values_that_would_put_secrets_near_model_code_are_refused(values, message):
    with pytest.raises(helm.HelmRenderError, match=message):
        render(values)


def test_the_gateway_deployment_requests_the_heads_resource():
    """The gateways' args (as the chart renders them) make the gateway deployment request the resource
    the head alone advertises."""
    from serving.app import gateway_deployment_options
    from serving.config import load_config

    args = applications(one(scenario_objects("default"), "RayService"))["serving"]["args"]
    options = gateway_deployment_options(load_config(data=args))
    assert options["ray_actor_options"].get("resources") == {GATEWAY_RESOURCE: 1}
    with pytest.raises(Exception, match="gateway.ray_resource"):
        render({"gateway": {"ray_resource": None}})


# --------------------------------------------------------------------------------------------
# Redis: bounded memory, only cache entries evictable; TLS to an external Redis
# --------------------------------------------------------------------------------------------

def redis_args(objects: list[dict]) -> list[str]:
    return one(objects, "StatefulSet", "-redis")["spec"]["template"]["spec"]["containers"][0]["args"]


def test_bundled_redis_has_maxmemory_and_a_policy_that_spares_keys_without_ttl(scenario):
    objects = scenario_objects(scenario)
    if not any(o["kind"] == "StatefulSet" for o in objects):
        return
    args = redis_args(objects)
    assert args[args.index("--maxmemory") + 1] == "1gb"
    assert args[args.index("--maxmemory-policy") + 1] == "volatile-lru"


@pytest.mark.parametrize("redis_values", [{"maxmemoryPolicy": "allkeys-lru"}, {"maxmemory": ""},
                                          {"maxmemory": "lots"}])
def test_values_that_would_evict_keys_or_leave_redis_unbounded_are_refused(redis_values):
    with pytest.raises(helm.HelmValuesError, match="/redis/maxmemory"):
        render({"redis": redis_values})


class RenderedRedis:
    """redis-server started with the chart's rendered arguments (persistence off, local port)."""

    def __init__(self, args: list[str]):
        self.password = "p" * 32
        self.workdir = tempfile.mkdtemp(prefix="redis-chart-")
        self.port = free_port()
        rendered = [self.password if a == "$(REDIS_PASSWORD)" else a for a in args]
        rendered[rendered.index("--port") + 1] = str(self.port)
        rendered[rendered.index("--dir") + 1] = self.workdir
        rendered[rendered.index("--appendonly") + 1] = "no"
        self.process = subprocess.Popen(["redis-server", *rendered, "--bind", "127.0.0.1", "--save", ""],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.client = redis.Redis(port=self.port, password=self.password)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.RedisError:
                assert time.monotonic() < deadline and self.process.poll() is None, "redis-server did not start"
                time.sleep(0.02)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait(10)


async def _flood(url: str, password: str, megabytes: int) -> tuple[int, list[str]]:
    """API keys written, then `megabytes` of cached answers from one tenant; keys still found, errors."""
    from serving.gateway.store import RedisStore

    store = RedisStore(url, password=password)
    errors = []
    try:
        for i in range(50):
            await store.key_put(f"digest-{i}", {"name": f"key-{i}", "models": None})
        body = os.urandom(32 * 1024)
        for i in range(megabytes * 32):
            try:
                await store.cache_set(f"flood-{i}", body, 3600)
            except redis.RedisError as exc:
                errors.append(str(exc))
        await store.usage_add("key-1", "2026-11-30", "m", {"requests": 1})
        found = [await store.key_get(f"digest-{i}") for i in range(50)]
        found = sum(record is not None for record in found)
        return found, errors
    finally:
        await store.close()


def test_a_cache_flood_evicts_cache_entries_and_never_api_keys():
    objects = render({"redis": {"maxmemory": "8mb"}})
    server = RenderedRedis(redis_args(objects))
    try:
        found, errors = asyncio.run(_flood(server.url, server.password, megabytes=32))
        info = server.client.info("memory") | server.client.info("stats")
        assert found == 50 and not errors
        assert info["evicted_keys"] > 0 and info["used_memory"] <= 8 * 2**20
    finally:
        server.close()


def test_before_the_fix_a_cache_flood_grows_redis_without_bound():
    """Before: no maxmemory. The same flood takes as much memory as it sends (until the pod is killed)."""
    objects = render({"redis": {"maxmemory": "0"}})
    server = RenderedRedis(redis_args(objects))
    try:
        asyncio.run(_flood(server.url, server.password, megabytes=32))
        info = server.client.info("memory") | server.client.info("stats")
        assert info["evicted_keys"] == 0 and info["used_memory"] > 32 * 2**20
    finally:
        server.close()


def test_only_cache_entries_carry_a_ttl():
    """Under volatile-* a key is evictable exactly when it has a TTL: only cached answers may."""
    from serving.gateway.store import RedisStore

    server = RenderedRedis(redis_args(render({})))

    async def write_everything():
        store = RedisStore(server.url, password=server.password)
        try:
            await store.cache_set("answer", b"{}", 3600)
            await store.key_put("digest", {"name": "k"})
            admitted = await store.admit("k", "lease-1", rpm=10, tpm=1000, reserve=5, max_concurrent=2,
                                         window_s=60, lease_s=30)
            await store.admit("k", "lease-2", rpm=10, tpm=1000, reserve=5, max_concurrent=2, window_s=60, lease_s=30)
            await store.release("k", "lease-1", bucket=admitted.bucket, reserved=5, used=3, window_s=60)
            await store.usage_add("k", "2026-11-30", "m", {"requests": 1})
        finally:
            await store.close()

    try:
        asyncio.run(write_everything())
        ttls = {key.decode(): server.client.ttl(key) for key in server.client.scan_iter()}
        assert {k for k in ttls if ":rl:" in k} and {k for k in ttls if ":usage:" in k}  # all were written
        evictable = {key for key, ttl in ttls.items() if ttl != -1}
        assert {k for k in ttls if ":cache:" in k} <= evictable
        assert evictable == {k for k in ttls if ":cache:" in k}, ttls
    finally:
        server.close()


TLS_VALUES = {"redis": {"external": {"url": "rediss://redis.example.internal:6380/2", "existingSecret": "redis-auth",
                                     "tls": {"caSecret": "redis-ca", "clientCertSecret": "redis-client"}}},
              "ray": {"gcsFaultTolerance": {"enabled": True}}}
CA = "/etc/serving/redis-tls/ca.crt"
CERT, KEY = "/etc/serving/redis-tls-client/tls.crt", "/etc/serving/redis-tls-client/tls.key"


def test_tls_to_an_external_redis_mounts_its_ca_and_client_certificate_on_the_head_only():
    objects = render(TLS_VALUES)
    cluster = cluster_of(objects)
    head_pod = cluster["headGroupSpec"]["template"]
    head = env_of(head_pod["spec"]["containers"][0])
    assert head["SERVING_REDIS__URL"]["value"] == "rediss://redis.example.internal:6380/2"
    assert head["SERVING_REDIS__TLS_CA_FILE"]["value"] == CA
    assert (head["SERVING_REDIS__TLS_CERT_FILE"]["value"], head["SERVING_REDIS__TLS_KEY_FILE"]["value"]) == (CERT, KEY)
    assert head["RAY_REDIS_CA_CERT"]["value"] == CA  # Ray's GCS (fault tolerance) verifies the same server
    assert cluster["gcsFaultToleranceOptions"]["redisAddress"] == "rediss://redis.example.internal:6380"
    mounts = head_pod["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "redis-tls-ca", "mountPath": "/etc/serving/redis-tls", "readOnly": True} in mounts
    assert {"name": "redis-tls-client", "mountPath": "/etc/serving/redis-tls-client", "readOnly": True} in mounts
    volumes = {v["name"]: v for v in head_pod["spec"]["volumes"]}
    assert volumes["redis-tls-ca"]["secret"] == {"secretName": "redis-ca",
                                                 "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    assert volumes["redis-tls-client"]["secret"] == {"secretName": "redis-client", "items": [
        {"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}], "defaultMode": 0o440}
    for group in cluster["workerGroupSpecs"]:
        assert "redis-tls" not in str(group["template"])
    assert not pod_template_errors(head_pod, "head")
    assert not rayservice_errors(k8s(one(objects, "RayService")))


def test_the_tls_files_reach_the_configuration_model(monkeypatch):
    """What the head's environment says is what the gateways' configuration (and store) uses."""
    from serving.config import load_config

    for name, var in env_of(ray_containers(render(TLS_VALUES))["head"]).items():
        if name.startswith("SERVING_REDIS__") and "value" in var:
            monkeypatch.setenv(name, var["value"])
    redis_config = load_config(data={"models": []}).redis
    assert (redis_config.tls_ca_file, redis_config.tls_cert_file, redis_config.tls_key_file) == (CA, CERT, KEY)


def test_tls_files_are_only_for_a_rediss_url():
    with pytest.raises(helm.HelmRenderError, match="rediss://"):
        render({"redis": {"external": {"url": "redis://plain:6379/0", "tls": {"caSecret": "redis-ca"}}}})


def test_security_variants_validate_against_kubernetes_and_the_crd():
    variants = [TLS_VALUES, {"ray": {"auth": {"mode": "disabled"}}}, {"networkPolicy": {"dashboardFrom": [
        {"ipBlock": {"cidr": "10.0.0.0/24"}}], "gatewayFrom": [{"namespaceSelector": {}}]}}]
    for values in variants:
        for obj in render(values):
            if obj["kind"] == "RayService":
                assert not rayservice_errors(k8s(obj)), values
            elif obj["kind"] in ("NetworkPolicy", "Secret", "StatefulSet", "Pod"):
                assert not k8s_errors(k8s(obj)), values
