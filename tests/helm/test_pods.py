"""Golden assertions on what matters in the pods: probes, /dev/shm, security, secrets, labels."""

from __future__ import annotations

import shutil

import helm_python as helm
import yaml

from tests.helm.render import CHART, NAMESPACE, RELEASE, one, render, scenario_objects, scenario_values


def ray_pods(objects: list[dict]) -> dict[str, dict]:
    cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
    pods = {"head": cluster["headGroupSpec"]["template"]}
    pods.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    return pods


def all_pod_specs(objects: list[dict]) -> list[tuple[str, dict]]:
    specs = [(f"ray {name}", pod["spec"]) for name, pod in ray_pods(objects).items()]
    specs += [(f"{o['kind']} {o['metadata']['name']}", o["spec"]["template"]["spec"])
              for o in objects if o["kind"] in ("StatefulSet", "Deployment")]
    specs += [(f"Pod {o['metadata']['name']}", o["spec"]) for o in objects if o["kind"] == "Pod"]
    return specs


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_probes_leave_minutes_for_startup_and_never_wait_on_models(scenario):
    for name, pod in ray_pods(scenario_objects(scenario)).items():
        container = pod["spec"]["containers"][0]
        startup, liveness, readiness = (container[p] for p in ("startupProbe", "livenessProbe", "readinessProbe"))
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, name
        assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 120, name
        for probe in (startup, liveness, readiness):
            # a probe on /ready or /v1 would kill or hide pods while a model loads for minutes
            assert probe["httpGet"]["path"] in ("/api/gcs_healthz", "/api/local_raylet_healthz", "/-/healthz")
            port_names = {p["name"] for p in container["ports"]}
            assert probe["httpGet"]["port"] in port_names, (name, probe)
        if name != "head":
            assert readiness["httpGet"] == {"path": "/-/healthz", "port": "serve"}  # KubeRay's serve readiness


def test_dev_shm_is_a_sized_memory_volume_on_every_ray_pod(scenario):
    for name, pod in ray_pods(scenario_objects(scenario)).items():
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        assert volumes["dshm"]["emptyDir"]["sizeLimit"]
        mounts = {m["mountPath"]: m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["/dev/shm"] == "dshm", name
    gpu = ray_pods(scenario_objects("default"))["gpu"]
    assert next(v for v in gpu["spec"]["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"] == "16Gi"


def test_every_container_runs_as_non_root_without_privileges(scenario):
    objects = scenario_objects(scenario)
    for where, spec in all_pod_specs(objects):
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["runAsUser"] != 0, where
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
    options = one(objects, "RayService")["spec"]["rayClusterConfig"].get("autoscalerOptions")
    if options:
        assert options["securityContext"]["allowPrivilegeEscalation"] is False


def test_resources_are_left_to_the_user_by_default():
    objects = scenario_objects("default")
    for name, pod in ray_pods(objects).items():
        resources = pod["spec"]["containers"][0].get("resources", {})
        # GPU workers only carry the GPU count the group needs
        assert resources in ({}, {"limits": {"nvidia.com/gpu": 1}}), (name, resources)
    redis = one(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    assert "resources" not in redis


def test_user_resources_merge_with_the_gpu_limit():
    values = scenario_values("h100-8b")
    container = ray_pods(render(values))["gpu-h100"]["spec"]["containers"][0]
    assert container["resources"] == {"requests": {"cpu": "8", "memory": "64Gi"},
                                      "limits": {"memory": "96Gi", "nvidia.com/gpu": 1}}


def test_ray_containers_get_their_configuration_and_secrets_from_the_environment():
    objects = scenario_objects("h100-8b")
    fullname = f"{RELEASE}-serving"
    for name, pod in ray_pods(objects).items():
        env = env_of(pod["spec"]["containers"][0])
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
        assert env["HF_HOME"]["value"] == "/models-cache/huggingface"
        if name != "head":  # the gateways' secrets are the head's alone (tests/helm/test_security.py)
            assert not [v for v in env if v.startswith("SERVING_")], name
            continue
        assert env["SERVING_REDIS__URL"]["value"] == f"redis://{fullname}-redis.{NAMESPACE}.svc:6379/0"
        assert env["SERVING_REDIS__PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": f"{fullname}-redis", "key": "redis-password"}
        assert env["SERVING_AUTH__KEYS"]["valueFrom"]["secretKeyRef"] == {
            "name": f"{fullname}-api-keys", "key": "keys.json"}
        mounts = {m["name"]: m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["models-cache"] == "/models-cache"
        claim = next(v for v in pod["spec"]["volumes"] if v["name"] == "models-cache")
        assert claim["persistentVolumeClaim"] == {"claimName": f"{fullname}-models-cache"}


def test_every_secret_reference_resolves(scenario):
    """Each secretKeyRef names a Secret the chart renders (with that key) or one the values name."""
    values = scenario_values(scenario)
    rendered = {o["metadata"]["name"]: set(o.get("data", {}))
                for o in scenario_objects(scenario) if o["kind"] == "Secret"}
    external = {values.get("huggingface", {}).get("existingSecret"),
                values.get("redis", {}).get("external", {}).get("existingSecret"),
                values.get("redis", {}).get("auth", {}).get("existingSecret"),
                values.get("apiKeys", {}).get("existingSecret")} - {None, ""}

    def refs(node):
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                yield node["secretKeyRef"]
            for v in node.values():
                yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)

    for obj in scenario_objects(scenario):
        for ref in refs(obj):
            if ref["name"] in rendered:
                assert ref["key"] in rendered[ref["name"]] or ref.get("optional"), (obj["kind"], ref)
            else:
                assert ref["name"] in external, f"{obj['kind']} refers to unknown Secret {ref}"


def _selectors(objects: list[dict]) -> dict[str, dict]:
    found = {}
    for o in objects:
        key = f"{o['kind']}/{o['metadata']['name']}"
        spec = o.get("spec", {})
        if o["kind"] in ("StatefulSet", "Deployment", "PodDisruptionBudget"):
            found[key] = spec["selector"]
        elif o["kind"] == "Service":
            found[key] = spec.get("selector")
        elif o["kind"] == "NetworkPolicy":
            found[key] = spec["podSelector"]
        elif o["kind"] in ("PodMonitor", "ServiceMonitor"):
            found[key] = spec["selector"]
        elif o["kind"] == "RayService":
            # the whole cluster spec: KubeRay hashes it to decide whether to roll a new cluster
            found[f"{key}/rayClusterConfig"] = spec["rayClusterConfig"]
    return found


def test_selectors_and_pod_templates_are_stable_across_chart_versions(tmp_path):
    """`helm upgrade` to a new chart version must not touch selectors (immutable) nor Ray pod
    templates (a changed template makes KubeRay roll a whole new Ray cluster)."""
    values = {**scenario_values("exposure"), **scenario_values("monitoring")}
    before = _selectors(render(values))
    bumped = tmp_path / "serving"
    shutil.copytree(CHART, bumped)
    meta = yaml.safe_load((bumped / "Chart.yaml").read_text())
    meta["version"] = "9.9.9"
    (bumped / "Chart.yaml").write_text(yaml.safe_dump(meta))
    with helm.Chart.load(str(bumped)) as chart:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    after_objects = [d for path, text in files.items() if not path.endswith("NOTES.txt")
                     for d in yaml.safe_load_all(text) if d]
    assert any(o["metadata"].get("labels", {}).get("helm.sh/chart") == "serving-9.9.9" for o in after_objects)
    assert _selectors(after_objects) == before
    assert len(before) >= 8
    assert "helm.sh/chart" not in str(before) and "app.kubernetes.io/version" not in str(before)


def test_ray_serve_runs_as_serving_up_runs_it_and_haproxy_can_be_turned_off(scenario):
    from serving.cli import RAY_SERVE_ENV

    for name, pod in ray_pods(scenario_objects(scenario)).items():
        env = env_of(pod["spec"]["containers"][0])
        for variable, value in RAY_SERVE_ENV.items():  # the same Ray Serve settings as the local run
            assert env[variable]["value"] == value, (name, variable)
    values = scenario_values("default")
    values.setdefault("ray", {})["haproxy"] = False
    for name, pod in ray_pods(render(values)).items():
        env = env_of(pod["spec"]["containers"][0])
        assert "RAY_SERVE_ENABLE_HA_PROXY" not in env and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"]["value"] == "1", name
