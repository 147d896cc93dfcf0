"""The subprocess executor: the data stage as `python -m interiorfusion_data`, the VAE under `accelerate launch`
with 2 CPU processes (DeepSpeed ZeRO-2 over gloo), chained by the pipeline through manifests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from testservers import REPO

from interiorfusion_core.manifest import read_manifest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

VAE_SET = ["training.max_steps=4", "training.curriculum.0.steps=2", "training.curriculum.1.steps=2",
           "training.checkpoint_every=2", "encode.eval_samples=1"]


def test_subprocess_and_accelerate_executors(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from interiorfusion_flows.pipeline import interiorfusion_pipeline

    cfg = {
        "kind": "pipeline", "name": "sub", "artifact_root": (tmp_path / "artifacts").as_uri(),
        "stages": {
            "data": {"config": str(REPO / "configs/smoke/data.yaml"), "executor": "subprocess",
                     "set": ["num_scenes=6"]},
            "vae": {"config": str(REPO / "configs/smoke/vae.yaml"), "executor": "subprocess", "num_processes": 2,
                    "accelerate_config": str(REPO / "configs/accelerate_deepspeed_zero2.yaml"), "set": VAE_SET},
        },
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    record = interiorfusion_pipeline(str(path))
    vae = read_manifest(record["stages"]["vae"])
    assert vae.outputs["checkpoint"].endswith("step-00000004") and "latents/index.json" in vae.artifacts
    assert vae.inputs["data"].uri == record["stages"]["data"]
    run = MlflowClient().get_run(vae.mlflow_run_id)
    assert run.data.tags["mlflow.parentRunId"] == record["mlflow_parent_run_id"]
    # Two ranks trained one global batch of 2 × batch_size.
    assert run.data.metrics["train/samples_per_s"] > 0


def test_the_vae_trains_under_the_seeds_zero3_launcher(tmp_path: Path) -> None:
    """The seed's `accelerate launch --config_file configs/accelerate_deepspeed.yaml` (ZeRO-3) through the pipeline's
    subprocess executor: 2 CPU processes train, evaluate and encode."""
    from interiorfusion_flows.pipeline import interiorfusion_pipeline

    cfg = {
        "kind": "pipeline", "name": "z3", "artifact_root": (tmp_path / "artifacts").as_uri(),
        "stages": {
            "data": {"config": str(REPO / "configs/smoke/data.yaml"), "set": ["num_scenes=6"]},
            "vae": {"config": str(REPO / "configs/smoke/vae.yaml"), "executor": "subprocess", "num_processes": 2,
                    "accelerate_config": str(REPO / "configs/accelerate_deepspeed.yaml"), "set": VAE_SET,
                    "retries": 0},
        },
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    record = interiorfusion_pipeline(str(path))
    vae = read_manifest(record["stages"]["vae"])
    assert vae.outputs["checkpoint"].endswith("step-00000004")
    assert "latents/index.json" in vae.artifacts and "eval.json" in vae.artifacts
