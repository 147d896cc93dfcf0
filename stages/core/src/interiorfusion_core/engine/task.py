"""What a stage gives the engine: a TrainTask (model, data, losses) and resumable data loaders."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from interiorfusion_core.config.base import CurriculumPhase

if TYPE_CHECKING:
    from interiorfusion_core.engine.step import StepContext


@runtime_checkable
class ResumableLoader(Protocol):
    """The data-loader contract (the data stage's streaming loader implements it; `InMemoryLoader` is the
    reference implementation).

    - `iter(loader)` yields this rank's batches of the current epoch, starting at the current position;
    - `state_dict()` is JSON-able and describes the position after the last batch *handed out* (not prefetched);
    - `load_state_dict(state)` restores it: the next `iter()` continues exactly where that state left off;
    - `set_epoch(e)` starts epoch `e` from its beginning (its own shuffle order, seeded by the factory's seed).
    """

    def __iter__(self) -> Iterator[Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    def set_epoch(self, epoch: int) -> None: ...


class TrainTask(ABC):
    """Subclass per stage. The engine calls, in order: `build_model`, `frozen_models`, `make_loader` (again at
    every curriculum phase change), then `train_step` for every micro-batch (by default: the next batch through
    `compute_losses`, then backward); `val_batches` every `training.val_every` steps."""

    # Name of the stage's own throughput unit (e.g. "voxels", "tokens"): logged as train/<unit>_per_s when
    # `count_units` returns a number.
    unit_name: ClassVar[str | None] = None
    # The models `frozen_models` built, ready to use (on the device, eval mode, no grad); set by the trainer.
    frozen: Mapping[str, nn.Module] = MappingProxyType({})
    # Under ZeRO-3 with zero3_init_flag, build the model inside deepspeed.zero.Init (partitioned as created). A task
    # whose build loads whole pretrained tensors and lets a library initialise new ones (LoRA: peft writes its
    # zero B matrices into the tensors it made) opts out; deepspeed.initialize partitions the model afterwards.
    partition_at_init: ClassVar[bool] = True

    def prepare(self, runtime: Any) -> None:  # noqa: B027 - optional hook
        """Called once on every rank after the runtime exists and before anything is built: collective work the
        task's data needs first (e.g. encoding an input dataset). `runtime` is the engine's Runtime."""

    @abstractmethod
    def build_model(self, config: Any) -> nn.Module:
        """The model, on CPU, in fp32. Under ZeRO-3 this runs inside `deepspeed.zero.Init` (parameters are
        partitioned as they are created); also used on the meta device by the planner when registered there."""

    @abstractmethod
    def make_loader(self, phase: CurriculumPhase | None, rank: int, world_size: int, seed: int) -> ResumableLoader:
        """This rank's loader for a curriculum phase (None without a curriculum). The rank's batch size is
        `training.batch_size`; ranks must see disjoint samples."""

    @abstractmethod
    def compute_losses(self, model: nn.Module, batch: Any) -> Mapping[str, torch.Tensor]:
        """Scalar losses: "loss" (the total that is back-propagated) and any named terms (logged). `model` is the
        wrapped model (DDP / DeepSpeed engine): call it as `model(...)` so gradient hooks fire; use
        `interiorfusion_core.engine.unwrap(model)` to reach attributes. Validation uses it too (no grad, eval
        mode), also for tasks that override `train_step`."""

    def frozen_models(self, config: Any) -> Mapping[str, nn.Module]:
        """Auxiliary networks used but never trained (a teacher, a perceptual or reward network), on CPU in fp32.
        Built on every rank outside `deepspeed.zero.Init` (never partitioned) with their own seeded RNG; the
        trainer freezes them (`requires_grad_(False)`, `eval()`), moves them to the device in the run's precision
        (bf16 where the run is bf16: call them under `step.autocast()`, as the validation's `compute_losses` is)
        and puts them in `self.frozen` and `StepContext.frozen`. They are not in the optimizer, the EMA or the
        checkpoints (load their weights here). They must not share parameters with the model."""
        return {}

    def train_step(self, step: StepContext) -> Mapping[str, torch.Tensor]:
        """One micro-batch: call `step.backward(...)` at least once, return the losses to log ("loss" and named
        terms, scalars, the same keys every call). Override for rollouts, several forward passes or several loss
        groups; the trainer keeps accumulation, clipping, the non-finite guard, metrics and checkpoints around it.
        A non-finite "loss" or gradient norm skips the step (`training.nonfinite_policy`); under DeepSpeed the
        update happens inside the engine, so the guard acts through the gradients: a non-finite loss must go
        through `step.backward`. The default: the next batch through `compute_losses`, one backward."""
        batch = step.next_batch()
        with step.autocast():
            losses = self.compute_losses(step.model, batch)
        if "loss" not in losses:
            raise KeyError(f"{type(self).__name__}.compute_losses must return a 'loss' entry (got {sorted(losses)})")
        step.backward(losses["loss"])
        return losses

    def val_batches(self, rank: int, world_size: int) -> Iterable[Any] | None:
        """Validation batches of this rank (None: no validation). Up to `training.val_batches` are used."""
        return None

    def count_units(self, batch: Any) -> int | float | None:
        """The number of `unit_name` units in a batch (e.g. active voxels), before it moves to the device."""
        return None

    def batch_size_of(self, batch: Any) -> int | None:
        """Samples in a batch (for samples/s); None: `training.batch_size`."""
        return None

    def on_phase(self, phase: CurriculumPhase | None, model: nn.Module) -> None:  # noqa: B027 - optional hook
        """Called when a curriculum phase starts (including the phase a resumed run starts in)."""

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]] | None:
        """Optimiser parameter groups; None: decay on ndim >= 2 trainable parameters, none on the rest."""
        return None

    def to_device(self, batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
        """Move a batch to the device; `dtype` (when set) is the floating dtype the model's parameters use."""
        return move_to(batch, device, dtype)


def move_to(obj: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Tensors (recursively in dicts, lists, tuples) to `device`; floating tensors to `dtype` when given."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype, non_blocking=True)
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: move_to(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(move_to(v, device, dtype) for v in obj))
    if isinstance(obj, list | tuple):
        return type(obj)(move_to(v, device, dtype) for v in obj)
    if hasattr(obj, "to") and callable(obj.to) and not isinstance(obj, nn.Module):
        return obj.to(device)
    return obj


def move_batch(batch: Mapping[str, Any], device: torch.device | str, dtype: torch.dtype | None,
               feature_fields: frozenset[str]) -> dict[str, Any]:
    """A batch dict to `device`: only the network's input fields (`feature_fields`) take the training dtype (bf16
    under DeepSpeed bf16); every other floating field (frames, cameras, depth and metric targets) stays at least
    float32: bf16 values near 5 m are 3.1 cm apart, coarser than a voxel."""
    moved = dict(batch)
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            continue
        if dtype is None or not value.is_floating_point():
            moved[key] = value.to(device)
        else:
            target = dtype if key in feature_fields else torch.promote_types(dtype, torch.float32)
            moved[key] = value.to(device, target)
    return moved


__all__ = ["ResumableLoader", "TrainTask", "move_batch", "move_to"]
