"""The structure stage under DeepSpeed ZeRO-3: 2 CPU processes under configs/accelerate_deepspeed.yaml (ZeRO-3,
zero.Init, gloo) match one process accumulating the same global batch, losses and final weights.

    python tests/structure/test_structure_zero3.py CONFIG.yaml LATENTS_URI OUTPUT RECORD.json

is the program the test launches (plain `python` for the reference, `accelerate launch` for ZeRO-3): the real
structure stage through the stage contract, rank 0 writing every logged train row to RECORD.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "tests" / "engine") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests" / "engine"))  # the engine tests' launch helpers

STEPS = 4
# fp32 both sides; only the order of gradient sums differs (2 ranks averaged vs 2 micro-batches accumulated) and
# DeepSpeed's flattened partitions.
LOSS_RTOL = 1e-4
WEIGHT_RTOL, WEIGHT_ATOL = 1e-3, 2e-5


def _write_config(path: Path, batch_size: int, accumulation: int, num_gpus: int) -> Path:
    """The smoke structure config at 64³ only, no condition dropout (its draws come from each rank's own RNG
    stream; the flows' noise is drawn per sample and agrees), width 64 (its 64×256 MLP weights exceed ZeRO-3's
    persistence threshold, so they really are partitioned)."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs/smoke/structure.yaml").read_text())
    cfg["model"]["conditioning"]["dropout"] = {m: 0.0 for m in ("image", "depth", "layout", "semantic", "camera")}
    cfg["model"]["conditioning"]["feature_cache"] = False
    cfg["training"] |= {"batch_size": batch_size, "gradient_accumulation": accumulation, "num_gpus": num_gpus,
                        "max_steps": STEPS, "curriculum": [], "log_every": 1, "val_every": 1000,
                        "checkpoint_every": 1000, "keep_last_checkpoints": 1, "grad_clip": 1.0}
    cfg["scheduler"] = {"type": "linear_warmup_cosine", "warmup_steps": 1}
    cfg["eval"] = {"samples": 0, "log_samples": 0}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _final_model(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    manifest = json.loads((out / "manifest.json").read_text())
    return load_file(out / manifest["outputs"]["checkpoint"] / "model.safetensors")


def _losses(record: dict[str, Any], key: str = "train/loss") -> dict[int, float]:
    return {int(r["step"]): r[key] for r in record["rows"] if key in r}


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_two_processes_match_one(vae_smoke, tmp_path: Path) -> None:
    import subprocess

    from test_engine_program import child_env, launch_2_processes

    latents = vae_smoke[0].uri
    quiet = {"PYTHONWARNINGS": "ignore::FutureWarning,ignore::UserWarning", "HF_HOME": str(tmp_path / "hf")}
    program = str(Path(__file__).resolve())

    def run(cmd: list[str], name: str, env: dict[str, str]) -> tuple[dict[str, Any], Path, float]:
        out, record = tmp_path / name, tmp_path / f"{name}.json"
        t0 = time.perf_counter()
        proc = subprocess.run([*cmd, program, str(config[name]), latents, str(out), str(record)],
                              env=child_env(tmp_path, **quiet, **env), cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return json.loads(record.read_text()), out, time.perf_counter() - t0

    config = {"single": _write_config(tmp_path / "single.yaml", 1, 2, 1),
              "zero3": _write_config(tmp_path / "zero3.yaml", 1, 1, 2)}
    single, single_out, t_single = run([sys.executable], "single", {})
    env: dict[str, str] = {}
    zero3, zero3_out, t_zero3 = run(launch_2_processes("zero3", env), "zero3", env)

    assert single["mode"] == {"deepspeed": False, "world_size": 1, "zero_stage": None}
    assert zero3["mode"] == {"deepspeed": True, "world_size": 2, "zero_stage": 3}
    assert zero3["partitioned_params"] > 0, zero3

    for key in ("train/loss", "train/flow_matching", "train/occupancy", "train/depth_guidance"):
        expected, got = _losses(single, key), _losses(zero3, key)
        assert sorted(expected) == sorted(got) == list(range(1, STEPS + 1)), key
        for step, value in expected.items():
            assert got[step] == pytest.approx(value, rel=LOSS_RTOL, abs=1e-7), f"{key} step {step}"
    print(f"\n1 process {t_single:.0f} s, ZeRO-3 2 processes {t_zero3:.0f} s")

    a, b = _final_model(zero3_out), _final_model(single_out)
    assert a.keys() == b.keys()
    moved = max(float((b[k] - a[k]).abs().max()) for k in b)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=lambda m, k=k: f"{k}: {m}")
    print(f"final weights: max abs diff {moved:.2e}")


# ---------------------------------------------------------------------------------------------- the program
def main(argv: list[str]) -> int:
    from test_engine_program import recording_trainer

    import interiorfusion_core.contract as contract
    from interiorfusion_core.cli import run_stage_command
    from interiorfusion_core.tracking import NullTracker
    from interiorfusion_structure import stage as structure_stage

    config, latents, output, record_path = argv
    contract.Tracker = NullTracker  # MLflow's SQLite set-up costs seconds per process

    structure_stage.Trainer = recording_trainer(record_path)  # type: ignore[misc]
    run_stage_command("structure", Path(config), None, [f"latents={latents}"], output, False, False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
