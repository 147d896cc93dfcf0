"""The smoke VAE stage end to end: trains on generated interiors, logs to MLflow, writes checkpoint + latents +
manifest, and a free decode of held-out scenes beats the trivial baselines."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from testservers import REPO

from interiorfusion_core.config import load_config
from interiorfusion_core.contract import RunOutcome
from interiorfusion_core.manifest import read_manifest
from interiorfusion_core.storage import open_store

pytestmark = pytest.mark.slow
SMOKE = load_config(REPO / "configs/smoke/vae.yaml").model  # every step count and size below comes from it


def logged_steps() -> list[int]:
    """The steps the engine logs train metrics at: every log_every, and the last step."""
    t = SMOKE.training
    steps = list(range(t.log_every, t.max_steps + 1, t.log_every))
    return steps if steps[-1] == t.max_steps else [*steps, t.max_steps]


def phase_spans() -> list[tuple[int, int]]:
    """(first, last) global step of each curriculum phase, 1-based."""
    spans, start = [], 0
    for phase in SMOKE.training.curriculum:
        spans.append((start + 1, start + phase.steps))
        start += phase.steps
    return spans


@pytest.fixture(scope="module")
def smoke(vae_smoke: tuple[RunOutcome, str]) -> tuple[RunOutcome, str]:
    return vae_smoke  # one training per session, shared with test_vae_latents (tests/vae/conftest.py)


def test_manifest_checkpoint_and_latents(smoke: tuple[RunOutcome, str]) -> None:
    outcome, data_uri = smoke
    m = read_manifest(outcome.uri)
    store = open_store(outcome.uri)
    ckpt = m.outputs["checkpoint"]
    assert ckpt == f"checkpoints/step-{SMOKE.training.max_steps:08d}" and f"{ckpt}/model.safetensors" in m.artifacts
    model_key = f"{ckpt}/model.safetensors"
    weights = load_file(str(store.open_local(model_key, m.artifacts[model_key].sha256)))
    assert any(k.startswith("geometry_encoder.") for k in weights) and "decoder.material.material_prior" in weights
    assert m.outputs["latents"] == "latents/index.json"
    index = json.loads(store.get_bytes("latents/index.json"))
    compression = 2 ** (len(SMOKE.model.channels) - 1)  # one 2× downsampling between channel levels
    assert index["format"] == "interiorfusion.latents/2"
    assert index["latent_dim"] == SMOKE.model.latent_dim and index["compression"] == compression
    # Latents at every resolution of the curriculum (32³ → 64³), each on its own latent grid.
    assert sorted(index["resolutions"]) == ["32", "64"] == [str(p.resolution) for p in SMOKE.training.curriculum]
    data_index = json.loads(open_store(data_uri).get_bytes("dataset.json"))
    for res, entry in index["resolutions"].items():
        assert entry["latent_resolution"] == int(res) // compression
        for split, info in entry["splits"].items():
            assert info["samples"] == data_index["splits"][split]["num_samples"]
            for shard in info["shards"]:
                assert m.artifacts[shard["shard"]].sha256 == shard["shard_sha256"]
                assert m.artifacts[shard["index"]].sha256 == shard["index_sha256"]
                tensors = load_file(str(store.open_local(shard["shard"], shard["shard_sha256"])))
                assert len(tensors) == 2 * shard["samples"]  # p.coords and p.feats per sample
                coords = [t for k, t in tensors.items() if k.endswith(".coords")]
                assert max(int(c.max()) for c in coords) < entry["latent_resolution"]
                assert all(t.shape[1] == 2 * index["latent_dim"] for k, t in tensors.items() if k.endswith(".feats"))


def test_loss_and_pruning_fall_and_mlflow_has_the_run(smoke: tuple[RunOutcome, str]) -> None:
    from mlflow.tracking import MlflowClient

    m = read_manifest(smoke[0].uri)
    client = MlflowClient()
    run = client.get_run(m.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.latent_dim"] == str(SMOKE.model.latent_dim)

    def history(name: str) -> dict[int, float]:
        return {x.step: x.value for x in client.get_metric_history(run.info.run_id, name)}

    # Per curriculum phase: the loss and the pruning BCE fall from the phase's first logged step to its last.
    loss, prune = history("train/loss"), history("train/pruning")
    assert sorted(loss) == sorted(prune) == logged_steps()
    spans = phase_spans()
    assert len(spans) == len(SMOKE.training.curriculum) >= 2
    for first, last in spans:
        steps = [s for s in logged_steps() if first <= s <= last]
        assert len(steps) >= 2, (first, last)
        assert loss[steps[-1]] < 0.8 * loss[steps[0]], (first, last)
        assert prune[steps[-1]] < prune[steps[0]], (first, last)
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert "images/vae_reconstruction.png" in images


def test_held_out_reconstruction_beats_trivial_baselines(smoke: tuple[RunOutcome, str]) -> None:
    report = json.loads(open_store(smoke[0].uri).get_bytes("eval.json"))
    metrics = report["metrics"]
    assert report["split"] == SMOKE.encode.eval_split and report["samples"] >= 1
    assert report["resolution"] == SMOKE.model.target_resolution
    assert metrics["occupancy_iou"] > 1.3 * metrics["baseline_occupancy_iou"]
    assert metrics["material_l1"] < metrics["baseline_material_l1"]
    # Every metric beside its baseline on the same voxels, all of them in eval.json and MLflow.
    for name in ("fscore_1vox", "fscore_2vox", "chamfer_m", "material_l1_roughness"):
        assert name in metrics and f"baseline_{name}" in metrics, name
    assert metrics["fscore_1vox"] <= metrics["fscore_2vox"] and metrics["chamfer_m"] > 0
    assert {"normal_error_signed", "normal_error_unsigned", "semantic_accuracy"} <= set(metrics)
    assert metrics["normal_error_unsigned"] <= metrics["normal_error_signed"]
    # Pruning per level: free decoding, its teacher-forced upper bound, and the keep-all-children oracle.
    levels = report["pruning"]
    assert len(levels) == len(SMOKE.model.channels) - 1
    for level in levels.values():
        assert level["oracle_recall"] == 1.0 and 0 < level["oracle_precision"] < 1
        assert 0 <= level["free_precision"] <= 1 and 0 <= level["forced_recall"] <= 1
    assert len(report["per_sample"]) == report["samples"]
