"""The LoRA stage under DeepSpeed ZeRO-3: 2 CPU processes under configs/accelerate_deepspeed.yaml (ZeRO-3, gloo),
through the package's own entry point. Only the adapters train (the base weights in the consolidated final
checkpoint are the structure run's, bit for bit), the adapters moved, and the outputs are the single-process
run's layout (peft adapters, merged weights, eval.json)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from testservers import REPO

from interiorfusion_core.contract import RunOutcome
from interiorfusion_core.manifest import read_manifest

sys.path.insert(0, str(REPO / "tests" / "engine"))


@pytest.mark.slow
@pytest.mark.distributed
def test_lora_trains_only_adapters_under_zero3(structure_smoke: RunOutcome, real_smoke_data: str,
                                              tmp_path: Path) -> None:
    from test_engine_program import child_env, launch_2_processes

    cfg = yaml.safe_load((REPO / "configs/smoke/lora.yaml").read_text())
    cfg["training"] |= {"max_steps": 4, "num_gpus": 2, "batch_size": 1, "log_every": 1, "val_every": 1000,
                        "checkpoint_every": 1000, "keep_last_checkpoints": 1}
    cfg["scheduler"] = {"type": "linear_warmup_cosine", "warmup_steps": 1}
    cfg["eval"] = {"splits": ["val"], "samples": 1, "draws": 1}
    config = tmp_path / "lora.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp_path / "lora"
    env: dict[str, str] = {"PYTHONWARNINGS": "ignore::FutureWarning,ignore::UserWarning"}
    launcher = launch_2_processes("zero3", env)
    run = subprocess.run([*launcher, "-m", "interiorfusion_finetune", "lora", "--config", str(config),
                          "--input", f"structure={structure_smoke.uri}", "--input", f"data={real_smoke_data}",
                          "--output", out.as_uri()],
                         env=child_env(tmp_path, **env), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert "engine: DeepSpeed ZeRO-3 on 2× cpu" in run.stderr, run.stderr[-3000:]

    manifest = read_manifest(out.as_uri())
    final = load_file(out / manifest.outputs["checkpoint"] / "model.safetensors")
    base = load_file(Path(structure_smoke.uri.removeprefix("file://"))
                     / read_manifest(structure_smoke.uri).outputs["checkpoint"] / "model.safetensors")
    for key, value in base.items():
        wrapped = f"base_model.model.{key}"
        if wrapped not in final:
            head, leaf = key.rsplit(".", 1)
            wrapped = f"base_model.model.{head}.base_layer.{leaf}"
        assert torch.equal(final[wrapped], value), key
    moved = [k for k, v in final.items() if "lora_B" in k and float(v.abs().max()) > 0]
    assert moved, "no adapter moved under ZeRO-3"
    assert {"adapters/structure/adapter_model.safetensors", "merged/structure.safetensors", "eval.json"} <= set(
        manifest.artifacts)
    assert json.loads((out / "eval.json").read_text())["metrics"]["flow_matching"] > 0
