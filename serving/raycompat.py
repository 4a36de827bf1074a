"""Every use of Ray's private or underscored API, in one place (tests/unit/test_raycompat.py pins them).

Ray moves its internals between releases; each function here degrades to Ray's documented
behaviour when what it reads is gone, and the version test says when to look again."""

from __future__ import annotations

import os
from typing import Any

# The Ray release these accesses were read from (pyproject pins it).
RAY_VERSION = "2.60.0"
# Ray Serve's default for RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S (ray/serve/_private/constants.py).
DEFAULT_INGRESS_DRAINING_PERIOD_S = 30.0


def handle_transport() -> dict[str, Any]:
    """The handles' transport as this replica's Ray settings choose it (gRPC in throughput mode).

    A handle made in another process keeps that process's options, and that process (the driver, or
    Serve's controller) may have read Ray's settings before they were set: its calls would then go as
    Ray actor calls (1-2 ms slower each, docs/benchmarks.md)."""
    try:
        from ray.serve._private.constants import RAY_SERVE_USE_GRPC_BY_DEFAULT
    except ImportError:  # Ray moved it: keep the handles as they come
        return {}
    return {"_by_reference": not RAY_SERVE_USE_GRPC_BY_DEFAULT}


def deployment_handle(deployment: str, app: str):
    """A handle to a deployment of another application, without asking the controller whether it
    exists yet: the applications of one config deploy concurrently, and a gateway replica may start
    before a model's application is registered. Calls wait in Ray's router until it runs."""
    from ray import serve

    try:
        return serve.get_deployment_handle(deployment, app, _check_exists=False)
    except TypeError:  # the private flag is gone: the public call (which checks)
        return serve.get_deployment_handle(deployment, app)


def router_view(handle: Any) -> int | None:
    """The replicas a DeploymentHandle's router would send a request to now, or None until the
    controller has told it of a running replica (a new gateway replica's router starts empty, and an
    empty view then means "not told yet", not "none run"). Reads the handle's router internals: if they
    moved, None (the gateway then asks the controller instead)."""
    try:
        router = handle._router._asyncio_router
        if not router.running_replicas_populated():
            return None
        request_router = router._request_router
        if request_router is not None:
            return len(request_router.curr_replicas)
        return len(router._running_replicas or ())
    except AttributeError:
        return None


def versioned_deployment(options: dict[str, Any]) -> dict[str, Any]:
    """Deployment options with Ray Serve's private `_internal` flag: `Deployment.options(version=...)`
    raises ValueError without it (versions are for config files), and serving.app versions each
    deployment in code so that a redeploy restarts only what changed."""
    return {**options, "_internal": True}


def ingress_draining_period_s() -> float:
    """How long a replaced ingress replica stays reachable before refusing new connections (Ray
    Serve's direct-ingress draining period, read by each replica from its environment)."""
    value = os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S")
    try:
        return float(value) if value else DEFAULT_INGRESS_DRAINING_PERIOD_S
    except ValueError:
        return DEFAULT_INGRESS_DRAINING_PERIOD_S



def dashboard_auth_headers() -> dict[str, str]:
    """Headers that authenticate a call to this Ray cluster's dashboard (Serve's REST API) when Ray's
    token authentication is on (Ray 2.60 turns it on for a local head by itself); empty when off."""
    try:
        from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled
    except ImportError:  # Ray moved it: calls go without, and an authenticating dashboard says 401
        return {}
    return dict(get_auth_headers_if_auth_enabled({}))
