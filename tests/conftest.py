"""Shared fixtures: an isolated state dir per test session and real servers on 127.0.0.1 (S3 via `rclone serve
s3`, MLflow via `mlflow server`), started on free ports and stopped at the end."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from testservers import BIN, REPO, S3Server, free_port, start_s3, stop, wait_http  # noqa: F401

from interiorfusion_core.testing import start_mlflow

# Session-wide stage outputs (smoke data, VAE, structure stage) shared by tests/vae, tests/structure, ...
pytest_plugins = ["stage_outputs"]

# Never write into the repository's own .interiorfusion/ from tests; every test session gets a fresh home.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="interiorfusion-tests-"))
os.environ["INTERIORFUSION_HOME"] = str(_SESSION_HOME)
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_HOME / 'mlflow.db'}"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread per process: test processes (pytest, launched ranks, loader workers) share two cores, and
# oversubscribed OpenMP threads spin-wait (8× slower sparse convs measured). Tests needing 2 threads set them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
os.environ.pop("PREFECT_API_URL", None)
for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "INTERIORFUSION_ARTIFACT_ROOT"):
    os.environ.pop(var, None)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_s3(tmp_path_factory.mktemp("s3") / "data")
    yield server
    stop(server.proc)


def _reset_s3_clients() -> None:
    from interiorfusion_core import storage

    storage._S3_CLIENTS.clear()
    storage._S3_SPARES.clear()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """AWS_* pointing at the test server; yields a fresh `s3://bucket/prefix` for this test."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    _reset_s3_clients()
    yield f"s3://{s3_server.bucket}/t-{uuid.uuid4().hex[:10]}"
    _reset_s3_clients()


@dataclass
class MlflowServer:
    uri: str
    proc: subprocess.Popen


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    root = tmp_path_factory.mktemp("mlflow-server")
    uri, proc = start_mlflow(root, ["--default-artifact-root", (root / "artifacts").as_uri()])
    yield MlflowServer(uri, proc)
    stop(proc)


@pytest.fixture
def mlflow_env(mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    return mlflow_server.uri


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working directory and state dir for tests that exercise the CLI end to end."""
    monkeypatch.chdir(tmp_path)
    home = tmp_path / ".interiorfusion"
    monkeypatch.setenv("INTERIORFUSION_HOME", str(home))
    return tmp_path


@dataclass
class PrefectServer:
    api_url: str
    home: Path
    proc: subprocess.Popen

    def env(self) -> dict[str, str]:
        return {"PREFECT_API_URL": self.api_url, "PREFECT_HOME": str(self.home),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    log = home / "server.log"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    wait_http(f"{api}/health", 180, proc, log)
    yield PrefectServer(api, home, proc)
    stop(proc, timeout=20)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Prefect's temporary API logs its shutdown at interpreter exit, after pytest closed the captured streams.
    import logging

    logging.disable(logging.CRITICAL)
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)
