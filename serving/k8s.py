"""`serving status`: the platform's state on Kubernetes, read from the cluster API.

Three sources, all through the Kubernetes API server (one kubeconfig, nothing else to reach):
- the RayService custom object (ray.io/v1): KubeRay's view, i.e. whether it serves traffic, an
  upgrade in progress, each Serve application's and deployment's status, and serveConfigV2: the
  gateways' application (serving.app:gateway_builder) and one application per model
  (serving.app:model_builder, named like its one deployment, `model-<name>`);
- the Ray pods of its clusters: how many are Ready per group, and why the others are not;
- Ray Serve's REST API on the head, through the API server's service proxy: each application's
  deployments, their replicas and the replicas' states. With Ray's token auth (the RayService's
  spec.rayClusterConfig.authOptions.mode: token) the dashboard answers 401 without the token, so
  the proxied request carries `x-ray-authorization: Bearer <token>`, the token being key
  `auth_token` of the Secret named by authOptions.secretName (KubeRay's own Secret, named like the
  active RayCluster, when no name is given); `Authorization` carries the Kubernetes credentials and
  the API server does not pass it on. The token is sent to the API server only, never printed.
  Optional: without RBAC for services/proxy or for get on that Secret (or when the Secret is
  missing, or a NetworkPolicy keeps the API server out) the report says so
  (`replicas_source`: "spec (Ray Serve API unavailable: cannot read Secret X: 403 Forbidden)")
  and shows target counts from the spec instead.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # kubernetes is imported where it is used: `serving` starts without it
    from kubernetes.client import V1Pod

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayservices"
# serving.app's entry points (not imported from there: that would import Ray Serve and the engines)
GATEWAY_IMPORT_PATH = "serving.app:gateway_builder"
MODEL_IMPORT_PATH = "serving.app:model_builder"
GATEWAY_DEPLOYMENT = "gateway"
# Ray's dashboard reads its token from this header when `Authorization` is absent (Ray's
# http_token_authentication; KubeRay sends it the same way); `Authorization` is the API server's own
RAY_AUTH_HEADER = "x-ray-authorization"
RAY_TOKEN_KEY = "auth_token"  # the key KubeRay reads in the authOptions Secret
# One of the platform's Serve applications: (application name, model name or None for the gateways, args)
App = tuple[str, str | None, dict[str, Any]]


def add_status_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `serving status` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "status", help="show a RayService's state and each model's replicas and readiness (Kubernetes)")
    parser.add_argument("--namespace", "-n", help="namespace (default: the kubeconfig context's, or 'default')")
    parser.add_argument("--name", help="RayService name (default: the only serving RayService in the namespace)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")
    parser.add_argument("--output", "-o", choices=["text", "json"], default="text", help="output format")
    return parser


def run_status(args: argparse.Namespace) -> int:
    """0: serving and every model ready; 1: reachable but not (yet) ready; 2: cannot tell (error)."""
    from kubernetes.client.exceptions import ApiException

    try:
        api_client, namespace = connect(args.kubeconfig, getattr(args, "context", None), args.namespace)
        status = collect_status(api_client, namespace, args.name)
    except (LookupError, ApiException, OSError) as exc:
        reason = f"{exc.status} {exc.reason}" if isinstance(exc, ApiException) else str(exc)
        print(f"error: {reason}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - kubernetes.config.ConfigException and friends: no usable kubeconfig
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(status, indent=2) if getattr(args, "output", "text") == "json" else render_text(status))
    return 0 if status["ready"] else 1


def connect(kubeconfig: str | None, context: str | None, namespace: str | None):
    """An ApiClient and the namespace to look in, from a kubeconfig or the in-cluster service account."""
    from kubernetes import client, config

    try:
        api_client = config.new_client_from_config(config_file=kubeconfig, context=context)
        contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
        if context:
            active = next(c for c in contexts if c["name"] == context)
        default_ns = active.get("context", {}).get("namespace") or "default"
    except config.ConfigException as exc:
        if kubeconfig:
            raise
        try:
            config.load_incluster_config()
        except config.ConfigException:
            raise LookupError(f"no usable kubeconfig ({exc}; pass --kubeconfig or set KUBECONFIG) "
                              "and not running inside a cluster") from None
        api_client = client.ApiClient()
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            default_ns = f.read().strip()
    return api_client, namespace or default_ns


def collect_status(api_client, namespace: str, name: str | None = None) -> dict[str, Any]:
    """Everything `serving status` reports, as plain data (the JSON output)."""
    from kubernetes import client

    custom = client.CustomObjectsApi(api_client)
    rayservice = _find_rayservice(custom, namespace, name)
    name = rayservice["metadata"]["name"]
    st = rayservice.get("status") or {}
    conditions = {c["type"]: c for c in st.get("conditions", [])}
    apps = _apps_of(rayservice)
    active, pending = st.get("activeServiceStatus") or {}, st.get("pendingServiceStatus") or {}
    serve, serve_error = _serve_details(client.CoreV1Api(api_client), namespace, rayservice)
    deployments = _deployments(apps, active, serve)
    ready_condition = conditions.get("Ready", {})
    service_ready = ready_condition.get("status") == "True" if ready_condition else st.get("serviceStatus") == "Running"
    return {
        "namespace": namespace,
        "name": name,
        "ready": service_ready and bool(deployments) and all(d["ready"] for d in deployments),
        "service_status": st.get("serviceStatus") or ready_condition.get("reason") or "Unknown",
        "serving": service_ready,
        "serve_endpoints": st.get("numServeEndpoints", 0),
        "upgrade_in_progress": conditions.get("UpgradeInProgress", {}).get("status") == "True" or bool(pending),
        "applications": _app_statuses(apps, active),
        "clusters": [c for c in (_cluster(api_client, namespace, active, "active"),
                                 _cluster(api_client, namespace, pending, "pending", apps)) if c],
        "deployments": deployments,
        "replicas_source": "ray-serve" if serve else f"spec (Ray Serve API unavailable: {serve_error})",
    }


def _find_rayservice(custom, namespace: str, name: str | None) -> dict[str, Any]:
    if name:
        return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
    ours = [i for i in items if GATEWAY_IMPORT_PATH in (i.get("spec", {}).get("serveConfigV2") or "")]
    if len(ours) == 1:
        return ours[0]
    names = ", ".join(i["metadata"]["name"] for i in ours) or "none"
    raise LookupError(f"{len(ours)} serving RayServices in namespace {namespace} ({names}): pass --name")


def _apps_of(rayservice: dict[str, Any]) -> list[App]:
    """The platform's applications in serveConfigV2, the gateways' first: (application name, model
    name or None for the gateways, args). A model's application is named like its one deployment."""
    config = yaml.safe_load(rayservice.get("spec", {}).get("serveConfigV2") or "{}") or {}
    gateways: list[App] = []
    models: list[App] = []
    for app in config.get("applications") or []:
        args = app.get("args") or {}
        if app.get("import_path") == GATEWAY_IMPORT_PATH:
            gateways.append((app.get("name", "serving"), None, args))
        elif app.get("import_path") == MODEL_IMPORT_PATH:
            models.append((app.get("name", ""), str(args.get("name")), args))
    if not gateways:
        raise LookupError(f"RayService {rayservice['metadata']['name']} runs no {GATEWAY_IMPORT_PATH} application")
    return gateways[:1] + models


def _target(model: dict[str, Any]) -> str:
    if model.get("autoscaling"):
        auto = model["autoscaling"]
        return f"{auto.get('min_replicas', 1)}-{auto.get('max_replicas', 1)}"
    return str(model.get("replicas", 1))


def _app_status(app_name: str, service_status: dict[str, Any]) -> dict[str, str]:
    app = (service_status.get("applicationStatuses") or {}).get(app_name) or {}
    return {"status": app.get("status", "UNKNOWN"), "message": app.get("message", "")}


def _app_statuses(apps: list[App], service_status: dict[str, Any]) -> list[dict[str, str]]:
    return [{"name": name, **_app_status(name, service_status)} for name, _, _ in apps]


def _deployments(apps: list[App], active: dict[str, Any], serve: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per deployment: the gateways', then each model's (read from its own application)."""
    kuberay_apps = active.get("applicationStatuses") or {}
    live_apps = (serve or {}).get("applications") or {}
    (gateway_app, _, gateway_args), *model_apps = apps
    gateway = {"replicas": (gateway_args.get("gateway") or {}).get("replicas", 1)}
    # (application, deployment, model, adapters, its spec)
    rows: list[tuple[str, str, str | None, list[str], dict[str, Any]]] = [
        (gateway_app, GATEWAY_DEPLOYMENT, "(gateway)", [], gateway)] + [
        (app, app, model, list(args.get("lora_adapters") or {}), args) for app, model, args in model_apps]
    out = []
    for app, deployment, model, adapters, spec in rows:
        kuberay = (kuberay_apps.get(app) or {}).get("serveDeploymentStatuses") or {}
        live = (live_apps.get(app) or {}).get("deployments") or {}
        details = live.get(deployment) or {}
        status = details.get("status") or (kuberay.get(deployment) or {}).get("status") or "UNKNOWN"
        message = details.get("message") or (kuberay.get(deployment) or {}).get("message") or ""
        replicas = details.get("replicas")
        states: dict[str, int] = {}
        for replica in replicas or []:
            states[replica.get("state", "UNKNOWN")] = states.get(replica.get("state", "UNKNOWN"), 0) + 1
        running = states.get("RUNNING", 0)
        target = details.get("target_num_replicas")
        out.append({
            "model": model, "application": app, "deployment": deployment, "adapters": adapters,
            "status": status, "message": message,
            "replicas_running": running if replicas is not None else None,
            "replicas_target": target if target is not None else (_target(spec) if spec else None),
            "replica_states": states,
            # HEALTHY (or scaling) with at least one running replica: the model answers requests
            "ready": status in ("HEALTHY", "UPSCALING", "DOWNSCALING") and (replicas is None or running > 0),
        })
    return out


class _RayServeUnavailable(Exception):
    """Why Ray Serve's REST API cannot be asked (the report's reason; never holds the token)."""


def _serve_details(core, namespace: str, rayservice: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """Ray Serve's REST API (/api/serve/applications/) on the head, via the API server's service proxy.

    Returns (the Serve details, "") or (None, why not: e.g. "403 Forbidden" or
    "cannot read Secret serving-ray-token: 403 Forbidden")."""
    from kubernetes.client.exceptions import ApiException

    try:
        headers = _ray_auth_headers(core, namespace, rayservice)
    except _RayServeUnavailable as exc:
        return None, str(exc)
    name = rayservice["metadata"]["name"]
    configuration = core.api_client.configuration
    saved = configuration.safe_chars_for_path_param
    # the proxied path keeps its slashes (the client would send api%2Fserve%2F...), as kubectl does
    configuration.safe_chars_for_path_param = "/"
    try:
        # _preload_content=False: the client would otherwise turn the JSON body into a Python repr
        response = core.connect_get_namespaced_service_proxy_with_path(
            f"{name}-head-svc:dashboard", namespace, "api/serve/applications/",
            _preload_content=False, _headers=headers)
        return json.loads(response.data), ""
    except ApiException as exc:
        return None, f"{exc.status} {exc.reason}"
    except (ValueError, OSError) as exc:
        return None, str(exc)
    finally:
        configuration.safe_chars_for_path_param = saved


def _ray_token_secret(rayservice: dict[str, Any]) -> str | None:
    """The Secret holding Ray's token, or None when token auth is off (authOptions absent or
    mode disabled). Without secretName KubeRay generates one named like the RayCluster."""
    options = ((rayservice.get("spec") or {}).get("rayClusterConfig") or {}).get("authOptions") or {}
    if options.get("mode") != "token":
        return None
    active = (rayservice.get("status") or {}).get("activeServiceStatus") or {}
    secret = options.get("secretName") or active.get("rayClusterName")
    if not secret:
        raise _RayServeUnavailable("token auth is on but there is no authOptions.secretName and no active cluster")
    return secret


def _ray_auth_headers(core, namespace: str, rayservice: dict[str, Any]) -> dict[str, str]:
    """{x-ray-authorization: Bearer <token>} from the token Secret, {} without token auth.

    Raises _RayServeUnavailable when the Secret cannot be read (RBAC, missing) or holds no token."""
    from kubernetes.client.exceptions import ApiException

    secret_name = _ray_token_secret(rayservice)
    if secret_name is None:
        return {}
    try:
        secret = core.read_namespaced_secret(secret_name, namespace)
    except ApiException as exc:
        raise _RayServeUnavailable(f"cannot read Secret {secret_name}: {exc.status} {exc.reason}") from None
    encoded = (secret.data or {}).get(RAY_TOKEN_KEY)
    if not encoded:
        raise _RayServeUnavailable(f"Secret {secret_name} has no {RAY_TOKEN_KEY}")
    try:
        # strip: a token file created with a trailing newline (kubectl create secret --from-file)
        token = base64.b64decode(encoded, validate=True).decode().strip()
    except (binascii.Error, UnicodeDecodeError):
        # from None and a message of our own: the decoding errors quote the secret's bytes
        raise _RayServeUnavailable(f"Secret {secret_name}: {RAY_TOKEN_KEY} is not base64 of text") from None
    if not token:
        raise _RayServeUnavailable(f"Secret {secret_name} has no {RAY_TOKEN_KEY}")
    return {RAY_AUTH_HEADER: f"Bearer {token}"}


def _cluster(api_client, namespace: str, service_status: dict[str, Any], role: str,
             apps: list[App] | None = None) -> dict[str, Any] | None:
    from kubernetes import client

    cluster = service_status.get("rayClusterName")
    if not cluster:
        return None
    pods = client.CoreV1Api(api_client).list_namespaced_pod(namespace, label_selector=f"ray.io/cluster={cluster}")
    groups: dict[str, dict[str, Any]] = {}
    for pod in pods.items:
        group, waiting = _pod_state(pod)
        entry = groups.setdefault(group, {"ready": 0, "total": 0, "waiting": []})
        entry["total"] += 1
        if waiting is None:
            entry["ready"] += 1
        else:
            entry["waiting"].append(waiting)
    out = {"name": cluster, "role": role, "pods": groups}
    if apps:
        out["applications"] = _app_statuses(apps, service_status)
    return out


def _pod_state(pod: V1Pod) -> tuple[str, str | None]:
    """(the pod's Ray worker group, None when it is Ready, else `name: why not` (its scheduling message
    or its phase)). The API fills metadata and status; a pod without them counts as not ready."""
    meta, status = pod.metadata, pod.status
    group = ((meta.labels if meta is not None else None) or {}).get("ray.io/group", "?")
    conditions = {c.type: c for c in ((status.conditions if status is not None else None) or [])}
    if conditions.get("Ready") and conditions["Ready"].status == "True":
        return group, None
    why = conditions.get("PodScheduled")
    phase = status.phase if status is not None else None
    reason = why.message if why is not None and why.status == "False" else phase
    return group, f"{meta.name if meta is not None else '?'}: {reason}"


def render_text(status: dict[str, Any]) -> str:
    state = "Ready" if status["serving"] else "not serving"
    lines = [f"RayService {status['namespace']}/{status['name']}: {state} ({status['service_status']}), "
             f"{status['serve_endpoints']} serve endpoint(s)"]
    if status["upgrade_in_progress"]:
        lines.append("  upgrade in progress: traffic stays on the active cluster until the new one is ready")
    for cluster in status["clusters"]:
        pods = (", ".join(f"{g} {p['ready']}/{p['total']} ready" for g, p in sorted(cluster["pods"].items()))
                or "no pods")
        apps = f"; applications {_app_summary(cluster['applications'])}" if "applications" in cluster else ""
        lines.append(f"  cluster {cluster['name']} ({cluster['role']}): {pods}{apps}")
        for group in cluster["pods"].values():
            lines += [f"    waiting: {w}" for w in group["waiting"]]
    lines.append(f"applications: {_app_summary(status['applications'])}")
    lines += [f"  application {a['name']}: {a['status']} - {a['message']}"
              for a in status["applications"] if a["message"] and a["status"] != "RUNNING"]
    rows = [("MODEL", "DEPLOYMENT", "STATUS", "REPLICAS", "READY")]
    for d in status["deployments"]:
        running = "?" if d["replicas_running"] is None else d["replicas_running"]
        others = ", ".join(f"{n} {s}" for s, n in sorted(d["replica_states"].items()) if s != "RUNNING")
        rows.append((d["model"], d["deployment"], d["status"],
                     f"{running}/{d['replicas_target']}" + (f" ({others})" if others else ""),
                     "yes" if d["ready"] else "no"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    for d in status["deployments"]:
        if d["adapters"]:
            lines.append(f"  {d['model']} serves LoRA adapters: {', '.join(d['adapters'])}")
        if d["message"] and not d["ready"]:
            lines.append(f"  {d['deployment']}: {d['message']}")
    lines.append(f"replicas from {status['replicas_source']}")
    return "\n".join(lines)


def _app_summary(apps: list[dict[str, str]]) -> str:
    """`3/3 RUNNING`, or which are not: `2/3 RUNNING (model-x DEPLOYING)`."""
    others = [f"{a['name']} {a['status']}" for a in apps if a["status"] != "RUNNING"]
    running = len(apps) - len(others)
    return f"{running}/{len(apps)} RUNNING" + (f" ({', '.join(others)})" if others else "")
