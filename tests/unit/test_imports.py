"""The gateway side must not import vllm or torch: its replicas start in seconds."""

from __future__ import annotations

import json
import subprocess
import sys

GATEWAY_MODULES = ["serving.gateway.app", "serving.app", "serving.engine.remote", "serving.engine.fake",
                   "serving.config"]

PROBE = """
import json, sys
import {modules}
print(json.dumps({{"heavy": sorted(m for m in sys.modules if m.split(".")[0] in ("vllm", "torch")),
                  "loaded": [m for m in {names!r} if m in sys.modules]}}))
"""


def probe(modules: list[str]) -> dict:
    code = PROBE.format(modules=", ".join(modules), names=modules)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_gateway_modules_import_neither_vllm_nor_torch() -> None:
    result = probe(GATEWAY_MODULES)
    assert result["loaded"] == GATEWAY_MODULES
    assert result["heavy"] == []


def test_probe_detects_heavy_imports() -> None:
    # the check above is only worth something if the probe sees a heavy import when there is one
    result = probe(["serving.config", "torch"])
    assert "torch" in result["heavy"]
