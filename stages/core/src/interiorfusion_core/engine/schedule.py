"""Curriculum phases, the learning-rate schedule, Grendel-GS batch scaling and the AdamW optimiser.

Schedule semantics (docs/engine.md, "Learning-rate schedule"):

- The run is a sequence of phases: `training.curriculum`, or one phase of `max_steps` at the base lr.
- Warmup happens once, over the first `scheduler.warmup_steps` global steps: lr = peak × step / warmup_steps
  (transformers' convention: step 0 has lr 0). A later phase may re-warm over `scheduler.phase_warmup_steps`.
- After warmup each phase decays on its own, scaled to the phase's lr (its peak):
    linear_warmup_cosine   one half cosine from the phase lr to min_lr_ratio × phase lr at the phase's end
    cosine_with_restarts   `num_cycles` hard-restarted cosines inside the phase (a phase change is a restart too)
    constant_with_warmup   the phase lr
  With a single phase these are exactly transformers' get_cosine_schedule_with_warmup,
  get_cosine_with_hard_restarts_schedule_with_warmup and get_constant_schedule_with_warmup (tested).
- The lr is a pure function of the global step: a LambdaLR whose multiplier is lr(step) / base lr.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from interiorfusion_core.config.base import (
    CurriculumPhase,
    LRScalingConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainingConfig,
)


@dataclass(frozen=True)
class Phase:
    index: int
    start: int  # first global step of the phase (0-based)
    steps: int
    lr: float  # the phase's peak lr, after batch scaling
    spec: CurriculumPhase | None  # None when the config has no curriculum

    @property
    def end(self) -> int:
        return self.start + self.steps

    @property
    def resolution(self) -> int | None:
        return self.spec.resolution if self.spec is not None else None


def plan_phases(training: TrainingConfig, lr: float, lr_factor: float = 1.0) -> list[Phase]:
    if not training.curriculum:
        return [Phase(0, 0, training.max_steps, lr * lr_factor, None)]
    phases, start = [], 0
    for i, spec in enumerate(training.curriculum):
        phases.append(Phase(i, start, spec.steps, spec.lr * lr_factor, spec))
        start += spec.steps
    return phases


def phase_at(phases: list[Phase], step: int) -> Phase:
    """The phase that global step `step` (0-based) belongs to; steps past the end stay in the last phase."""
    for phase in phases:
        if step < phase.end:
            return phase
    return phases[-1]


def lr_at(step: int, phases: list[Phase], sched: SchedulerConfig) -> float:
    """Absolute learning rate of global step `step`."""
    phase = phase_at(phases, step)
    peak = phase.lr
    warm = sched.warmup_steps
    if step < warm:
        return peak * step / max(1, warm)
    seg_start = max(phase.start, warm)
    if phase.index > 0 and sched.phase_warmup_steps and phase.start >= warm:
        pw = sched.phase_warmup_steps
        if step < phase.start + pw:
            return peak * (step - phase.start) / pw
        seg_start = phase.start + pw
    if sched.type == "constant_with_warmup":
        return peak
    progress = (step - seg_start) / max(1, phase.end - seg_start)
    floor = sched.min_lr_ratio
    if sched.type == "linear_warmup_cosine":
        shape = max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    else:  # cosine_with_restarts
        if progress >= 1.0:
            shape = 0.0
        else:
            shape = max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((sched.num_cycles * progress) % 1.0))))
    return peak * (floor + (1.0 - floor) * shape)


def _multiplier(step: int, *, phases: list[Phase], sched: SchedulerConfig, base: float) -> float:
    return lr_at(step, phases, sched) / base


def make_scheduler(optimizer: torch.optim.Optimizer, phases: list[Phase], sched: SchedulerConfig,
                   base: float) -> LambdaLR:
    """`base` is the lr the optimiser was built with (every param group's initial lr)."""
    # functools.partial of a module-level function: LambdaLR's state_dict stays plain data.
    return LambdaLR(optimizer, partial(_multiplier, phases=phases, sched=sched, base=base))


# ---------------------------------------------------------------------------------------------- Grendel-GS
@dataclass(frozen=True)
class ScaledHyperparams:
    lr_factor: float
    betas: tuple[float, float]
    eps: float
    k: float  # global batch / reference batch


def grendel_scaling(opt: OptimizerConfig, scaling: LRScalingConfig, global_batch: int) -> ScaledHyperparams:
    """Grendel-GS (Zhao et al., "On Scaling Up 3D Gaussian Splatting Training"), with k = batch / reference:
    lr × sqrt(k), β → β**k, and with `scale_eps` eps / sqrt(k). The eps rule is the Adam square-root scaling
    rule (Malladi et al. 2022) that Grendel-GS's code also applies: our loss averages over the batch, so the
    gradient-noise scale sqrt(v) shrinks like 1/sqrt(k) and eps must shrink with it to keep its relative weight.
    """
    beta1, beta2 = opt.betas
    if not scaling.enabled:
        return ScaledHyperparams(1.0, (beta1, beta2), opt.eps, 1.0)
    k = global_batch / scaling.reference_batch
    eps = opt.eps / math.sqrt(k) if scaling.scale_eps else opt.eps
    return ScaledHyperparams(math.sqrt(k), (beta1**k, beta2**k), eps, k)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and kernels only; biases and norm scales (ndim < 2) are exempt (GPT-2/TRELLIS
    practice). Frozen parameters (LoRA bases) are left out."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # Under ZeRO-3's zero.Init the tensor is an empty placeholder; ds_shape is the real shape.
            ndim = len(getattr(p, "ds_shape", p.shape))
            (decay if ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(groups: Iterable[dict[str, Any]], lr: float, hp: ScaledHyperparams) -> torch.optim.AdamW:
    return torch.optim.AdamW(list(groups), lr=lr, betas=hp.betas, eps=hp.eps)


__all__ = [
    "Phase",
    "ScaledHyperparams",
    "grendel_scaling",
    "lr_at",
    "make_optimizer",
    "make_scheduler",
    "param_groups",
    "phase_at",
    "plan_phases",
]
