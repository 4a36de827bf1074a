"""Fixtures of the chart tests (helpers in render.py)."""

from __future__ import annotations

import os

import pytest

from tests.helm.render import SCENARIOS


@pytest.fixture(params=sorted(SCENARIOS), ids=sorted(SCENARIOS))
def scenario(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _no_serving_env(monkeypatch):
    # load_config reads SERVING_* overrides: the developer's environment must not change a verdict
    for key in list(os.environ):
        if key.startswith("SERVING_"):
            monkeypatch.delenv(key)
