"""`StepContext`: what `TrainTask.train_step` gets for one micro-batch.

The trainer calls `train_step` `training.gradient_accumulation` times per optimizer step and keeps everything
around it: accumulation (`backward` scales the loss), DDP `no_sync` on all but the last micro-batch, the DeepSpeed
engine, gradient clipping, the non-finite guard, metrics, checkpoints and resume.

    def train_step(self, step: StepContext) -> dict[str, Tensor]:
        batch = step.next_batch()
        with torch.no_grad(), step.autocast():
            rollout = sample(step.model, batch)              # any number of forward passes
        with step.autocast():
            policy = policy_loss(step.model, rollout)        # a forward pass …
        step.backward(policy)                                # … then its backward
        with step.autocast():
            value = value_loss(step.model, rollout)
        step.backward(value)                                 # gradients add up
        return {"loss": (policy + value).detach(), "policy": policy.detach(), "value": value.detach()}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from interiorfusion_core.config.base import CurriculumPhase
from interiorfusion_core.engine.distributed import Runtime


class StepContext:
    """One micro-batch of one optimizer step. The trainer keeps a single instance and updates `step`/`micro`.

    Attributes: `step` (1-based optimizer step being computed), `micro` (0-based micro-batch in it),
    `accumulation` (micro-batches per step), `rank`, `world_size`, `device`, `input_dtype` (bf16 under DeepSpeed
    bf16, else None), `model` (the wrapped model: call it, so DDP/DeepSpeed hooks fire), `module` (your nn.Module
    inside), `frozen` (the task's frozen models, on the device, eval mode, no grad).
    """

    def __init__(self, rt: Runtime, model: nn.Module, module: nn.Module, frozen: Mapping[str, nn.Module],
                 accumulation: int, next_batch: Callable[[bool], Any], engine: Any = None):
        self.rt = rt
        self.model = model
        self.module = module
        self.frozen = frozen
        self.accumulation = accumulation
        self.rank = rt.rank
        self.world_size = rt.world_size
        self.device = rt.device
        self.input_dtype = rt.input_dtype
        self.step = 0
        self.micro = 0
        self.phase: CurriculumPhase | None = None
        self.backwards = 0  # backward() calls in the current micro-batch
        self._next_batch = next_batch
        self._engine = engine

    @property
    def last_micro(self) -> bool:
        """Whether this is the last micro-batch of the optimizer step (where DDP all-reduces gradients)."""
        return self.micro == self.accumulation - 1

    def next_batch(self, *, to_device: bool = True) -> Any:
        """The next batch of this rank's loader (the epoch rolls over by itself), counted for samples/s and the
        task's units, moved to the device (`TrainTask.to_device`) unless `to_device=False`."""
        return self._next_batch(to_device)

    def autocast(self) -> AbstractContextManager[Any]:
        """bf16 autocast where the run uses it (plain/DDP on CUDA with bf16), else a no-op."""
        return self.rt.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate `loss` (a scalar), divided by the accumulation steps; DeepSpeed: `engine.backward`, with
        a non-finite loss turned into non-finite gradients so the update is skipped. Gradients of several calls
        add up, provided each backward follows its own forward pass (forward → backward, forward → backward):
        DDP and ZeRO prepare their gradient reduction at the forward. Several losses of one forward pass: sum them
        into one backward."""
        self.backwards += 1
        if self._engine is not None:
            # DeepSpeed steps inside engine.step(), before the trainer could look: a non-finite loss becomes
            # non-finite gradients (× NaN; × 1.0 is exact otherwise) so DeepSpeed's own check skips the update.
            ok = torch.isfinite(loss.detach())
            self._engine.backward(loss * torch.where(ok, 1.0, math.nan).to(loss.dtype))  # DeepSpeed scales
        elif self.accumulation > 1:  # plain autograd: bf16 needs no loss scaler; accelerate's wrapper costs ~1 ms
            (loss / self.accumulation).backward()
        else:
            loss.backward()

    def no_sync(self) -> AbstractContextManager[Any]:
        """DDP decides at the forward whether its backward all-reduces: forward and backward passes inside this
        context accumulate locally. For several loss groups in one micro-batch, run each group's forward right
        before its backward (or sum them into one backward), or wrap all groups but the last in `no_sync()`.
        The trainer already applies it to every micro-batch but the last. A no-op outside DDP."""
        if self.rt.distributed and not self.rt.deepspeed:
            return self.rt.accelerator.no_sync(self.model)
        return nullcontext()


__all__ = ["StepContext"]
