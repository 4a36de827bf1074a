"""serving.raycompat holds every use of Ray's private API: these tests say when Ray moved one."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest

from serving import raycompat


def _run(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                         env={**clean, **env})
    return out.stdout.strip().splitlines()[-1]


def test_the_installed_ray_is_the_one_these_accesses_were_read_from():
    import ray

    assert ray.__version__ == raycompat.RAY_VERSION, "read serving/raycompat.py against this Ray, then bump it"


@pytest.mark.parametrize("throughput_mode, by_reference", [("1", False), ("0", True)])
def test_gateway_handles_take_the_transport_of_the_replicas_own_ray_settings(throughput_mode, by_reference):
    """Handles made elsewhere keep the transport their maker chose when it imported Ray Serve; the
    gateway re-chooses it from its own process's settings (gRPC in throughput mode)."""
    code = "from serving.raycompat import handle_transport; print(handle_transport())"
    assert _run(code, RAY_SERVE_THROUGHPUT_OPTIMIZED=throughput_mode) == repr({"_by_reference": by_reference})


def test_handles_to_other_applications_need_not_exist_yet():
    from ray import serve

    assert "_check_exists" in inspect.signature(serve.get_deployment_handle).parameters


def test_the_draining_period_is_rays_own():
    """The gateway's shutdown deadline adds the grace period to Ray's draining period: both must
    read the same variable with the same default."""
    code = ("from ray.serve._private.constants import RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S as p;"
            "from serving.raycompat import ingress_draining_period_s as ours; print(p, ours())")
    assert _run(code) == f"{raycompat.DEFAULT_INGRESS_DRAINING_PERIOD_S} {raycompat.DEFAULT_INGRESS_DRAINING_PERIOD_S}"
    assert _run(code, RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="4") == "4.0 4.0"


def test_dashboard_auth_headers_come_from_rays_own_token_loader():
    from ray._private.authentication import http_token_authentication

    assert callable(http_token_authentication.get_auth_headers_if_auth_enabled)
    assert isinstance(raycompat.dashboard_auth_headers(), dict)


def test_versions_in_code_need_the_internal_flag():
    from ray import serve
    from ray.serve.deployment import Deployment

    assert "_internal" in inspect.signature(Deployment.options).parameters
    deployment = serve.deployment(lambda: None, name="probe")
    with pytest.raises(ValueError):
        deployment.options(version="v1")
    assert deployment.options(**raycompat.versioned_deployment({"version": "v1"})).version == "v1"


def test_router_view_degrades_to_none_when_the_internals_are_gone():
    assert raycompat.router_view(object()) is None  # the real handle's view: tests/integration/test_platform.py
