"""The smoke LoRA stage end to end: the smoke Structure DiT tuned on the smoke real scans (simulated ScanNet and HM3D
scans through the real importers). Its adapters are peft's files, only they moved, the merged weights are what
`generate` loads from the LoRA output (and from a pipeline run, in preference to the base), and the tuned network's
held-out flow loss on the real scans is below the base network's (adapters disabled, same samples and noise)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from testservers import REPO

from interiorfusion_core.contract import RunOutcome
from interiorfusion_core.errors import UserError
from interiorfusion_core.manifest import read_manifest
from interiorfusion_core.storage import open_store
from interiorfusion_structure.generate import generate_scenes, load_generator

pytestmark = pytest.mark.slow


def _path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def test_lora_writes_peft_adapters_and_merged_weights(lora_smoke: RunOutcome, structure_smoke: RunOutcome) -> None:
    out = _path(lora_smoke.uri)
    manifest = read_manifest(lora_smoke.uri)
    assert manifest.outputs["structure_adapters"] == "adapters/structure"
    config = json.loads((out / "adapters/structure/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == sorted(["attention.qkv", "attention.proj", "mlp.fc1", "mlp.fc2"])
    adapters = load_file(out / "adapters/structure/adapter_model.safetensors")
    assert adapters and all("lora_A" in k or "lora_B" in k for k in adapters)
    assert any("lora_B" in k and float(v.abs().max()) > 0 for k, v in adapters.items())  # trained: B left zero
    # Every artifact is in the manifest with its sha256 (the adapters, the merged weights, the real latents).
    for key in ("adapters/structure/adapter_model.safetensors", "merged/structure.safetensors", "latents/index.json",
                "eval.json"):
        assert key in manifest.artifacts

    # Only the adapters trained: the final checkpoint's base weights are the structure run's, bit for bit.
    final = load_file(out / manifest.outputs["checkpoint"] / "model.safetensors")
    base = load_file(_path(structure_smoke.uri) / read_manifest(structure_smoke.uri).outputs["checkpoint"]
                     / "model.safetensors")
    for key, value in base.items():
        wrapped = f"base_model.model.{key}"
        if wrapped not in final:
            wrapped = f"base_model.model.{key.rsplit('.', 1)[0]}.base_layer.{key.rsplit('.', 1)[1]}"
        assert torch.equal(final[wrapped], value), key
    merged = load_file(out / "merged/structure.safetensors")
    assert merged.keys() == base.keys()
    changed = [k for k in base if not torch.equal(merged[k], base[k])]
    assert changed and all(any(t in k for t in ("attention.qkv", "attention.proj", "mlp.fc1", "mlp.fc2"))
                           for k in changed)


def test_lora_lowers_the_real_scans_held_out_flow_loss(lora_smoke: RunOutcome) -> None:
    report = json.loads((_path(lora_smoke.uri) / "eval.json").read_text())
    m = report["metrics"]
    print(f"\nheld-out flow loss on the real scans: tuned {m['flow_matching']:.4f} vs base "
          f"{m['base_flow_matching']:.4f}; occupancy {m['occupancy']:.4f} vs {m['base_occupancy']:.4f}")
    assert m["flow_matching"] < m["base_flow_matching"]
    assert m["loss"] < m["base_loss"]
    assert lora_smoke.manifest.metrics["heldout_flow_matching"] == pytest.approx(m["flow_matching"])


def test_generate_loads_the_merged_weights(lora_smoke: RunOutcome, structure_smoke: RunOutcome) -> None:
    tuned = load_generator(lora_smoke.uri)
    base = load_generator(structure_smoke.uri)
    merged = load_file(_path(lora_smoke.uri) / "merged/structure.safetensors")
    state = tuned.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in merged.items())
    assert not all(torch.equal(base.model.state_dict()[k], v) for k, v in merged.items())
    assert tuned.defaults["tuned"]["stage"] == "lora"
    # It generates like any structure model (the condition views of the real scans' held-out split).
    from interiorfusion_structure.task import StructureData

    latents = open_store(lora_smoke.uri)
    from interiorfusion_core.stage import StageInput

    data = StructureData(StageInput("latents", lora_smoke.uri, None, latents), "val", 64,  # type: ignore[arg-type]
                         lora_smoke.manifest.inputs["data"].uri)
    scenes = generate_scenes(tuned, data.collate([data.sample(0)]))
    assert len(scenes) == 1 and len(scenes[0].voxels) > 0


def test_a_lora_run_without_merged_weights_says_so(lora_smoke: RunOutcome, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "lora"
    shutil.copytree(_path(lora_smoke.uri), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["outputs"]["structure_weights"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"wrote no merged structure weights \(lora.merge was false\)"):
        load_generator(copy.as_uri())


def test_the_cli_runs_the_stage_by_name(lora_smoke: RunOutcome, structure_smoke: RunOutcome,
                                        real_smoke_data: str, tmp_path: Path) -> None:
    """`python -m interiorfusion_finetune lora …` (the image's entry point) on the same inputs is a cache hit."""
    run = subprocess.run([sys.executable, "-m", "interiorfusion_finetune", "lora", "--config",
                          str(REPO / "configs/smoke/lora.yaml"), "--input", f"structure={structure_smoke.uri}",
                          "--input", f"data={real_smoke_data}", "--output", lora_smoke.uri],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "cached" in (run.stdout + run.stderr).lower()
    bad = subprocess.run([sys.executable, "-m", "interiorfusion_finetune", "lorra"], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert bad.returncode != 0 and "usage: python -m interiorfusion_finetune {lora,grpo}" in bad.stderr


def test_lora_mixes_in_synthetic_replay_by_weight(structure_smoke: RunOutcome, real_smoke_data: str,
                                                  tmp_path: Path) -> None:
    """replay.weight > 0: batches of the base run's own training rooms come in between the real scans'."""
    from interiorfusion_core.contract import run_stage

    out = run_stage("lora", REPO / "configs/smoke/lora.yaml",
                    inputs={"structure": structure_smoke.uri, "data": real_smoke_data},
                    output=(tmp_path / "lora").as_uri(),
                    overrides=["replay.weight=1.0", "training.max_steps=6", "training.checkpoint_every=6",
                               "training.val_every=6", "eval.samples=1", "eval.draws=1"])
    assert out.manifest.config["replay"]["weight"] == 1.0
    adapters = load_file(_path(out.uri) / "adapters/structure/adapter_model.safetensors")
    assert any("lora_B" in k and float(v.abs().max()) > 0 for k, v in adapters.items())
