"""LR schedules (against transformers' implementations and at known steps), curriculum phases through the Trainer,
and Grendel-GS batch scaling."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from interiorfusion_core.config import load_config
from interiorfusion_core.config.base import LRScalingConfig, OptimizerConfig, SchedulerConfig, TrainingConfig
from interiorfusion_core.engine import Callback, Trainer, grendel_scaling, local_context, lr_at, plan_phases
from interiorfusion_core.engine.schedule import make_scheduler, phase_at
from interiorfusion_core.engine.toy import ToyEngineConfig, ToyTask

ROOT = Path(__file__).resolve().parents[2]


def sched(type_: str, warmup: int = 10, **kw: Any) -> SchedulerConfig:
    return SchedulerConfig(type=type_, warmup_steps=warmup, **kw)


def one_phase(steps: int = 100, lr: float = 1e-3) -> list:
    return plan_phases(TrainingConfig(max_steps=steps), lr)


def hf_lrs(factory: Any, steps: int, lr: float = 1e-3, **kw: Any) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    s = factory(opt, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    return out


@pytest.mark.parametrize(
    ("cfg", "factory", "kw"),
    [
        (sched("linear_warmup_cosine"), "get_cosine_schedule_with_warmup", {}),
        (sched("linear_warmup_cosine", min_lr_ratio=0.1), "get_cosine_with_min_lr_schedule_with_warmup",
         {"min_lr_rate": 0.1}),
        (sched("cosine_with_restarts", num_cycles=3), "get_cosine_with_hard_restarts_schedule_with_warmup",
         {"num_cycles": 3}),
        (sched("constant_with_warmup"), "get_constant_schedule_with_warmup", {}),
    ],
)
def test_single_phase_equals_transformers(cfg: SchedulerConfig, factory: str, kw: dict) -> None:
    import transformers.optimization as hf

    fn = getattr(hf, factory)
    extra = {} if "constant" in factory else {"num_training_steps": 100}
    expected = hf_lrs(fn, 100, num_warmup_steps=10, **extra, **kw)
    phases = one_phase()
    ours = [lr_at(s, phases, cfg) for s in range(100)]
    assert ours == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # the LambdaLR the trainer steps gives the same sequence
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    lam = make_scheduler(opt, phases, cfg, 1e-3)
    seq = []
    for _ in range(100):
        seq.append(opt.param_groups[0]["lr"])
        opt.step()
        lam.step()
    assert seq == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_known_values_single_phase() -> None:
    phases, cfg = one_phase(), sched("linear_warmup_cosine")
    assert lr_at(0, phases, cfg) == 0.0
    assert lr_at(5, phases, cfg) == pytest.approx(5e-4)
    assert lr_at(10, phases, cfg) == pytest.approx(1e-3)
    assert lr_at(55, phases, cfg) == pytest.approx(5e-4)  # half way down the cosine
    assert lr_at(100, phases, cfg) == pytest.approx(0.0, abs=1e-12)
    restarts = sched("cosine_with_restarts", num_cycles=3)  # cycles of 30 steps after warmup
    assert lr_at(40, phases, restarts) == pytest.approx(1e-3)  # restart
    assert lr_at(25, phases, restarts) == pytest.approx(5e-4)


CURRICULUM = TrainingConfig(
    max_steps=100,
    curriculum=[{"resolution": 32, "steps": 40, "lr": 1e-3}, {"resolution": 64, "steps": 60, "lr": 5e-4}],
)


def test_curriculum_cosine_per_phase_scaled_to_phase_lr() -> None:
    phases = plan_phases(CURRICULUM, 1e-4)
    assert [(p.start, p.end, p.lr, p.resolution) for p in phases] == [(0, 40, 1e-3, 32), (40, 100, 5e-4, 64)]
    cfg = sched("linear_warmup_cosine")
    assert lr_at(0, phases, cfg) == 0.0  # warmup once, at the start
    assert lr_at(10, phases, cfg) == pytest.approx(1e-3)
    assert lr_at(25, phases, cfg) == pytest.approx(5e-4)  # middle of phase 0's cosine (10..40)
    assert lr_at(40, phases, cfg) == pytest.approx(5e-4)  # phase 1 starts at its own peak
    assert lr_at(70, phases, cfg) == pytest.approx(2.5e-4)  # middle of phase 1's cosine
    rewarm = sched("linear_warmup_cosine", phase_warmup_steps=10)
    assert lr_at(40, phases, rewarm) == 0.0
    assert lr_at(45, phases, rewarm) == pytest.approx(2.5e-4)
    assert lr_at(50, phases, rewarm) == pytest.approx(5e-4)
    assert lr_at(75, phases, rewarm) == pytest.approx(2.5e-4)  # middle of 50..100
    const = sched("constant_with_warmup")
    assert [lr_at(s, phases, const) for s in (5, 39, 40, 99)] == pytest.approx([5e-4, 1e-3, 5e-4, 5e-4])
    assert phase_at(phases, 39).index == 0 and phase_at(phases, 40).index == 1


def test_seed_vae_schedule() -> None:
    """configs/vae_pretrain.yaml: cosine_with_restarts, 10k warmup, phases 50k/100k/50k at 1e-4, 1e-4, 5e-5."""
    cfg = load_config(ROOT / "configs/vae_pretrain.yaml").model
    phases = plan_phases(cfg.training, cfg.optimizer.lr)
    s = cfg.scheduler
    assert lr_at(5_000, phases, s) == pytest.approx(5e-5)
    assert lr_at(10_000, phases, s) == pytest.approx(1e-4)
    assert lr_at(30_000, phases, s) == pytest.approx(5e-5)
    assert lr_at(50_000, phases, s) == pytest.approx(1e-4)  # phase 2 restarts at its peak
    assert lr_at(100_000, phases, s) == pytest.approx(5e-5)
    assert lr_at(150_000, phases, s) == pytest.approx(5e-5)  # phase 3 peak
    assert lr_at(175_000, phases, s) == pytest.approx(2.5e-5)


# ---------------------------------------------------------------------------------------------- the Trainer
class RecordingTask(ToyTask):
    def __init__(self, config: Any):
        super().__init__(config)
        self.loaders: list[Any] = []
        self.resolutions: list[int] = []

    def make_loader(self, phase: Any, rank: int, world_size: int, seed: int) -> Any:
        self.loaders.append(phase)
        return super().make_loader(phase, rank, world_size, seed)

    def compute_losses(self, model: Any, batch: Any) -> Any:
        if model.training:
            self.resolutions.append(int(batch["resolution"][0]))
        return super().compute_losses(model, batch)


class LrLog(Callback):
    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def on_log(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        self.lrs[step] = metrics["train/lr"]


def toy(**training: Any) -> ToyEngineConfig:
    return ToyEngineConfig.model_validate({
        "model": {"hidden": 8},
        "data": {"num_samples": 32, "val_samples": 0},
        "scheduler": {"type": "linear_warmup_cosine", "warmup_steps": 2},
        "training": {"batch_size": 4, "log_every": 1, "checkpoint_every": 1000, "mixed_precision": "no",
                     **training},
    })


def test_curriculum_switch_changes_resolution_and_lr_at_the_right_step(tmp_path: Path) -> None:
    cfg = toy(max_steps=12, curriculum=[{"resolution": 32, "steps": 5, "lr": 1e-2},
                                        {"resolution": 64, "steps": 7, "lr": 1e-3}])
    task, lrs = RecordingTask(cfg), LrLog()
    result = Trainer(local_context(cfg, tmp_path / "out"), task, callbacks=[lrs]).fit()
    assert result.step == 12
    assert task.resolutions == [32] * 5 + [64] * 7  # the loader was rebuilt exactly at step 6
    assert [p.resolution for p in task.loaders] == [32, 64]
    phases = plan_phases(cfg.training, cfg.optimizer.lr)
    assert lrs.lrs == pytest.approx({s + 1: lr_at(s, phases, cfg.scheduler) for s in range(12)})
    assert lrs.lrs[6] == pytest.approx(1e-3)  # step 6 is the first of phase 1, at its peak


def test_grendel_scaling_rules() -> None:
    opt = OptimizerConfig(lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    off = grendel_scaling(opt, LRScalingConfig(), 64)
    assert (off.lr_factor, off.betas, off.eps) == (1.0, (0.9, 0.999), 1e-8)
    hp = grendel_scaling(opt, LRScalingConfig(enabled=True, reference_batch=8), 64)  # k = 8
    assert hp.k == 8
    assert hp.lr_factor == pytest.approx(math.sqrt(8))
    assert hp.betas == pytest.approx((0.9**8, 0.999**8))
    assert hp.eps == pytest.approx(1e-8 / math.sqrt(8))
    keep_eps = grendel_scaling(opt, LRScalingConfig(enabled=True, reference_batch=8, scale_eps=False), 64)
    assert keep_eps.eps == 1e-8 and keep_eps.betas == hp.betas
    # the seed's own formulas are the reference_batch=1 case
    seed = grendel_scaling(opt, LRScalingConfig(enabled=True), 4)
    assert seed.lr_factor == pytest.approx(2.0) and seed.betas == pytest.approx((0.9**4, 0.999**4))
    # smaller than the reference batch scales down
    down = grendel_scaling(opt, LRScalingConfig(enabled=True, reference_batch=64), 16)
    assert down.lr_factor == pytest.approx(0.5) and down.betas[0] == pytest.approx(0.9**0.25)


def test_trainer_applies_grendel_scaling(tmp_path: Path) -> None:
    # global batch = 4 per rank × 1 rank × 2 accumulation = 8; reference 2 → k = 4
    cfg = toy(max_steps=2, gradient_accumulation=2, lr_scaling={"enabled": True, "reference_batch": 2},
              curriculum=[{"resolution": 32, "steps": 2, "lr": 1e-3}])
    trainer = Trainer(local_context(cfg, tmp_path / "out"), ToyTask(cfg))
    trainer.setup()
    group = trainer.raw_optimizer.param_groups[0]
    assert trainer.global_batch == 8 and trainer.hp.k == 4
    assert group["betas"] == pytest.approx((0.9**4, 0.999**4))
    assert group["eps"] == pytest.approx(1e-8 / 2)
    assert trainer.phases[0].lr == pytest.approx(2e-3)  # the phase lr × sqrt(4)
