"""The Trainer inside a stage: MLflow metrics through the real contract, gradient accumulation, EMA, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import Field
from safetensors.torch import load_file

from interiorfusion_core.config import LoadedConfig
from interiorfusion_core.config.base import (
    OptimizerConfig,
    SchedulerConfig,
    StageConfig,
    TrainableStageConfig,
    TrainingConfig,
)
from interiorfusion_core.contract import run_stage
from interiorfusion_core.engine import Callback, Trainer, local_context
from interiorfusion_core.engine.distributed import resolve_precision
from interiorfusion_core.engine.toy import ToyEngineConfig, ToyTask
from interiorfusion_core.errors import UserError


def toy(**training: Any) -> ToyEngineConfig:
    data = training.pop("data", {"num_samples": 64, "val_samples": 16})
    return ToyEngineConfig.model_validate({
        "kind": "engine_toy",
        "model": {"hidden": 8},
        "data": data,
        "scheduler": {"type": "linear_warmup_cosine", "warmup_steps": 2},
        "training": {"batch_size": 4, "max_steps": 6, "log_every": 2, "val_every": 3, "checkpoint_every": 3,
                     "mixed_precision": "bf16", **training},
    })


def test_stage_run_logs_metrics_to_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("INTERIORFUSION_HOME", str(tmp_path / "home"))
    cfg = toy()
    outcome = run_stage("engine-toy", LoadedConfig("engine_toy", cfg, "<test>"), output=str(tmp_path / "out"))
    manifest = outcome.manifest
    assert manifest.outputs == {"checkpoint": "checkpoints/step-00000006"}
    assert "checkpoints/step-00000006/model.safetensors" in manifest.artifacts
    assert manifest.metrics["steps"] == 6 and "best_val_loss" in manifest.metrics

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(manifest.mlflow_run_id)
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "train/mse", "train/l1", "train/lr", "train/grad_norm", "train/samples_per_s",
                "train/features_per_s", "train/peak_mem_gb", "train/step_time_s", "val/loss", "val/best_loss"):
        assert key in run.data.metrics, key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4, 6]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [3, 6]


def test_gradient_accumulation_matches_the_big_batch(tmp_path: Path) -> None:
    big = toy(batch_size=8, data={"num_samples": 64, "val_samples": 0})
    small = toy(batch_size=4, gradient_accumulation=2, data={"num_samples": 64, "val_samples": 0})
    a = Trainer(local_context(big, tmp_path / "a"), ToyTask(big)).fit()
    b = Trainer(local_context(small, tmp_path / "b"), ToyTask(small)).fit()
    wa = load_file(tmp_path / "a" / a.checkpoint / "model.safetensors")
    wb = load_file(tmp_path / "b" / b.checkpoint / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    assert a.metrics["loss"] == pytest.approx(b.metrics["loss"], rel=1e-5)


class Params(Callback):
    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, trainer: Any, step: int) -> None:
        self.by_step[step] = {n: p.detach().clone() for n, p in trainer.module.named_parameters()}


def test_ema_tracks_then_averages(tmp_path: Path) -> None:
    cfg = toy(max_steps=5, ema={"decay": 0.5, "start_step": 2}, data={"num_samples": 64, "val_samples": 0})
    params = Params()
    result = Trainer(local_context(cfg, tmp_path / "out"), ToyTask(cfg), callbacks=[params]).fit()
    ema = load_file(tmp_path / "out" / result.checkpoint / "ema.safetensors")
    for name, value in ema.items():
        expected = params.by_step[2][name]
        for step in (3, 4, 5):
            expected = 0.5 * expected + 0.5 * params.by_step[step][name]
        torch.testing.assert_close(value, expected)


def test_precision_is_fp32_on_cpu_and_fp16_is_refused() -> None:
    if not torch.cuda.is_available():
        assert resolve_precision("bf16") == "no"
    with pytest.raises(UserError, match="fp16 is not supported"):
        resolve_precision("fp16")


class EmptyTask(ToyTask):
    def make_loader(self, phase: Any, rank: int, world_size: int, seed: int) -> Any:
        loader = super().make_loader(phase, rank, world_size, seed)
        loader.dataset = loader.dataset.__class__(loader.dataset.x[:0], loader.dataset.y[:0], None)
        return loader


def test_a_loader_without_batches_is_a_clear_error(tmp_path: Path) -> None:
    cfg = toy(data={"num_samples": 64, "val_samples": 0})
    with pytest.raises(UserError, match="yields no batches"):
        Trainer(local_context(cfg, tmp_path / "out"), EmptyTask(cfg)).fit()


class NoLossTask(ToyTask):
    def compute_losses(self, model: Any, batch: Any) -> Any:
        return {"mse": super().compute_losses(model, batch)["mse"]}


def test_compute_losses_must_return_loss(tmp_path: Path) -> None:
    cfg = toy(data={"num_samples": 64, "val_samples": 0})
    with pytest.raises(KeyError, match="must return a 'loss' entry"):
        Trainer(local_context(cfg, tmp_path / "out"), NoLossTask(cfg)).fit()


class DuckConfig(StageConfig):
    """Has every section the trainer reads, but is not a TrainableStageConfig."""

    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)

    @property
    def base_lr(self) -> float:
        return self.optimizer.lr


def test_the_trainer_needs_a_trainable_stage_config(tmp_path: Path) -> None:
    cfg = DuckConfig()
    with pytest.raises(TypeError, match="TrainableStageConfig.*DuckConfig is not one"):
        Trainer(local_context(cfg, tmp_path / "out"), ToyTask(toy()))
    assert isinstance(toy(), TrainableStageConfig)


class Events(Callback):
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def on_fit_start(self, trainer: Any) -> None:
        self.events.append(("fit_start", trainer.state.step))

    def on_step_end(self, trainer: Any, step: int) -> None:
        self.events.append(("step_end", step))

    def on_log(self, trainer: Any, step: int, metrics: Any) -> None:
        assert "train/lr" in metrics
        self.events.append(("log", step))

    def on_validation(self, trainer: Any, step: int, metrics: Any) -> None:
        assert "val/loss" in metrics
        self.events.append(("validation", step))

    def on_rollback(self, trainer: Any, step: int) -> None:
        self.events.append(("rollback", step))


class OnlyLogs(Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_log(self, trainer: Any, step: int, metrics: Any) -> None:
        self.steps.append(step)


class ThirdBatchNaN(ToyTask):
    """The third training batch has a NaN loss (step 3: one micro-batch per step)."""

    seen = 0

    def compute_losses(self, model: Any, batch: Any) -> Any:
        losses = super().compute_losses(model, batch)
        if model.training:
            self.seen += 1
            if self.seen == 3:
                return {**losses, "loss": losses["loss"] * float("nan")}
        return losses


def test_callbacks_get_every_hook_and_default_to_no_ops(tmp_path: Path) -> None:
    cfg = toy(max_steps=5, log_every=2, val_every=4, checkpoint_every=2, nonfinite_policy="rollback",
              mixed_precision="no")
    events, logs = Events(), OnlyLogs()
    Trainer(local_context(cfg, tmp_path / "out"), ThirdBatchNaN(cfg), callbacks=[events, logs]).fit()
    assert events.events == [
        ("fit_start", 0), ("step_end", 1), ("step_end", 2), ("log", 2),
        ("rollback", 2),  # step 3's NaN loss: back to checkpoint 2, step 3 runs again on the next batch
        ("step_end", 3), ("step_end", 4), ("log", 4), ("validation", 4), ("step_end", 5),
        ("log", 5), ("validation", 5),  # the end of the run
    ]
    assert logs.steps == [2, 4, 5]  # the hooks it does not override are no-ops


def test_callbacks_must_derive_from_callback(tmp_path: Path) -> None:
    class Plain:
        def on_step_end(self, trainer: Any, step: int) -> None: ...

    cfg = toy()
    with pytest.raises(TypeError, match="Plain is not an interiorfusion_core.engine.Callback"):
        Trainer(local_context(cfg, tmp_path / "out"), ToyTask(cfg), callbacks=[Plain()])
