"""The MLflow UI, rendered by headless Chromium against a real `mlflow server`: a pipeline rerun's stage runs (one
cached) show in the runs table with their dataset and source, in the model-training view, not the GenAI overview."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from interiorfusion_core.testing import chromium_binary, render_page
from interiorfusion_core.tracking import Tracker, source_tags

pytestmark = [
    pytest.mark.servers,
    pytest.mark.slow,
    pytest.mark.skipif(
        chromium_binary() is None,
        reason="no Chromium binary (Debian: apt-get install chromium; .ci/run installs it)",
    ),
]

DIGEST = "5e" * 32
# Sorted by run name the runs table lists every run as a row; sorted by date (the default) it nests child
# runs under collapsed parents, out of the DOM.
FLAT = "&orderByKey=tags.%60mlflow.runName%60&orderByAsc=true"


def headings(dom: str) -> list[str]:
    """The page titles (`<h2>`): "Runs" in the model-training view, "Training runs" for the same table in the
    GenAI view, "Overview" on the GenAI landing page."""
    return re.findall(r"<h2[^>]*>([^<]*)</h2>", dom)


def test_pipeline_rerun_in_the_mlflow_ui(mlflow_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERIORFUSION_GIT_SHA", "feedc0de" * 5)
    source_tags.cache_clear()
    try:
        exp = f"ui-check-{uuid.uuid4().hex[:8]}"
        # The first pipeline run did the data stage ...
        first = Tracker("pipeline:ui-check", experiment=exp)
        data = Tracker("data-shards", experiment=exp, parent_run_id=first.run_id, tags={"interiorfusion.stage": "data"})
        data.log_metrics({"final/scenes": 12}, step=0)
        data.end()
        first.end()
        # ... the rerun finds it cached and runs the VAE on its shards.
        parent = Tracker("pipeline:ui-check", experiment=exp)
        cached = parent.log_cached_child("data-shards", data.run_id)
        vae = Tracker("vae-smoke", experiment=exp, parent_run_id=parent.run_id, tags={"interiorfusion.stage": "vae"})
        vae.log_dataset_input("data-shards", "s3://bucket/pipelines/ui-check/data/5e5e", DIGEST)
        vae.log_metrics({"final/loss": 0.125}, step=0)
        vae.end()
        parent.end()
    finally:
        source_tags.cache_clear()

    page = f"{mlflow_env}/#/experiments/{parent.experiment_id}"
    assert parent.experiment_url == f"{page}/runs?workflowType=machine_learning"
    runs = render_page(parent.experiment_url + FLAT, tmp_path / "runs")
    assert headings(runs.dom) == ["Runs"], f"not the model-training runs table: {headings(runs.dom)}"
    link = rf'href="#/experiments/{parent.experiment_id}/runs/(\w+)"><span[^>]*>([^<]+)</span>'
    rows = dict(re.findall(link, runs.dom))  # the Run Name column: run id -> name
    expected = {
        first.run_id: "pipeline:ui-check",
        data.run_id: "data-shards",
        parent.run_id: "pipeline:ui-check",
        cached: "data-shards",
        vae.run_id: "vae-smoke",
    }
    assert rows == expected, "each run, the cached stage's stand-in too, is a row named after its stage"
    assert f"data-shards ({DIGEST[:8]})" in runs.dom  # the Dataset column
    assert ">interiorfusion<" in runs.dom  # the Source column
    assert runs.screenshot is not None and runs.screenshot.stat().st_size > 10_000

    # The same experiment in the GenAI view opens on its overview: the heading check tells the two apart.
    genai = render_page(f"{page}?workflowType=genai", tmp_path / "genai")
    assert headings(genai.dom) == ["Overview"]
