"""Bundled or external Redis, the API-key Secret, the model cache, the `helm test` pod, the example."""

from __future__ import annotations

import base64
import importlib.util
import json

from tests.helm.render import NAMESPACE, RELEASE, ROOT, one, render, scenario_objects

FULLNAME = f"{RELEASE}-serving"


def ray_env(objects: list[dict]) -> dict[str, dict]:
    head = one(objects, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    return {e["name"]: e for e in head["containers"][0]["env"]}


def test_bundled_redis_is_a_password_protected_statefulset_with_a_volume():
    objects = scenario_objects("default")
    redis = one(objects, "StatefulSet", "-redis")
    spec = redis["spec"]
    assert spec["replicas"] == 1 and spec["serviceName"] == f"{FULLNAME}-redis"
    container = spec["template"]["spec"]["containers"][0]
    assert container["image"] == "docker.io/library/redis:7.4.2-alpine3.21"
    assert container["args"][container["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env["REDIS_PASSWORD"] == env["REDISCLI_AUTH"] == {"name": f"{FULLNAME}-redis", "key": "redis-password"}
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    secret = one(objects, "Secret", "-redis")
    assert len(base64.b64decode(secret["data"]["redis-password"])) == 32
    service = one(objects, "Service", "-redis")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == spec["selector"]["matchLabels"]
    assert ray_env(objects)["SERVING_REDIS__URL"]["value"] == f"redis://{FULLNAME}-redis.{NAMESPACE}.svc:6379/0"


def test_redis_maxmemory_never_evicts_keys_without_a_ttl():
    redis = one(render({"redis": {"maxmemory": "2gb"}}), "StatefulSet", "-redis")
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--maxmemory") + 1] == "2gb"
    assert args[args.index("--maxmemory-policy") + 1] == "volatile-lru"  # API keys have no TTL


def test_external_redis_replaces_the_bundled_one():
    objects = scenario_objects("external-redis")
    assert not [o for o in objects if "redis" in o["metadata"]["name"]]
    env = ray_env(objects)
    assert env["SERVING_REDIS__URL"]["value"] == "rediss://redis.example.internal:6380/2"
    assert env["SERVING_REDIS__PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "redis-auth",
                                                                            "key": "redis-password"}
    assert env["SERVING_AUTH__KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "serving-api-keys", "key": "keys.json"}
    ft = one(objects, "RayService")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert ft == {"redisAddress": "rediss://redis.example.internal:6380",  # TLS stays TLS for Ray's GCS
                  "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "redis-password"}}}}


def test_without_redis_no_redis_settings_reach_the_pods():
    objects = render({"redis": {"enabled": False}})
    assert not [o for o in objects if "redis" in o["metadata"]["name"]]
    assert not {"SERVING_REDIS__URL", "SERVING_REDIS__PASSWORD"} & set(ray_env(objects))


def test_api_key_secret_holds_the_configured_keys_and_a_test_key():
    objects = scenario_objects("exposure")
    secret = one(objects, "Secret", "-api-keys")
    keys = json.loads(base64.b64decode(secret["data"]["keys.json"]))
    test_key = base64.b64decode(secret["data"]["test-key"]).decode()
    assert keys == [{"name": "team-a", "key": "sk-team-a-0123456789abcdef", "models": ["qwen2.5-1.5b-instruct"],
                     "rpm": 600, "tpm": 200000},
                    {"name": "helm-test", "key": test_key}]
    assert test_key.startswith("sk-helm-test-") and len(test_key) > 40


def test_no_keys_and_no_test_key_means_no_key_secret():
    objects = render({"apiKeys": {"generateTestKey": False}})
    assert not [o for o in objects if o["metadata"]["name"].endswith("-api-keys")]
    assert "SERVING_AUTH__KEYS" not in ray_env(objects)


def test_model_cache_claim_is_kept_on_uninstall_or_an_existing_one_is_used():
    claim = one(scenario_objects("h100-8b"), "PersistentVolumeClaim", "-models-cache")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    objects = scenario_objects("two-gpu-types")
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"
                and o["metadata"]["name"].endswith("-models-cache")]
    cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
    for group in cluster["workerGroupSpecs"]:
        volume = next(v for v in group["template"]["spec"]["volumes"] if v["name"] == "models-cache")
        assert volume == {"name": "models-cache", "persistentVolumeClaim": {"claimName": "shared-models"}}


def test_helm_test_pod_lists_every_model_and_adapter_with_the_test_key():
    pod = one(scenario_objects("two-gpu-types"), "Pod", "-test-models")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["BASE_URL"]["value"] == f"http://{FULLNAME}.{NAMESPACE}.svc:8000"
    assert env["MODELS"]["value"].split() == ["llama-3.1-70b-instruct", "sql-helper", "bge-large-en"]
    assert env["API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": f"{FULLNAME}-api-keys", "key": "test-key",
                                                            "optional": True}
    script = container["args"][0]
    assert '"$BASE_URL/v1/models"' in script and "Authorization: Bearer" in script and "/ready" in script
    assert container["image"].split(":")[-1] not in ("", "latest")


def test_deploy_example_is_the_current_render_of_the_cpu_demo():
    spec = importlib.util.spec_from_file_location("gen_example", ROOT / "helm" / "gen_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fresh = (ROOT / "deploy" / "rayservice-example.yaml").read_text() == module.render()
    assert fresh, "deploy/rayservice-example.yaml is stale (the chart changed): run python helm/gen_example.py"
