"""Build the base and data images with containers/build.sh and run them (needs a Docker engine).

The first run on a machine is cold (debootstrap, wheelhouse, torch install: ~5 min on 2 cores); later runs
reuse the daemon's layer cache and the wheelhouse and take seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PREFIX = "interiorfusion-test"
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(3600)]


def build(docker_host: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DOCKER_HOST=docker_host)
    cmd = ["bash", str(REPO / "containers" / "build.sh"), "--stages", "data", "--prefix", PREFIX, *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, f"build.sh failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc


@pytest.fixture(scope="module")
def images(docker_host: str) -> dict[str, str]:
    build(docker_host)
    return {"base": f"{PREFIX}/base:latest", "data": f"{PREFIX}/data:latest"}


def test_data_image_imports_as_non_root(images, docker):
    out = docker(
        "run",
        "--rm",
        "--network",
        "host",
        "--entrypoint",
        "python",
        images["data"],
        "-c",
        "import os, interiorfusion_core, interiorfusion_data, torch; "
        "print(os.getuid(), os.getgid(), torch.__version__, torch.version.cuda)",
    ).stdout.split()
    assert out[:2] == ["10001", "10001"]
    assert out[2].endswith("+cpu") and out[3] == "None", (
        f"CPU images must carry the CPU-only torch, got {out}"
    )


def test_image_config(images, docker):
    for name, image in images.items():
        config = json.loads(docker("image", "inspect", image).stdout)[0]["Config"]
        assert config["User"] == "10001:10001", name
        assert "/opt/venv/bin" in next(e for e in config["Env"] if e.startswith("PATH=")), name
    data = json.loads(docker("image", "inspect", images["data"]).stdout)[0]["Config"]
    assert "INTERIORFUSION_STAGE=data" in data["Env"] and "INTERIORFUSION_PACKAGE=data" in data["Env"]
    assert any("interiorfusion_${INTERIORFUSION_PACKAGE}" in part for part in data["Entrypoint"])


def test_entrypoint_runs_the_stage_module(images, docker):
    proc = docker("run", "--rm", "--network", "host", images["data"], "--help", check=False)
    # Until the stage package has its __main__, python says which module it could not run: that still
    # proves the entry point resolves to `python -m interiorfusion_data`.
    assert proc.returncode == 0 or "interiorfusion_data" in proc.stderr, proc.stderr


def test_no_wheels_or_nvidia_packages_in_final_image(images, docker):
    script = (
        "import glob, importlib.util, sys; "
        "left = [p for d in ('/wheels', '/project', '/overlay', '/requirements', '/opt/venv') "
        "for p in glob.glob(d + '/**/*.whl', recursive=True)] + "
        "[d for d in ('/wheels', '/project', '/overlay') if glob.os.path.exists(d)]; "
        "assert not left, left; "
        "assert importlib.util.find_spec('nvidia') is None, 'nvidia-* wheels in a CPU image'"
    )
    docker("run", "--rm", "--network", "none", "--entrypoint", "python", images["data"], "-c", script)


def test_rebuild_is_cached(images, docker_host):
    t0 = time.monotonic()
    proc = build(docker_host)
    assert proc.stderr.count("up to date") >= 2, proc.stderr[-3000:]
    assert time.monotonic() - t0 < 120
