"""The Prefect pipeline over real (tiny) stages: content-addressed caching, --only/--from/--force, MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fakestages import EchoStage  # noqa: F401  (registers the echo/upper stages)
from typer.testing import CliRunner

from interiorfusion_core.errors import UserError
from interiorfusion_core.manifest import read_manifest


def _pipeline(tmp_path: Path, text: str = "abc", name: str = "p") -> Path:
    (tmp_path / "echo.yaml").write_text(yaml.safe_dump({"kind": "echo", "echo": {"text": text}}))
    (tmp_path / "upper.yaml").write_text(yaml.safe_dump({"kind": "upper"}))
    cfg = {
        "kind": "pipeline", "name": name, "artifact_root": (tmp_path / "artifacts").as_uri(),
        "stages": {"echo": {"config": "echo.yaml"}, "upper": {"config": "upper.yaml"}},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_pipeline_caches_and_reruns_downstream(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from interiorfusion_flows.pipeline import interiorfusion_pipeline

    path = _pipeline(tmp_path)
    first = interiorfusion_pipeline(str(path))
    assert {n: t["cached"] for n, t in first["timings"].items()} == {"echo": False, "upper": False}
    assert read_manifest(first["stages"]["upper"]).stage == "upper"

    again = interiorfusion_pipeline(str(path))
    assert {n: t["cached"] for n, t in again["timings"].items()} == {"echo": True, "upper": True}
    assert again["stages"] == first["stages"]

    # A changed upstream config gives new keys for it and everything downstream; old outputs stay intact.
    _pipeline(tmp_path, text="xyz")
    changed = interiorfusion_pipeline(str(path))
    assert not changed["timings"]["echo"]["cached"] and not changed["timings"]["upper"]["cached"]
    assert changed["stages"]["upper"] != first["stages"]["upper"]
    assert read_manifest(first["stages"]["upper"]).stage == "upper"

    # --only upper reruns one stage against the latest run's upstream; --force makes it run again.
    only = interiorfusion_pipeline(str(path), only="upper", force=["upper"])
    assert set(only["timings"]) == {"upper"} and not only["timings"]["upper"]["cached"]
    assert only["stages"]["echo"] == changed["stages"]["echo"]
    # --from echo with nothing changed: both cached.
    frm = interiorfusion_pipeline(str(path), from_stage="echo")
    assert all(t["cached"] for t in frm["timings"].values())

    client = MlflowClient()
    parent = client.get_run(first["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    exp = parent.info.experiment_id
    kids = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in kids) == ["echo", "upper"]


def test_pipeline_config_errors(tmp_path: Path) -> None:
    from interiorfusion_flows.cli import app
    from interiorfusion_flows.pipeline import load_pipeline

    path = _pipeline(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["stages"]["bogus"] = {"config": "echo.yaml"}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match="stages.bogus: stage 'bogus' is not installed"):
        load_pipeline(path)
    data["stages"].pop("bogus")
    data["stages"]["echo"]["executor"] = "slurm"
    path.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(app, ["pipeline", "run", "--config", str(path)])
    assert res.exit_code == 2 and "stages.echo.executor" in res.output


def test_only_without_a_previous_run_is_refused(tmp_path: Path) -> None:
    from interiorfusion_flows.cli import app

    path = _pipeline(tmp_path, name="fresh")
    res = CliRunner().invoke(app, ["pipeline", "run", "--config", str(path), "--only", "upper"])
    assert res.exit_code == 1 and "no record of an earlier pipeline run" in res.output
