"""The same program under `accelerate launch`: DeepSpeed ZeRO-3 (configs/accelerate_deepspeed.yaml, 2 CPU processes
over gloo) and DDP match a single process on the same global batch; a ZeRO-3 run preempted by SIGTERM resumes from
its sharded checkpoint; its final checkpoint consolidates into one safetensors model that loads and matches; a task
with a frozen teacher and its own train_step matches one process under ZeRO-3, its teacher untouched, unpartitioned
and outside the optimizer and the checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_engine_program import ForkRunner, launch_2_processes, run_program, toy_config, write_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS, NAN_AT, PREEMPT = 8, 3, 5
PER_RANK = dict(batch_size=4, max_steps=STEPS, checkpoint_every=4, log_every=1, keep_last_checkpoints=3, val_every=4,
                ema={"decay": 0.8, "start_step": 1}, data__val_samples=16)
QUIET = {"PYTHONWARNINGS": "ignore::FutureWarning,ignore::UserWarning", "ENGINE_TEST_NAN_AT": str(NAN_AT)}


def launch(kind: str, config: Path, out: Path, tmp: Path, **env: str) -> Any:
    launcher = launch_2_processes(kind, env)
    return run_program(config, out, tmp, launcher=launcher, timeout=420, HF_HOME=str(tmp / "hf"), **QUIET, **env)


def losses(path: Path, key: str = "train/loss") -> dict[int, float]:
    return {int(r["step"]): r[key] for r in json.loads(path.read_text()) if key in r}


def final_model(out: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    manifest = json.loads((out / "manifest.json").read_text())
    return load_file(out / manifest["outputs"]["checkpoint"] / name)


def assert_same_curves(got: dict[int, float], expected: dict[int, float]) -> None:
    assert got.keys() == expected.keys()
    for step, value in expected.items():
        assert got[step] == pytest.approx(value, rel=1e-4, abs=1e-6), f"step {step}"


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One process, batch 8: the global batch of 2 ranks × 4."""
    tmp = tmp_path_factory.mktemp("single")
    config = write_config(tmp / "single.yaml", toy_config(**{**PER_RANK, "batch_size": 8}))
    code, log = ForkRunner().run(config, tmp / "out", tmp, ENGINE_TEST_RECORD=str(tmp / "rec.json"),
                                 ENGINE_TEST_NAN_AT=str(NAN_AT))
    assert code == 0, log[-3000:]
    rec = losses(tmp / "rec.json")
    assert NAN_AT not in rec and len(rec) == STEPS - 1  # the NaN step was skipped and kept out of the means
    val = losses(tmp / "rec.json", "val/loss")
    assert sorted(val) == [4, 8]
    return {"train": rec, "val": val, "model": final_model(tmp / "out"),
            "ema": final_model(tmp / "out", "ema.safetensors")}


def test_zero3_two_processes_match_one_and_resume_and_consolidate(single: dict, tmp_path: Path) -> None:
    config = write_config(tmp_path / "zero3.yaml", toy_config(**PER_RANK))
    out = tmp_path / "out"
    first = launch("zero3", config, out, tmp_path, ENGINE_TEST_PREEMPT_AT=str(PREEMPT),
                   ENGINE_TEST_RECORD=str(tmp_path / "rec1.json"))
    assert first.returncode != 0, first.stderr[-3000:]
    assert f"stopped by SIGTERM at step {PREEMPT}" in first.stderr, first.stderr[-3000:]
    assert "DeepSpeed ZeRO-3 on 2× cpu" in first.stderr
    index = json.loads((out / f"checkpoints/step-{PREEMPT:08d}/checkpoint.json").read_text())
    assert index["zero_stage"] == 3 and index["world_size"] == 2
    names = set(index["files"])
    for rank in (0, 1):
        assert f"deepspeed/state/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in names
        assert f"rng/rank-0000{rank}.pt" in names and f"data/rank-0000{rank}.json" in names

    second = launch("zero3", config, out, tmp_path, ENGINE_TEST_RECORD=str(tmp_path / "rec2.json"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from step {PREEMPT}" in second.stderr

    recs = [tmp_path / "rec1.json", tmp_path / "rec2.json"]
    assert_same_curves({**losses(recs[0]), **losses(recs[1])}, single["train"])
    assert_same_curves({**losses(recs[0], "val/loss"), **losses(recs[1], "val/loss")}, single["val"])
    # the final ZeRO-3 checkpoint holds a consolidated single-file model equal to the single-process one, and the
    # EMA (averaged per partition, saved per rank, restored after the preemption, gathered at the end)
    consolidated = final_model(out)
    assert_close(consolidated, single["model"])
    assert_close(final_model(out, "ema.safetensors"), single["ema"])
    from interiorfusion_core.engine.toy import ToyEngineConfig, build_toy_mlp

    model = build_toy_mlp(ToyEngineConfig.model_validate(toy_config(**PER_RANK)))
    model.load_state_dict(consolidated)  # strict: every key, right shapes

    # an intermediate checkpoint consolidates on demand too
    from interiorfusion_core.checkpoint import CheckpointManager, consolidate_zero_checkpoint
    from interiorfusion_core.storage import LocalStore

    manager = CheckpointManager(LocalStore(out), work_dir=tmp_path / "work")
    state = consolidate_zero_checkpoint(manager, manager.get(PREEMPT), work_dir=tmp_path)
    assert state.keys() == consolidated.keys()


def test_ddp_two_processes_match_one(single: dict, tmp_path: Path) -> None:
    config = write_config(tmp_path / "ddp.yaml", toy_config(**PER_RANK))
    proc = launch("ddp", config, tmp_path / "out", tmp_path, ENGINE_TEST_RECORD=str(tmp_path / "rec.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DDP on 2× cpu" in proc.stderr
    assert_same_curves(losses(tmp_path / "rec.json"), single["train"])
    assert_same_curves(losses(tmp_path / "rec.json", "val/loss"), single["val"])
    assert_close(final_model(tmp_path / "out"), single["model"])
    assert_close(final_model(tmp_path / "out", "ema.safetensors"), single["ema"])


def test_zero3_frozen_teacher_and_own_step_match_one_process(tmp_path: Path) -> None:
    per_rank = dict(batch_size=4, max_steps=6, checkpoint_every=3, log_every=1, val_every=3, data__val_samples=16)
    env = {"ENGINE_TEST_TASK": "frozen"}
    single_cfg = write_config(tmp_path / "single.yaml", toy_config(**{**per_rank, "batch_size": 8}))
    code, log = ForkRunner().run(single_cfg, tmp_path / "single", tmp_path, ENGINE_TEST_NAN_AT=str(NAN_AT),
                                 ENGINE_TEST_RECORD=str(tmp_path / "single.json"),
                                 ENGINE_TEST_FROZEN=str(tmp_path / "single-frozen"), **env)
    assert code == 0, log[-3000:]
    config = write_config(tmp_path / "zero3.yaml", toy_config(**per_rank))
    out = tmp_path / "out"
    proc = launch("zero3", config, out, tmp_path, ENGINE_TEST_RECORD=str(tmp_path / "zero3.json"),
                  ENGINE_TEST_FROZEN=str(tmp_path / "frozen"), **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DeepSpeed ZeRO-3 on 2× cpu" in proc.stderr

    expected = losses(tmp_path / "single.json")
    assert NAN_AT not in expected and len(expected) == 5  # the NaN step of the task's own step was skipped
    for key in ("train/loss", "train/distill", "train/odd", "val/loss"):
        assert_same_curves(losses(tmp_path / "zero3.json", key), losses(tmp_path / "single.json", key))

    single = json.loads((tmp_path / "single-frozen.rank0").read_text())
    for rank in (0, 1):
        report = json.loads((tmp_path / f"frozen.rank{rank}").read_text())
        assert report["model_partitioned"] and not report["partitioned"]  # ZeRO-3 partitions the student only
        assert report["start"] == report["end"] == single["start"]  # the same teacher everywhere, untouched
        assert not report["requires_grad"] and not report["grads"] and not report["training"]
        assert not report["in_optimizer"] and not report["in_model"]
        assert report["dtypes"] == ["torch.float32"] and report["model_params"] == single["model_params"]

    from interiorfusion_core.engine.toy import ToyEngineConfig, build_toy_mlp

    student = set(build_toy_mlp(ToyEngineConfig.model_validate(toy_config(**per_rank))).state_dict())
    assert set(final_model(out)) == student  # the consolidated model: the student, nothing of the teacher
    assert_close(final_model(out), final_model(tmp_path / "single"))
    for ckpt in sorted((out / "checkpoints").glob("step-*")):
        names = json.loads((ckpt / "checkpoint.json").read_text())["files"]
        assert not any("teacher" in name for name in names), ckpt.name
