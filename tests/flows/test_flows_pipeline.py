"""The Prefect pipeline over real (tiny) stages: content-addressed caching, --only/--from/--force, MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fakestages import EchoStage  # noqa: F401  (registers the echo/upper stages)
from typer.testing import CliRunner

from interiorfusion_core.errors import UserError
from interiorfusion_core.manifest import read_manifest

REPO = Path(__file__).resolve().parents[2]


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
    # A forced rerun of a deterministic upstream stage produces the same content: downstream stays cached.
    forced = interiorfusion_pipeline(str(path), force=["echo"])
    assert not forced["timings"]["echo"]["cached"] and forced["timings"]["upper"]["cached"]
    assert forced["stages"] == changed["stages"]

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
    with pytest.raises(UserError, match=r"stages\.bogus: stage 'bogus' is not installed"):
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


def _graph(tmp_path: Path, stages: dict) -> Path:
    for kind in ("echo", "upper", "link"):
        (tmp_path / f"{kind}.yaml").write_text(yaml.safe_dump({"kind": kind}))
    path = tmp_path / "graph.yaml"
    path.write_text(yaml.safe_dump({"kind": "pipeline", "name": "g", "artifact_root": (tmp_path / "a").as_uri(),
                                    "stages": stages}))
    return path


def test_pipeline_graph_of_named_instances(tmp_path: Path) -> None:
    from interiorfusion_core.config.pipeline import load_pipeline

    path = _graph(tmp_path, {
        "shout": {"stage": "upper", "config": "upper.yaml", "inputs": {"source": "second"}},
        "first": {"stage": "echo", "config": "echo.yaml"},
        "second": {"stage": "echo", "config": "echo.yaml"},
        "whisper": {"stage": "upper", "config": "upper.yaml", "inputs": {"source": "first"}},
    })
    _, graph = load_pipeline(path)
    assert graph.inputs == {"shout": {"source": "second"}, "first": {}, "second": {},
                            "whisper": {"source": "first"}}
    assert graph.order.index("second") < graph.order.index("shout")
    assert graph.order.index("first") < graph.order.index("whisper")
    assert graph.downstream_of("first") == {"whisper"} and graph.upstream_of("shout") == {"second"}


@pytest.mark.parametrize(("stages", "message"), [
    ({"a": {"stage": "echo", "config": "echo.yaml"}, "b": {"stage": "echo", "config": "echo.yaml"},
      "u": {"stage": "upper", "config": "upper.yaml"}},
     r"stages\.u\.inputs: input 'source' could come from any of a, b; say which"),
    ({"e": {"stage": "echo", "config": "echo.yaml"},
      "u": {"stage": "upper", "config": "upper.yaml", "inputs": {"source": "nobody"}}},
     r"stages\.u\.inputs\.source: no instance named 'nobody'"),
    ({"l": {"stage": "link", "config": "link.yaml"},
      "u": {"stage": "upper", "config": "upper.yaml", "inputs": {"source": "l"}}},
     r"stages\.u\.inputs\.source: 'l' is a 'link' instance, but input 'source' of stage 'upper' needs a 'echo'"),
    ({"a": {"stage": "link", "config": "link.yaml", "inputs": {"prev": "b"}},
      "b": {"stage": "link", "config": "link.yaml", "inputs": {"prev": "a"}}},
     r"stages: the inputs form a cycle: a → b → a"),
    ({"u": {"stage": "upper", "config": "upper.yaml"}},
     r"stages\.u: stage 'upper' needs input 'source' from a 'echo' instance, and this pipeline has none"),
    ({"e": {"stage": "echo", "config": "echo.yaml", "inputs": {"text": "e"}}},
     r"stages\.e\.inputs\.text: stage 'echo' takes no input 'text'"),
    ({"e": {"stage": "echo", "config": "upper.yaml"}}, r"upper\.yaml: kind: this is a 'upper' config but a 'echo'"),
])
def test_pipeline_graph_errors_are_one_line(tmp_path: Path, stages: dict, message: str) -> None:
    from interiorfusion_flows.cli import app

    path = _graph(tmp_path, stages)
    res = CliRunner().invoke(app, ["config", "check", str(path)])
    assert res.exit_code == 2, res.output
    assert res.output.strip().count("\n") == 0
    import re

    assert re.search(message, res.output), res.output


@pytest.mark.slow
def test_pipeline_runs_two_instances_of_one_stage(tmp_path: Path) -> None:
    """Two `data` instances (synthetic rooms and a second, differently seeded set standing in for real scans), each
    an instance with its own Prefect task, MLflow run name and output prefix; `--only`/`--force` take instance
    names."""
    from mlflow.tracking import MlflowClient

    from interiorfusion_flows.pipeline import interiorfusion_pipeline

    smoke = yaml.safe_load((REPO / "configs/smoke/data.yaml").read_text())
    tiny = {**smoke, "num_scenes": 3, "voxel": {"resolutions": [32]}, "render": {"views": 1, "image_size": 32},
            "splits": {"train": 0.34, "val": 0.33, "test": 0.33}, "preview_samples": 1}
    (tmp_path / "synthetic.yaml").write_text(yaml.safe_dump(tiny))
    (tmp_path / "scans.yaml").write_text(yaml.safe_dump({**tiny, "seed": 7, "dataset": "InteriorFusion-Real"}))
    (tmp_path / "echo.yaml").write_text(yaml.safe_dump({"kind": "echo"}))
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({
        "kind": "pipeline", "name": "two", "artifact_root": (tmp_path / "artifacts").as_uri(),
        "stages": {"synthetic": {"stage": "data", "config": "synthetic.yaml"},
                   "real_scans": {"stage": "data", "config": "scans.yaml"},
                   "note": {"stage": "echo", "config": "echo.yaml"}},
    }))
    first = interiorfusion_pipeline(str(path))
    assert first["instances"] == {"synthetic": "data", "real_scans": "data", "note": "echo"}
    assert not any(t["cached"] for t in first["timings"].values())
    syn, real = read_manifest(first["stages"]["synthetic"]), read_manifest(first["stages"]["real_scans"])
    assert syn.stage == real.stage == "data" and syn.digest != real.digest
    assert "/synthetic/" in first["stages"]["synthetic"] and "/real_scans/" in first["stages"]["real_scans"]
    assert real.config["dataset"] == "InteriorFusion-Real"

    client = MlflowClient()
    parent = client.get_run(first["mlflow_parent_run_id"])
    kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in kids) == ["note", "real_scans", "synthetic"]

    again = interiorfusion_pipeline(str(path), only="real_scans", force=["real_scans"])
    assert set(again["timings"]) == {"real_scans"} and not again["timings"]["real_scans"]["cached"]
    assert again["stages"] == first["stages"]  # deterministic data: the same content, the same prefix
