"""Build the material image, the one stage image with torchvision (for LPIPS), and run LPIPS in it.

Opt-in, because it is big and slow: offline on these machines the only torch with a matching torchvision is the
development pin's CUDA build (requirements/torch-cpu-dev.txt), so the images get a ~5.5 GB environment and a cold
build takes minutes (containers/README.md, "torchvision in stage images"). Run with a Docker engine and

    INTERIORFUSION_BUILD_MATERIAL_IMAGE=1 pytest -m docker tests/containers/test_containers_material_image.py

It tags `interiorfusion-test/{base,material}:torchvision`, so the CPU images of test_containers_images.py stay.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PREFIX = "interiorfusion-test"
TAG = "torchvision"
pytestmark = [
    pytest.mark.docker,
    pytest.mark.slow,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(
        os.environ.get("INTERIORFUSION_BUILD_MATERIAL_IMAGE") != "1",
        reason="builds a ~6 GB image for minutes: set INTERIORFUSION_BUILD_MATERIAL_IMAGE=1",
    ),
]


def dev_pair() -> tuple[str, str]:
    spec = importlib.util.spec_from_file_location("if_containers_build_m", REPO / "containers" / "build.py")
    build = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = build  # its dataclasses look their module up
    spec.loader.exec_module(build)
    torch_spec = build.dev_torch_spec()
    return torch_spec, build.torchvision_for(torch_spec)


@pytest.fixture(scope="module")
def image(docker_host: str) -> str:
    torch_spec, _ = dev_pair()
    env = dict(os.environ, DOCKER_HOST=docker_host)
    cmd = ["bash", str(REPO / "containers" / "build.sh"), "--stages", "material", "--torch-spec", torch_spec]
    cmd += ["--prefix", PREFIX, "--tag", TAG]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, f"build.sh failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return f"{PREFIX}/material:{TAG}"


def test_lpips_runs_offline_as_non_root(image, docker):
    torch_spec, torchvision_spec = dev_pair()
    script = (
        "import os, torch, torchvision, lpips; "
        "m = lpips.LPIPS(net='vgg', pnet_rand=True, verbose=False); "
        "x = torch.rand(2, 3, 64, 64) * 2 - 1; "
        "d = m(x, x.flip(0)); "
        "print(os.getuid(), torch.__version__, torchvision.__version__, tuple(d.shape), bool(torch.isfinite(d).all()))"
    )
    out = docker("run", "--rm", "--network", "none", "--entrypoint", "python", image, "-c", script).stdout.split()
    assert out[0] == "10001", out
    assert out[1].startswith(torch_spec.split("==")[1]) and out[2].startswith(torchvision_spec.split("==")[1]), out
    assert out[-1] == "True", out


def test_entry_point_runs_the_material_module(image, docker):
    proc = docker("run", "--rm", "--network", "none", image, "--help")
    assert "python -m interiorfusion_material" in proc.stdout, proc.stdout
