"""Files and batches storage: files.storage_url on a volume of the head pod, where the gateways run."""

from __future__ import annotations

import fsspec
import helm_python as helm
import pytest

from serving.config import load_config
from tests.helm.render import CHART, RELEASE, gateway_args, one, render, scenario_objects

FULLNAME = f"{RELEASE}-serving"


def _cluster(objects: list[dict]) -> dict:
    return one(objects, "RayService")["spec"]["rayClusterConfig"]


def _head(objects: list[dict]) -> dict:
    return _cluster(objects)["headGroupSpec"]["template"]["spec"]


def _files_volume(pod: dict) -> dict | None:
    return next((v for v in pod.get("volumes", []) if v["name"] == "files"), None)


def _files_mount(pod: dict) -> str | None:
    return next((m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] == "files"), None)


def _claims(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"].endswith("-files")]


def test_files_live_on_a_claim_mounted_on_the_head_pod_by_default(scenario):
    objects = scenario_objects(scenario)
    (claim,) = _claims(objects)
    assert claim["metadata"]["name"] == f"{FULLNAME}-files"
    # kept on uninstall, as the model cache's claim and the bundled Redis's (a StatefulSet's claim)
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert claim["metadata"]["labels"]["app.kubernetes.io/component"] == "files"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"] == {"requests": {"storage": "20Gi"}}
    assert "storageClassName" not in claim["spec"]
    head = _head(objects)
    assert _files_volume(head) == {"name": "files", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
    assert _files_mount(head) == "/data/files"
    # the gateways run on the head alone: workers (third-party model code) never mount the files
    for group in _cluster(objects)["workerGroupSpecs"]:
        assert _files_volume(group["template"]["spec"]) is None, group["groupName"]
        assert _files_mount(group["template"]["spec"]) is None, group["groupName"]


def test_the_gateways_keep_files_in_the_mounted_directory(scenario):
    objects = scenario_objects(scenario)
    config = load_config(data=gateway_args(one(objects, "RayService")))
    assert config.files.storage_url == "file:///data/files"
    _, root = fsspec.core.url_to_fs(config.files.storage_url)  # as serving.gateway.files reads it
    assert root == _files_mount(_head(objects))


def test_claim_size_class_and_access_modes_come_from_values():
    objects = render({"fileStorage": {"persistence": {"size": "50Gi", "storageClass": "fast-ssd",
                                                      "accessModes": ["ReadWriteMany"]}}})
    (claim,) = _claims(objects)
    assert claim["spec"] == {"accessModes": ["ReadWriteMany"], "storageClassName": "fast-ssd",
                             "resources": {"requests": {"storage": "50Gi"}}}


def test_without_persistence_the_files_are_an_empty_dir():
    objects = render({"fileStorage": {"persistence": {"enabled": False}}})
    assert not _claims(objects)
    head = _head(objects)
    assert _files_volume(head) == {"name": "files", "emptyDir": {}}
    assert _files_mount(head) == "/data/files"


def test_an_existing_claim_is_used_instead_of_the_charts():
    objects = render({"fileStorage": {"persistence": {"existingClaim": "shared-files"}}})
    assert not _claims(objects) and not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    assert _files_volume(_head(objects)) == {"name": "files", "persistentVolumeClaim": {"claimName": "shared-files"}}


def test_storage_url_may_be_a_directory_below_another_mount_path():
    objects = render({"fileStorage": {"mountPath": "/srv/serving/"},
                      "files": {"storage_url": "file:///srv/serving/files"}})
    assert _files_mount(_head(objects)) == "/srv/serving/"
    args = gateway_args(one(objects, "RayService"))
    assert args["files"] == {"storage_url": "file:///srv/serving/files"}
    # a plain path is a local directory to fsspec too
    objects = render({"files": {"storage_url": "/data/files/uploads"}})
    assert _files_mount(_head(objects)) == "/data/files"


def test_object_storage_needs_no_volume():
    objects = render({"files": {"storage_url": "s3://bucket/serving-files", "ttl_s": 86400}})
    assert not _claims(objects)
    head = _head(objects)
    assert _files_volume(head) is None and _files_mount(head) is None
    config = load_config(data=gateway_args(one(objects, "RayService")))
    assert (config.files.storage_url, config.files.ttl_s) == ("s3://bucket/serving-files", 86400)


@pytest.mark.parametrize("url", [
    "file:///tmp/serving-files",  # FilesConfig's default: the head container's own disk
    "file:///data/filesystem",  # a sibling that shares the prefix, not a directory below it
    "file:///data/files/../other",
    "/var/lib/files",
    "files",  # relative: wherever the replica's working directory is
    None,  # dropped: FilesConfig's default
])
def test_a_local_storage_url_outside_the_mount_path_is_refused(url):
    with pytest.raises(Exception, match=r"files\.storage_url .*outside fileStorage\.mountPath /data/files"):
        render({"files": {"storage_url": url}})


def test_the_files_mount_path_cannot_be_another_volumes():
    with pytest.raises(Exception, match=r"fileStorage\.mountPath /models-cache is already the mount path"):
        render({"fileStorage": {"mountPath": "/models-cache"}, "files": {"storage_url": "file:///models-cache"}})


@pytest.mark.parametrize("values,where", [
    ({"fileStorage": {"persistence": {"sise": "1Gi"}}}, "sise"),
    ({"fileStorage": {"persistence": {"size": "lots"}}}, "size"),
    ({"fileStorage": {"persistence": {"accessModes": ["ReadWriteSometimes"]}}}, "accessModes"),
    ({"fileStorage": {"persistence": {"accessModes": []}}}, "accessModes"),
    ({"fileStorage": {"mountPath": "data/files"}}, "mountPath"),
    ({"files": {"max_bytes": "big"}}, "max_bytes"),
    ({"batches": {"max_in_flight": 0}}, "max_in_flight"),
    ({"batches": {"max_inflight": 4}}, "max_inflight"),
])
def test_schema_rejects_wrong_file_storage_and_batches_values(values, where):
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmValuesError) as err:
            chart.validate_schema(values)
    assert where in str(err.value)


def test_batches_and_a_models_batches_flag_reach_the_gateways():
    values = {"batches": {"max_in_flight": 2, "priority": 5},
              "models": [{"name": "m", "source": "org/m", "resources": {"gpus": 1}, "batches": False}]}
    config = load_config(data=gateway_args(one(render(values), "RayService")))
    assert (config.batches.max_in_flight, config.batches.priority) == (2, 5)
    assert config.models[0].batches is False
