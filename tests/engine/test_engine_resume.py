"""Resume: a run SIGKILLed at random steps and rerun with the same command ends bit-identical to an uninterrupted
run (CPU); a kill inside a checkpoint write leaves that checkpoint ignored; SIGTERM checkpoints and exits 143;
--restart starts over. Every run is its own process going through the real stage contract, like the stage runner."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_engine_program import ForkRunner, toy_config, write_config

pytestmark = pytest.mark.slow

# Dropout (torch RNG) and augmentation (python + numpy RNG) make every RNG stream matter; a curriculum makes the
# loader change mid-run; validation draws from its own isolated RNG.
CKPT_EVERY = 8
CONFIG = toy_config(
    max_steps=36, checkpoint_every=CKPT_EVERY, log_every=4, val_every=12, keep_last_checkpoints=2,
    curriculum=[{"resolution": 32, "steps": 14, "lr": 3.0e-3}, {"resolution": 64, "steps": 22, "lr": 1.5e-3}],
    model__dropout=0.1, data__augment=True, data__val_samples=16,
)
# Kill points drawn at random (fixed seed, so a failure reproduces): one before the checkpoint at 16 (which is
# killed half-written), one after it, one after a SIGTERM at step PREEMPT.
_rng = random.Random(20261125)
KILL_1 = _rng.randint(2, 15)
KILL_2 = _rng.randint(17, 25)
PREEMPT = 27
KILL_3 = _rng.randint(28, 35)


def final_weights(output: Path) -> tuple[dict[str, torch.Tensor], dict]:
    manifest = json.loads((output / "manifest.json").read_text())
    return load_file(output / manifest["outputs"]["checkpoint"] / "model.safetensors"), manifest


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (max abs diff {(a[k] - b[k]).abs().max().item():.3g})"


def last_checkpoint(step: int) -> int:
    """The newest checkpoint a kill at the end of `step` leaves (the kill comes before that step's own save)."""
    return (step - 1) // CKPT_EVERY * CKPT_EVERY


@pytest.fixture(scope="module")
def runner() -> ForkRunner:
    return ForkRunner()


def test_killed_and_rerun_runs_end_bit_identical(runner: ForkRunner, tmp_path: Path) -> None:
    config = write_config(tmp_path / "toy.yaml", CONFIG)
    code, log = runner.run(config, tmp_path / "reference", tmp_path)
    assert code == 0, log[-3000:]
    expected, manifest = final_weights(tmp_path / "reference")
    assert manifest["outputs"]["checkpoint"] == "checkpoints/step-00000036"

    out = tmp_path / "out"
    # 1. SIGKILL at a random step of the first phase.
    code, log = runner.run(config, out, tmp_path, ENGINE_TEST_KILL_AT=str(KILL_1))
    assert code == -signal.SIGKILL, log[-2000:]
    assert (out / "_run.json").exists() and not (out / "manifest.json").exists()

    # 2. --restart discards it; this run dies while checkpoint 16 is half-written (files there, no index).
    code, log = runner.run(config, out, tmp_path, "--restart", ENGINE_TEST_KILL_IN_CKPT="16")
    assert code == -signal.SIGKILL, log[-2000:]
    assert "resuming" not in log
    half = out / "checkpoints/step-00000016"
    assert (half / "model.safetensors").exists() and not (half / "checkpoint.json").exists()
    assert json.loads((out / "checkpoints/latest").read_text())["step"] == 8

    # 3. Rerun: the half-written checkpoint is ignored; killed again in the second phase.
    code, log = runner.run(config, out, tmp_path, ENGINE_TEST_KILL_AT=str(KILL_2))
    assert code == -signal.SIGKILL, log[-2000:]
    assert "resuming from step 8" in log

    # 4. Rerun; SIGTERM at step PREEMPT: checkpoint, exit 143.
    code, log = runner.run(config, out, tmp_path, ENGINE_TEST_PREEMPT_AT=str(PREEMPT))
    assert code == 143, log[-2000:]
    assert f"resuming from step {last_checkpoint(KILL_2)}" in log
    assert f"stopped by SIGTERM at step {PREEMPT}" in log
    assert json.loads((out / "checkpoints/latest").read_text())["step"] == PREEMPT

    # 5. Rerun, SIGKILL once more; 6. rerun to the end.
    code, log = runner.run(config, out, tmp_path, ENGINE_TEST_KILL_AT=str(KILL_3))
    assert code == -signal.SIGKILL, log[-2000:]
    assert f"resuming from step {PREEMPT}" in log
    code, log = runner.run(config, out, tmp_path)
    assert code == 0, log[-3000:]
    assert f"resuming from step {max(PREEMPT, last_checkpoint(KILL_3))}" in log

    weights, manifest = final_weights(out)
    assert_identical(weights, expected)
    # keep-last-2 across all those processes, and the manifest lists what is kept
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step-00000032", "step-00000036"]
    assert "checkpoints/step-00000032/model.safetensors" in manifest["artifacts"]
    assert not any(k.startswith("checkpoints/step-00000008/") for k in manifest["artifacts"])
    index = json.loads((out / "checkpoints/step-00000036/checkpoint.json").read_text())
    assert index["step"] == 36 and index["phase"] == 1 and index["config"]["kind"] == "engine_toy"
    assert index["best_val_loss"] is not None
