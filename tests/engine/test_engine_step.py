"""TrainTask.train_step and frozen models: a task with its own step (a rollout loop: several forward passes and
backward calls per micro-batch) trains under gradient accumulation, resumes bit-identically after a SIGKILL, and its
non-finite loss is still skipped; frozen models are frozen, on the device in the run's precision, outside the
optimizer and the checkpoints, and do not change the trained model's initial weights."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_engine_program import (
    ForkRunner,
    FrozenTeacherTask,
    RolloutTask,
    frozen_fingerprint,
    toy_config,
    write_config,
)

from interiorfusion_core.engine import Callback, StepContext, Trainer, local_context
from interiorfusion_core.engine.toy import ToyEngineConfig, ToyTask


def config(**training: Any) -> ToyEngineConfig:
    base = toy_config(**{"max_steps": 8, "checkpoint_every": 4, "log_every": 1, "batch_size": 4,
                         "nonfinite_policy": "skip", **training})
    base["data"] = {"num_samples": 64, "val_samples": 16}
    base["training"]["val_every"] = 4
    return ToyEngineConfig.model_validate(base)


class Weights(Callback):
    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_fit_start(self, trainer: Any) -> None:
        self.on_step_end(trainer, trainer.state.step)

    def on_step_end(self, trainer: Any, step: int) -> None:
        self.by_step[step] = {n: p.detach().clone() for n, p in trainer.module.named_parameters()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- train_step
def test_a_rollout_step_skips_its_nonfinite_loss(tmp_path: Path) -> None:
    cfg = config(gradient_accumulation=2)
    task = type("NaNRollout", (RolloutTask,), {"nan_at": frozenset({3})})(cfg)
    weights = Weights()
    result = Trainer(local_context(cfg, tmp_path / "out"), task, callbacks=[weights]).fit()
    w = weights.by_step
    assert result.step == 8 and result.metrics["nonfinite_events"] == 1
    assert same(w[3], w[2])  # the NaN step changed nothing
    assert not same(w[2], w[1]) and not same(w[4], w[3])  # the others trained
    assert {"fit0", "fit1", "loss"} <= set(result.metrics) and torch.isfinite(torch.tensor(result.metrics["loss"]))
    assert "val_loss" in result.metrics  # validation goes through compute_losses


def test_train_step_must_back_propagate_and_return_a_loss(tmp_path: Path) -> None:
    class NoBackward(ToyTask):
        def train_step(self, step: StepContext) -> Any:
            return self.compute_losses(step.model, step.next_batch())

    class NoLoss(ToyTask):
        def train_step(self, step: StepContext) -> Any:
            losses = self.compute_losses(step.model, step.next_batch())
            step.backward(losses["loss"])
            return {"mse": losses["mse"]}

    cfg = config()
    with pytest.raises(RuntimeError, match=r"NoBackward.train_step returned without calling step.backward\(\)"):
        Trainer(local_context(cfg, tmp_path / "a"), NoBackward(cfg)).fit()
    with pytest.raises(KeyError, match="NoLoss.train_step must return a 'loss' entry"):
        Trainer(local_context(cfg, tmp_path / "b"), NoLoss(cfg)).fit()


class Contexts(Callback):
    """What train_step saw in its StepContext, per call."""

    def __init__(self, task: Any) -> None:
        self.seen: list[tuple[int, int, int, int]] = []
        original = task.train_step

        def spy(step: StepContext) -> Any:
            out = original(step)
            self.seen.append((step.step, step.micro, step.accumulation, step.backwards))
            assert step.world_size == 1 and step.rank == 0 and step.device.type == "cpu"
            assert step.model is step.module  # one process: no wrapper
            return out

        task.train_step = spy


def test_step_context_counts_steps_and_micro_batches(tmp_path: Path) -> None:
    cfg = config(max_steps=3, gradient_accumulation=2)
    task = RolloutTask(cfg)
    spy = Contexts(task)
    Trainer(local_context(cfg, tmp_path / "out"), task, callbacks=[spy]).fit()
    assert spy.seen == [(s, m, 2, 2) for s in (1, 2, 3) for m in (0, 1)]


@pytest.mark.slow
def test_a_rollout_step_trains_and_resumes_bit_identically(tmp_path: Path) -> None:
    steps, every = 20, 6
    cfg = toy_config(max_steps=steps, checkpoint_every=every, log_every=2, batch_size=4, gradient_accumulation=2,
                     model__dropout=0.1, optimizer__lr=1e-2)
    path = write_config(tmp_path / "rollout.yaml", cfg)
    runner = ForkRunner()
    code, log = runner.run(path, tmp_path / "ref", tmp_path, ENGINE_TEST_TASK="rollout",
                           ENGINE_TEST_RECORD=str(tmp_path / "ref.json"))
    assert code == 0, log[-3000:]
    rows = [r for r in json.loads((tmp_path / "ref.json").read_text()) if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(2, steps + 1, 2))
    assert rows[-1]["train/loss"] < 0.7 * rows[0]["train/loss"]  # it learns
    assert {"train/fit0", "train/fit1"} <= set(rows[0])

    kill = every + 3
    code, log = runner.run(path, tmp_path / "out", tmp_path, ENGINE_TEST_TASK="rollout", ENGINE_TEST_KILL_AT=str(kill))
    assert code == -signal.SIGKILL, log[-2000:]
    code, log = runner.run(path, tmp_path / "out", tmp_path, ENGINE_TEST_TASK="rollout")
    assert code == 0, log[-3000:]
    assert f"resuming from step {every}" in log

    def final(out: Path) -> dict[str, torch.Tensor]:
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["outputs"]["checkpoint"] == f"checkpoints/step-{steps:08d}"
        return load_file(out / manifest["outputs"]["checkpoint"] / "model.safetensors")

    assert same(final(tmp_path / "out"), final(tmp_path / "ref"))


# ---------------------------------------------------------------------------------------------- frozen models
def test_frozen_models_are_frozen_and_left_out(tmp_path: Path) -> None:
    cfg = config(ema={"decay": 0.9})
    task, weights = FrozenTeacherTask(cfg), Weights()
    trainer = Trainer(local_context(cfg, tmp_path / "out"), task, callbacks=[weights])
    trainer.setup()
    teacher = task.frozen["teacher"]
    assert trainer.frozen["teacher"] is teacher and dict(trainer.step_context.frozen) == {"teacher": teacher}
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert {p.device.type for p in teacher.parameters()} == {"cpu"} and {p.dtype for p in teacher.parameters()} == {
        torch.float32}  # CPU runs are fp32
    ids = {id(p) for p in teacher.parameters()}
    assert not any(id(p) in ids for g in trainer.raw_optimizer.param_groups for p in g["params"])
    assert not any(id(p) in ids for p in trainer.module.parameters())
    before = frozen_fingerprint(teacher)
    result = trainer.fit()
    assert frozen_fingerprint(teacher) == before and all(p.grad is None for p in teacher.parameters())
    assert not same(weights.by_step[8], weights.by_step[0])  # the student trained
    ckpt = tmp_path / "out" / result.checkpoint
    names = set(json.loads((ckpt / "checkpoint.json").read_text())["files"])
    assert names >= {"model.safetensors", "ema.safetensors", "optimizer.pt"}
    student = set(dict(trainer.module.named_parameters()))
    assert set(load_file(ckpt / "model.safetensors")) == student == set(load_file(ckpt / "ema.safetensors"))
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert sum(len(g["params"]) for g in state["param_groups"]) == len(student)

    # the teacher comes from its own seeded RNG: the student's initial weights are those of the plain toy task,
    # and a second build (another rank, a resumed run) gets the same teacher
    plain = Trainer(local_context(cfg, tmp_path / "plain"), ToyTask(cfg))
    plain.setup()
    assert same({n: p.detach() for n, p in plain.module.named_parameters()}, weights.by_step[0])
    other = FrozenTeacherTask(cfg)
    Trainer(local_context(cfg, tmp_path / "again"), other).setup()
    assert frozen_fingerprint(other.frozen["teacher"]) == before


def test_frozen_models_run_in_bf16_when_the_run_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate.state import AcceleratorState

    import interiorfusion_core.engine.distributed as distributed

    monkeypatch.setattr(distributed, "resolve_precision", lambda requested: "bf16")  # CPU autocast in bf16
    cfg = config(max_steps=2, mixed_precision="bf16")
    task = FrozenTeacherTask(cfg)
    trainer = Trainer(local_context(cfg, tmp_path / "out"), task)
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate's precision is per process
    try:
        result = trainer.fit()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert trainer.rt.precision == "bf16" and result.step == 2
    assert {p.dtype for p in task.frozen["teacher"].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.module.parameters()} == {torch.float32}  # the trained model keeps fp32


def test_frozen_models_must_not_share_the_trained_parameters(tmp_path: Path) -> None:
    class Shared(ToyTask):
        def build_model(self, config: Any) -> Any:
            self.model = super().build_model(config)
            return self.model

        def frozen_models(self, config: Any) -> Any:
            return {"encoder": self.model.net[0]}

    cfg = config()
    with pytest.raises(ValueError, match="'encoder' shares parameters with the trained model"):
        Trainer(local_context(cfg, tmp_path / "out"), Shared(cfg)).setup()
