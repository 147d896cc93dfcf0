"""The evaluate stage on the smoke pipeline's outputs: every metric for generation, the VAE's reconstruction and the
baseline; the report against the seed's targets; the reconstruction beating generation on the surface metrics;
bad input as one sentence; the `interiorfusion eval` command."""

from __future__ import annotations

import math
import subprocess
from typing import Any

import numpy as np
import pytest
from testservers import BIN, REPO

from interiorfusion_core.contract import RunOutcome, run_stage
from interiorfusion_core.errors import UserError
from interiorfusion_core.storage import open_store
from interiorfusion_evaluate.metrics import METRIC_NAMES, TARGETS

SMOKE = REPO / "configs/smoke/evaluate.yaml"
METHODS = ("generation", "vae", "baseline")


@pytest.fixture(scope="module")
def evaluated(evaluate_smoke: tuple[RunOutcome, float]) -> tuple[RunOutcome, float]:
    """The shared smoke evaluate stage (tests/stage_outputs.py) and its wall time (s)."""
    return evaluate_smoke


@pytest.mark.slow
def test_every_metric_for_every_method_is_written(evaluated: tuple[RunOutcome, float]) -> None:
    outcome, seconds = evaluated
    report: dict[str, Any] = open_store(outcome.uri).get_json("metrics.json")
    assert report["samples"] >= 1 and report["shaded"]
    for method in METHODS:
        means = report["metrics"][method]
        assert set(means) == set(METRIC_NAMES), method
        for name, value in means.items():
            # mAP is undefined (NaN) only when no truth scene holds a detectable object.
            assert math.isfinite(value) or name == "map", (method, name, value)
        for record in report["records"]:
            assert set(METRIC_NAMES) <= set(record[method]), (method, record["key"])
    assert 0 <= report["metrics"]["generation"]["fscore"] <= 1
    # Stage time stays within the smoke budget (about two minutes on two shared cores).
    assert seconds < 240, seconds


@pytest.mark.slow
def test_the_report_names_every_metric_and_target(evaluated: tuple[RunOutcome, float]) -> None:
    outcome, _ = evaluated
    store = open_store(outcome.uri)
    text = store.get_bytes("report.md").decode()
    assert "| metric | generation | VAE recon | baseline | seed target | pass |" in text
    for name, target in TARGETS.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        verdict = row.split("|")[-2]
        assert f"{target.threshold:g}" in row and ("pass" in verdict or "fail" in verdict), row
    for label in ("best", "median", "worst"):
        key = next(k for k in outcome.manifest.artifacts if k.startswith(f"previews/{label}-"))
        assert f"]({key})" in text and store.get_bytes(key).startswith(b"\x89PNG")


@pytest.mark.slow
def test_vae_reconstruction_beats_generation_on_the_surface(evaluated: tuple[RunOutcome, float]) -> None:
    m = open_store(evaluated[0].uri).get_json("metrics.json")["metrics"]
    assert m["vae"]["chamfer"] < m["generation"]["chamfer"], m
    assert m["vae"]["fscore"] > m["generation"]["fscore"], m


@pytest.mark.slow
def test_metrics_reach_mlflow(evaluated: tuple[RunOutcome, float]) -> None:
    from mlflow.tracking import MlflowClient

    run = MlflowClient().get_run(evaluated[0].manifest.mlflow_run_id)
    for prefix in ("eval", "eval_vae", "eval_baseline"):
        assert f"{prefix}/chamfer" in run.data.metrics and f"{prefix}/fscore" in run.data.metrics, prefix


@pytest.mark.slow
def test_a_missing_split_is_one_sentence(structure_smoke: RunOutcome, tmp_path: Any) -> None:
    with pytest.raises(UserError) as err:
        run_stage("evaluate", SMOKE, inputs={"structure": structure_smoke.uri}, output=(tmp_path / "e").as_uri(),
                  overrides=("split=holdout", "fallback_split=null"))
    msg = str(err.value)
    assert "holdout" in msg and "\n" not in msg


def test_an_input_of_the_wrong_stage_is_one_sentence(smoke_data: str, tmp_path: Any) -> None:
    with pytest.raises(UserError) as err:
        run_stage("evaluate", SMOKE, inputs={"structure": smoke_data}, output=(tmp_path / "e").as_uri())
    msg = str(err.value)
    assert "must be an output of stage 'structure'" in msg and "\n" not in msg


def test_real_lpips_weights_are_required_outside_smoke(tmp_path: Any) -> None:
    from interiorfusion_core.config import load_config
    from interiorfusion_material.perceptual import check_lpips_weights

    cfg = load_config(REPO / "configs/evaluate.yaml", (f"lpips_weights.source={tmp_path / 'none.pth'}",)).model
    with pytest.raises(UserError, match="random_init: true is for test and smoke configs only"):
        check_lpips_weights(cfg.lpips_weights, cfg.lpips_network)


def test_eval_help_lists_its_options() -> None:
    out = subprocess.run([str(BIN / "interiorfusion"), "eval", "--help"], capture_output=True, text=True,
                         check=True, env={"COLUMNS": "200", "PATH": str(BIN)}).stdout
    for option in ("--structure", "--material", "--data", "--split", "--samples", "--config", "--output"):
        assert option in out, option


def test_the_mean_baseline_keeps_the_most_frequent_voxels_with_their_majority_class_and_mean_material() -> None:
    from interiorfusion_evaluate.stage import Baseline

    N = 4
    # Three training scenes of 3, 2 and 1 voxels (mean 2): cell (0,0,0) is in all three, (1,1,1) in two, (2,2,2) in
    # one, so the mean scene keeps the first two; (1,1,1) is class 7 twice; materials average per cell.
    scenes = [(np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2]]), np.array([3, 7, 1]), np.array([[0.0], [1.0], [5.0]])),
              (np.array([[0, 0, 0], [1, 1, 1]]), np.array([3, 7]), np.array([[0.5], [0.0]])),
              (np.array([[0, 0, 0]]), np.array([2]), np.array([[1.0]]))]
    baseline = Baseline.__new__(Baseline)
    baseline.resolution, baseline.scenes = N, scenes
    baseline._mean_scene()
    coords, classes, mats = baseline.mean
    assert coords.tolist() == [[0, 0, 0], [1, 1, 1]]
    assert classes.tolist() == [3, 7]
    assert np.allclose(mats[:, 0], [0.5, 0.5])


@pytest.mark.slow
def test_untextured_evaluation_against_the_mean_scene(structure_smoke: RunOutcome, tmp_path: Any) -> None:
    """Without a material input every method is drawn in class colours, and the `mean` baseline is one scene, the
    same for every held-out room."""
    outcome = run_stage("evaluate", SMOKE, inputs={"structure": structure_smoke.uri},
                        output=(tmp_path / "e").as_uri(),
                        overrides=("baseline=mean", "samples=2", "reference_vae=false", "points=500"))
    store = open_store(outcome.uri)
    report: dict[str, Any] = store.get_json("metrics.json")
    assert not report["shaded"] and report["baseline"] == "mean"
    assert set(report["metrics"]) == {"generation", "baseline"}
    for name in ("chamfer", "fscore", "psnr", "ssim", "lpips", "layout_iou", "scale_error"):
        assert math.isfinite(report["metrics"]["baseline"][name]), name
    sizes = {r["baseline"]["voxels"] for r in report["records"]}
    assert len(sizes) == 1 and sizes.pop() > 0, report["records"]
    assert "class colours" in store.get_bytes("report.md").decode()
