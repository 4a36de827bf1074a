"""Worker groups are derived from the models: one per accelerator type, sized from replicas."""

from __future__ import annotations

import helm_python as helm
import pytest
from ray.autoscaler._private.kuberay.autoscaling_config import _get_custom_resources

from tests.helm.render import one, render, scenario_objects, worker_groups


def groups_of(values: dict) -> dict:
    return worker_groups(one(render(values), "RayService"))


def model(name: str, gpus: float = 1, accel: str | None = None, cpus: float | None = None, **extra) -> dict:
    resources = {"gpus": gpus}
    if accel:
        resources["accelerator_type"] = accel
    if cpus is not None:
        resources["cpus"] = cpus
    return {"name": name, "source": f"org/{name}", "resources": resources, **extra}


def selector(group: str) -> dict:
    return {"workers": {"groups": {group: {"nodeSelector": {"nvidia.com/gpu.product": "X"}}}}}


def limits(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})


def test_default_is_one_gpu_group_of_one_pod():
    groups = worker_groups(one(scenario_objects("default"), "RayService"))
    assert list(groups) == ["gpu"]
    gpu = groups["gpu"]
    assert (gpu["minReplicas"], gpu["maxReplicas"], gpu["replicas"]) == (1, 1, 1)
    assert limits(gpu) == {"nvidia.com/gpu": 1}
    assert gpu["rayStartParams"]["num-gpus"] == "1"
    gpu_taint = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert gpu_taint in gpu["template"]["spec"]["tolerations"]


def test_h100_scenario_pins_the_group_to_h100_nodes():
    group = worker_groups(one(scenario_objects("h100-8b"), "RayService"))["gpu-h100"]
    assert group["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert limits(group)["nvidia.com/gpu"] == 1
    # the autoscaler (Ray's own parser) sees the accelerator type before any pod exists
    assert _get_custom_resources({}, group["rayStartParams"], "gpu-h100") == {"accelerator_type:H100": 1}


def test_two_gpu_types_give_two_groups_sized_from_the_models():
    groups = worker_groups(one(scenario_objects("two-gpu-types"), "RayService"))
    assert set(groups) == {"gpu-h100", "gpu-l4"}
    h100, l4 = groups["gpu-h100"], groups["gpu-l4"]
    # 70B: 1..4 replicas of 2 GPUs on 8-GPU pods -> 1 pod holds all 4
    assert limits(h100)["nvidia.com/gpu"] == 8 and h100["rayStartParams"]["num-gpus"] == "8"
    assert (h100["minReplicas"], h100["maxReplicas"]) == (1, 1)
    assert h100["rayStartParams"]["num-cpus"] == "32"  # 4 replicas x 8 CPUs
    # embeddings: 2 replicas of half a GPU -> one 1-GPU pod
    assert limits(l4)["nvidia.com/gpu"] == 1 and (l4["minReplicas"], l4["maxReplicas"]) == (1, 1)
    assert _get_custom_resources({}, l4["rayStartParams"], "gpu-l4") == {"accelerator_type:L4": 1}


def test_cpu_models_get_a_cpu_group_without_gpus():
    groups = worker_groups(one(scenario_objects("cpu-demo"), "RayService"))
    assert list(groups) == ["cpu"]
    cpu = groups["cpu"]
    assert "nvidia.com/gpu" not in limits(cpu)
    assert cpu["rayStartParams"]["num-gpus"] == "0" and cpu["rayStartParams"]["num-cpus"] == "2"
    assert "tolerations" not in cpu["template"]["spec"]


@pytest.mark.parametrize("models,expected", [
    # fixed replicas: 3 x 1 GPU on 1-GPU pods
    ([model("a", replicas=3)], (3, 3)),
    # autoscaling 0..5 x 1 GPU: scale to zero allowed
    ([model("a", autoscaling={"min_replicas": 0, "max_replicas": 5, "target_ongoing_requests": 8})], (0, 5)),
    # 4 GPUs per replica (tensor parallel), 2 replicas: 4-GPU pods
    ([model("a", gpus=4, replicas=2)], (2, 2)),
    # quarter GPUs: 4 replicas share one GPU
    ([model("a", gpus=0.25, replicas=4)], (1, 1)),
    # two models in one group: minimum packs them, maximum counts each alone
    ([model("a", replicas=1), model("b", gpus=0.5, replicas=1)], (2, 2)),
    ([model("a", gpus=0.5, replicas=1), model("b", gpus=0.5, replicas=1)], (1, 2)),
])
def test_group_sizes(models, expected):
    gpu = groups_of({"models": models})["gpu"]
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == expected


def test_group_overrides_replace_derived_values():
    values = {"models": [model("a", replicas=2)],
              "workers": {"groups": {"gpu": {"gpusPerPod": 2, "minReplicas": 0, "maxReplicas": 4,
                                             "tolerations": [], "shmSize": "32Gi"}}}}
    gpu = groups_of(values)["gpu"]
    assert limits(gpu)["nvidia.com/gpu"] == 2
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (0, 4)
    assert "tolerations" not in gpu["template"]["spec"]  # an override replaces, even with []
    shm = next(v for v in gpu["template"]["spec"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}


def test_without_the_autoscaler_the_group_starts_at_its_maximum():
    values = {"models": [model("a", autoscaling={"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4})],
              "ray": {"version": "2.60.0", "autoscaler": {"enabled": False}}}
    rayservice = one(render(values), "RayService")
    assert rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is False
    assert "autoscalerOptions" not in rayservice["spec"]["rayClusterConfig"]
    assert worker_groups(rayservice)["gpu"]["replicas"] == 3


def test_accelerator_type_names_the_group():
    values = {"models": [model("a", accel="A100-80G")], **selector("gpu-a100-80g")}
    assert list(groups_of(values)) == ["gpu-a100-80g"]


@pytest.mark.parametrize("values,message", [
    ({"models": [model("a", accel="H100")]}, "workers.groups.gpu-h100: models need accelerator_type H100"),
    ({"models": [model("a")], "workers": {"groups": {"gpu-h100": {}}}}, "workers.groups.gpu-h100: no model runs"),
    ({"models": [model("a", gpus=2)], "workers": {"groups": {"gpu": {"gpusPerPod": 1}}}}, "needs 2 GPUs per replica"),
    ({"models": [model("a"), model("a")]}, "the model name \"a\" is used twice"),
    ({"models": [model("a", gpus=0, accel="H100")]}, "accelerator_type needs resources.gpus > 0"),
    ({"models": [model("a")], "workers": {"groups": {"gpu": {"minReplicas": 3, "maxReplicas": 2}}}},
     "minReplicas 3 is above maxReplicas 2"),
])
def test_impossible_groups_fail_with_a_message(values, message):
    with pytest.raises(helm.HelmRenderError) as err:
        render(values)
    assert message in str(err.value)
