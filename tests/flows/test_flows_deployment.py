"""Deployments from prefect.yaml, run by a process worker against a real Prefect server, MLflow server and S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from testservers import REPO, stop

BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.servers, pytest.mark.slow]


def _run(cmd: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _smoke_pipeline(tmp_path: Path, s3_uri: str) -> Path:
    """The smoke pipeline with its outputs on the S3 test server."""
    cfg = yaml.safe_load((REPO / "configs/smoke/pipeline.yaml").read_text())
    cfg["artifact_root"] = s3_uri
    cfg["name"] = "deployed"
    for entry in cfg["stages"].values():
        entry["config"] = str(REPO / "configs/smoke" / entry["config"])
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_deployment_run_with_a_process_worker(prefect_server, mlflow_env, s3_env, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from interiorfusion_core.manifest import read_manifest
    from interiorfusion_core.storage import open_store

    env = {**os.environ, **prefect_server.env(), "INTERIORFUSION_REPO": str(REPO),
           "INTERIORFUSION_HOME": str(tmp_path / "home")}
    _run([str(BIN / "prefect"), "work-pool", "create", "interiorfusion-process", "--type", "process",
          "--overwrite"], env)
    _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "smoke"], env)
    worker_log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", "interiorfusion-process", "--type", "process"],
        env=env, cwd=tmp_path, stdout=open(worker_log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        pipeline = _smoke_pipeline(tmp_path, s3_env)
        started = time.monotonic()
        res = _run([str(BIN / "prefect"), "deployment", "run", "interiorfusion-pipeline/smoke",
                    "--param", f"config={pipeline}", "--watch", "--watch-timeout", "1500"], env, timeout=1560)
        print(f"deployment run took {time.monotonic() - started:.1f} s")
        assert "Completed" in res.stdout, res.stdout[-2000:] + worker_log.read_text()[-3000:]
        first = open_store(s3_env).child("pipelines/deployed").get_json("runs/latest.json")
        # The same deployment again: every stage is found in the content-addressed cache.
        _run([str(BIN / "prefect"), "deployment", "run", "interiorfusion-pipeline/smoke",
              "--param", f"config={pipeline}", "--watch", "--watch-timeout", "600"], env, timeout=660)
        again = open_store(s3_env).child("pipelines/deployed").get_json("runs/latest.json")
        assert again["run_id"] != first["run_id"] and again["stages"] == first["stages"]
        assert all(t["cached"] for t in again["timings"].values()), again["timings"]
    finally:
        stop(worker, timeout=15)

    record = first
    stages = yaml.safe_load(pipeline.read_text())["stages"]
    assert set(record["stages"]) == set(stages)
    for uri in record["stages"].values():
        out = open_store(uri)
        manifest = read_manifest(out)
        for key, entry in manifest.artifacts.items():
            info = out.stat(key)
            assert (info.size, info.sha256) == (entry.size, entry.sha256), key
            out.get_bytes(key, entry.sha256) if entry.size < (64 << 20) else None

    client = MlflowClient(mlflow_env)
    parent = client.get_run(record["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in kids) == sorted(stages)
    for run in kids:
        assert run.data.params and run.data.metrics, run.info.run_name
        images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
        assert any(p.endswith(".png") for p in images), (run.info.run_name, images)
    # Orchestration overhead per stage: the task's wall time minus the stage's own time.
    overhead = {n: t["seconds"] - t["stage_seconds"] for n, t in record["timings"].items()}
    print("orchestration overhead (s):", json.dumps(overhead))
