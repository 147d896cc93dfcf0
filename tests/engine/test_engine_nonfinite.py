"""training.nonfinite_policy: skip (counted, logged), rollback (to the last checkpoint), abort (one clear sentence)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from interiorfusion_core.engine import Callback, NonFiniteError, Trainer, local_context
from interiorfusion_core.engine.toy import ToyEngineConfig, ToyTask
from interiorfusion_core.tracking import NullTracker


class NaNTask(ToyTask):
    """NaN loss at `loss_at` steps; finite loss but NaN gradients at `grad_at` steps (1-based). One-shot: a step
    run again after a rollback is finite."""

    def __init__(self, config: Any, loss_at: set[int] = frozenset(), grad_at: set[int] = frozenset()):
        super().__init__(config)
        self.loss_at, self.grad_at = set(loss_at), set(grad_at)
        self.next_step = 1
        self.batches = 0

    def compute_losses(self, model: Any, batch: Any) -> Any:
        losses = super().compute_losses(model, batch)
        if not model.training:
            return losses
        self.batches += 1
        if self.next_step in self.loss_at:
            self.loss_at.discard(self.next_step)
            return {**losses, "loss": losses["loss"] * float("inf") - float("inf")}
        if self.next_step in self.grad_at:
            self.grad_at.discard(self.next_step)
            nan_grad = model.net[0].weight.register_hook(lambda g: g * float("nan"))
            self._hooks = [*getattr(self, "_hooks", []), nan_grad]
        return losses


class Watch(Callback):
    def __init__(self) -> None:
        self.weights: dict[int, torch.Tensor] = {}

    def on_fit_start(self, trainer: Any) -> None:
        trainer.task.next_step = trainer.state.step + 1
        self.weights[trainer.state.step] = trainer.module.net[0].weight.detach().clone()

    def on_rollback(self, trainer: Any, step: int) -> None:
        trainer.task.next_step = step + 1
        self.rolled_back = (step, trainer.module.net[0].weight.detach().clone())

    def on_step_end(self, trainer: Any, step: int) -> None:
        for h in getattr(trainer.task, "_hooks", []):
            h.remove()
        trainer.task._hooks = []
        trainer.task.next_step = step + 1
        self.weights[step] = trainer.module.net[0].weight.detach().clone()


class Metrics(NullTracker):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: Any, step: int) -> None:
        self.rows.append((step, dict(metrics)))


def config(policy: str, **training: Any) -> ToyEngineConfig:
    return ToyEngineConfig.model_validate({
        "model": {"hidden": 8},
        "data": {"num_samples": 64, "val_samples": 0},
        "scheduler": {"type": "constant_with_warmup", "warmup_steps": 0},
        "training": {"batch_size": 4, "max_steps": 10, "log_every": 1, "checkpoint_every": 4,
                     "mixed_precision": "no", "nonfinite_policy": policy, **training},
    })


def test_skip_leaves_weights_untouched_and_counts(tmp_path: Path) -> None:
    cfg = config("skip")
    task, watch, tracker = NaNTask(cfg, loss_at={3}, grad_at={6}), Watch(), Metrics()
    result = Trainer(local_context(cfg, tmp_path / "out", tracker=tracker), task, callbacks=[watch]).fit()
    assert result.step == 10
    assert torch.equal(watch.weights[3], watch.weights[2])  # NaN loss: no update
    assert torch.equal(watch.weights[6], watch.weights[5])  # finite loss, NaN gradient: no update
    assert not torch.equal(watch.weights[4], watch.weights[3])
    assert result.metrics["nonfinite_events"] == 2
    counted = [m["train/nonfinite_events"] for s, m in tracker.rows if "train/nonfinite_events" in m]
    assert counted[-1] == 2
    assert torch.isfinite(torch.tensor(result.metrics["loss"]))  # skipped steps stay out of the means


def test_skip_budget_runs_out(tmp_path: Path) -> None:
    cfg = config("skip", max_nonfinite_skips=2)
    with pytest.raises(NonFiniteError, match="3 non-finite steps"):
        Trainer(local_context(cfg, tmp_path / "out"), NaNTask(cfg, loss_at={2, 4, 5}), callbacks=[Watch()]).fit()


def test_rollback_returns_to_the_last_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = config("rollback")
    task, watch = NaNTask(cfg, loss_at={7}), Watch()
    result = Trainer(local_context(cfg, tmp_path / "out"), task, callbacks=[watch]).fit()
    assert result.step == 10
    assert "rolling back to step 4" in capsys.readouterr().err
    step, weights = watch.rolled_back
    assert step == 4 and torch.equal(weights, watch.weights[4]) and not torch.equal(weights, watch.weights[6])
    # after the rollback, steps 5.. were trained again on fresh batches: 10 good steps + the 2 undone + the bad one
    assert task.batches == 13
    assert result.metrics["nonfinite_events"] == 1


def test_rollback_before_any_periodic_checkpoint_uses_the_initial_one(tmp_path: Path) -> None:
    cfg = config("rollback")
    watch = Watch()
    Trainer(local_context(cfg, tmp_path / "out"), NaNTask(cfg, loss_at={2}), callbacks=[watch]).fit()
    assert (tmp_path / "out/checkpoints").exists()


def test_abort_is_one_clear_sentence(tmp_path: Path) -> None:
    cfg = config("abort")
    with pytest.raises(NonFiniteError) as err:
        Trainer(local_context(cfg, tmp_path / "out"), NaNTask(cfg, loss_at={6}), callbacks=[Watch()]).fit()
    msg = str(err.value)
    assert "loss was not finite at step 6" in msg and "nonfinite_policy" in msg
    assert "checkpoints/step-00000004" in msg
    assert "\n" not in msg and err.value.exit_code == 3
