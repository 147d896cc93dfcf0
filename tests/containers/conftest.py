"""Fixtures for the container tests: a reachable Docker engine, started on demand."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERD_SH = REPO / "containers" / "dockerd.sh"


def docker_cli() -> str | None:
    """A docker CLI that can build with BuildKit or the legacy builder (build.py picks the mode)."""
    for candidate in (shutil.which("docker"), "/usr/bin/docker"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def engine_answers(cli: str, docker_host: str) -> bool:
    env = dict(os.environ, DOCKER_HOST=docker_host)
    try:
        proc = subprocess.run(
            [cli, "version", "--format", "{{.Server.Version}}"], env=env, capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


@pytest.fixture(scope="session")
def docker_host() -> Iterator[str]:
    """DOCKER_HOST of a Docker engine for the session.

    Uses $DOCKER_HOST when it answers; else the private daemon of containers/dockerd.sh when it already runs
    (left running); else starts that daemon when dockerd exists and we are root, and stops it afterwards.
    Skips with the reason otherwise.
    """
    cli = docker_cli()
    if cli is None:
        pytest.skip("no docker CLI (apt-get install docker.io, or run containers/ci-setup.sh)")
    if os.environ.get("DOCKER_HOST"):
        host = os.environ["DOCKER_HOST"]
        if not engine_answers(cli, host):
            pytest.skip(f"DOCKER_HOST={host} does not answer")
        yield host
        return
    env_line = subprocess.run([str(DOCKERD_SH), "env"], capture_output=True, text=True, check=True).stdout
    host = env_line.strip().split("=", 1)[1]
    if subprocess.run([str(DOCKERD_SH), "status"]).returncode == 0:
        yield host
        return
    if not shutil.which("dockerd"):
        pytest.skip("no Docker engine: DOCKER_HOST unset and dockerd not installed (containers/ci-setup.sh)")
    if os.geteuid() != 0:
        pytest.skip("no Docker engine: DOCKER_HOST unset and starting dockerd needs root")
    start = subprocess.run([str(DOCKERD_SH), "start"], capture_output=True, text=True)
    if start.returncode != 0:
        pytest.fail(f"containers/dockerd.sh start failed:\n{start.stderr}")
    try:
        yield host
    finally:
        subprocess.run([str(DOCKERD_SH), "stop"], check=False)


@pytest.fixture(scope="session")
def docker(docker_host: str):
    """Run the docker CLI against the session's engine: docker("run", ...) -> CompletedProcess (text)."""
    cli = docker_cli()
    env = dict(os.environ, DOCKER_HOST=docker_host)

    def _docker(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([cli, *args], env=env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    return _docker


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """The MLflow server of tests/conftest.py, but serving artifacts itself (`--artifacts-destination`), as a
    team server must for containers: with a plain `--default-artifact-root file://...` the MLflow client in a
    container writes artifacts into the container's own file system. `mlflow_env` picks this one up here."""
    from testservers import stop

    from interiorfusion_core.testing import start_mlflow

    root = tmp_path_factory.mktemp("mlflow-proxied")
    uri, proc = start_mlflow(root, ["--serve-artifacts", "--artifacts-destination", str(root / "artifacts")])
    try:
        yield SimpleNamespace(uri=uri, proc=proc, artifacts=root / "artifacts")
    finally:
        stop(proc)
