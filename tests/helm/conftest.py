"""Fixtures of the chart tests (helpers in render.py)."""

from __future__ import annotations

import pytest

from tests.helm.render import SCENARIOS
from tests.support import no_serving_env  # noqa: F401 - autouse fixture


@pytest.fixture(params=sorted(SCENARIOS), ids=sorted(SCENARIOS))
def scenario(request) -> str:
    return request.param


