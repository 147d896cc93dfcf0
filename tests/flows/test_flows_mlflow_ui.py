"""A pipeline rerun as its users see it in the MLflow UI (headless Chromium against a real `mlflow server`): the
runs table in the model-training view lists every stage instance of both runs, the cached ones too (linked to the
run that produced them), with the data stage's shards in the Dataset column and the git commit as the source."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fakestages import CountStage  # noqa: F401  (registers the count stage)

from interiorfusion_core.testing import chromium_binary, render_page

REPO = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.servers,
    pytest.mark.slow,
    pytest.mark.skipif(chromium_binary() is None, reason="no Chromium binary (Debian: apt-get install chromium)"),
]
FLAT = "&orderByKey=tags.%60mlflow.runName%60&orderByAsc=true"


def test_pipeline_runs_in_the_mlflow_ui(mlflow_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from interiorfusion_core import tracking
    from interiorfusion_flows.pipeline import interiorfusion_pipeline

    monkeypatch.setenv("INTERIORFUSION_GIT_SHA", "c0ffee" * 6 + "abcd")
    tracking.source_tags.cache_clear()
    smoke = yaml.safe_load((REPO / "configs/smoke/data.yaml").read_text())
    tiny = {**smoke, "num_scenes": 3, "voxel": {"resolutions": [32]}, "render": {"views": 1, "image_size": 32},
            "splits": {"train": 0.34, "val": 0.33, "test": 0.33}, "preview_samples": 1}
    (tmp_path / "rooms.yaml").write_text(yaml.safe_dump(tiny))
    (tmp_path / "count.yaml").write_text(yaml.safe_dump({"kind": "count"}))
    path = tmp_path / "ui.yaml"
    path.write_text(yaml.safe_dump({
        "kind": "pipeline", "name": "ui", "experiment": f"ui-{tmp_path.name}",
        "artifact_root": (tmp_path / "artifacts").as_uri(),
        "stages": {"rooms": {"stage": "data", "config": "rooms.yaml"}, "tally": {"stage": "count",
                                                                             "config": "count.yaml"}},
    }))
    try:
        first = interiorfusion_pipeline(str(path))
        again = interiorfusion_pipeline(str(path))
    finally:
        tracking.source_tags.cache_clear()
    assert all(t["cached"] for t in again["timings"].values())

    client = MlflowClient()
    parent = client.get_run(again["mlflow_parent_run_id"])
    kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {r.info.run_name: r for r in kids}
    assert set(by_name) == {"rooms", "tally"}  # a cached rerun still has its stage runs as children
    original = client.get_run(first["timings"]["tally"]["mlflow_run_id"])
    assert by_name["tally"].data.tags["interiorfusion.cached_run_id"] == original.info.run_id
    assert original.inputs.dataset_inputs[0].dataset.name == "InteriorFusion-Train"
    assert original.data.tags["mlflow.source.git.commit"] == "c0ffee" * 6 + "abcd"

    url = f"{mlflow_env}/{tracking.ui_path(parent.info.experiment_id)}{FLAT}"
    page = render_page(url, tmp_path / "browser")
    dom = page.dom
    assert "Overview" not in [h.strip() for h in __import__("re").findall(r"<h2[^>]*>([^<]*)</h2>", dom)]
    for run in (*kids, original):
        assert run.info.run_id in dom, f"run {run.info.run_name} ({run.info.run_id}) not in the runs table"
    assert dom.count(">rooms<") >= 2 and dom.count(">tally<") >= 2, "each instance of both runs is a row"
    assert "InteriorFusion-Train" in dom  # the Dataset column
