"""docs/observability.md stays in step with the metrics, the alerts and the plots it documents."""

from __future__ import annotations

import re

import yaml

from loadtests.dashboard_plots import KEY_PANELS
from tests.monitoring.promql import ALERTS, ROOT, gateway_metric_names, vllm_metric_names

DOC = ROOT / "docs" / "observability.md"


def test_every_gateway_metric_and_the_main_vllm_ones_are_in_the_reference():
    text = DOC.read_text()
    for name in gateway_metric_names():
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert f"`{base}`" in text, base
    for name in vllm_metric_names():
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert f"`{base}`" in text, base


def test_every_alert_is_explained():
    text = DOC.read_text()
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            assert f"| `{rule['alert']}` | {rule['labels']['severity']} |" in text, rule["alert"]


def test_the_plots_it_shows_exist():
    images = re.findall(r"!\[[^\]]*\]\((img/[^)]+\.png)\)", DOC.read_text())
    assert sorted(images) == sorted(f"img/{name}.png" for name in KEY_PANELS)
    for image in images:
        path = DOC.parent / image
        assert path.is_file() and path.stat().st_size > 10_000, path
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def test_the_documented_port_and_relabelling_are_the_real_ones():
    from serving.config import GatewayConfig

    text = DOC.read_text()
    assert f"(default **{GatewayConfig().metrics_port}**)" in text
    config = (ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text()
    for line in ("regex: ray_(serving_.*)", "regex: ray_vllm_(.*)", "replacement: vllm:$1"):
        assert line in config and line in text, line
