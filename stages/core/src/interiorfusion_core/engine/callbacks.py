"""Callbacks: hooks into the Trainer's loop. Subclass `Callback` and override what you need; the rest are no-ops.

    class Watch(Callback):
        def on_step_end(self, trainer, step):
            ...

    Trainer(ctx, task, callbacks=[Watch()])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from interiorfusion_core.engine.trainer import Trainer


class Callback:
    """Every hook runs on every rank; `trainer.rt.is_main` tells rank 0. Steps are 1-based optimizer steps."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """After setup (and any resume), before the first step; `trainer.state.step` is the step resumed at."""

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        """After optimizer step `step` (or a skipped non-finite one), before logging, validation, checkpoints."""

    def on_log(self, trainer: Trainer, step: int, metrics: Mapping[str, float]) -> None:
        """After the train metrics of `step` were logged (every `training.log_every` steps and at the end)."""

    def on_validation(self, trainer: Trainer, step: int, metrics: Mapping[str, float]) -> None:
        """After a validation pass at `step`."""

    def on_rollback(self, trainer: Trainer, step: int) -> None:
        """After a non-finite step rolled the run back to the checkpoint of `step`."""


__all__ = ["Callback"]
