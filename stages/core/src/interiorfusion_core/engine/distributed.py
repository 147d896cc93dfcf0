"""The accelerate/DeepSpeed runtime of one training run, and the few collectives the trainer needs.

One entry point, three ways to run it:
- plain `python -m ...`: one process (CPU or one GPU);
- `accelerate launch --multi_gpu` (DDP; on CPU with ACCELERATE_USE_CPU=true): gradients all-reduced;
- `accelerate launch --config_file configs/accelerate_deepspeed.yaml` (DeepSpeed ZeRO): the launcher's file picks
  the ZeRO stage and offload; the stage config's `training:` section stays the source of truth for batch size,
  gradient accumulation and clipping (they override the file's values).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from interiorfusion_core.config.base import TrainingConfig
from interiorfusion_core.errors import UserError


@dataclass
class Runtime:
    accelerator: Any  # accelerate.Accelerator
    device: torch.device
    rank: int
    world_size: int
    deepspeed: bool
    zero_stage: int | None
    precision: str  # "bf16" or "no"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bf16 autocast for plain/DDP runs; DeepSpeed keeps bf16 weights itself (inputs are cast instead)."""
        return torch.bfloat16 if self.precision == "bf16" and not self.deepspeed else None

    @property
    def input_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.precision == "bf16" and self.deepspeed else None

    def autocast(self) -> Any:
        dtype = self.autocast_dtype
        if dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @property
    def kind(self) -> str:
        return str(getattr(self.accelerator.distributed_type, "value", self.accelerator.distributed_type))


def resolve_precision(requested: str) -> str:
    """bf16 where the device supports it, fp32 elsewhere (CPU)."""
    if requested == "fp16":
        raise UserError(
            "training.mixed_precision: fp16 is not supported by the engine; use bf16 (A100, H100, H200, L40S and "
            "RTX 4090 all support it) or no"
        )
    if requested == "bf16" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def using_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def make_runtime(training: TrainingConfig) -> Runtime:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    precision = resolve_precision(training.mixed_precision)
    handlers: list[Any] = []
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Without it accelerate tries NCCL, sees one process, and DeepSpeed's batch check fails (FIELD-NOTES).
        # (Only for launched runs: in a plain single process a backend would make accelerate expect a group.)
        handlers.append(InitProcessGroupKwargs(backend="gloo", timeout=timedelta(minutes=30)))
    plugin = None
    if using_deepspeed():
        from accelerate.utils import DeepSpeedPlugin

        world = int(os.environ.get("WORLD_SIZE", "1"))
        plugin = DeepSpeedPlugin(
            gradient_accumulation_steps=training.gradient_accumulation,
            gradient_clipping=training.grad_clip,
        )
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = training.batch_size
        ds["train_batch_size"] = training.batch_size * training.gradient_accumulation * world
        ds["gradient_accumulation_steps"] = training.gradient_accumulation
        if training.grad_clip > 0:
            ds["gradient_clipping"] = training.grad_clip
        else:
            ds.pop("gradient_clipping", None)
    accelerator = Accelerator(mixed_precision=precision, deepspeed_plugin=plugin, kwargs_handlers=handlers)
    zero_stage = None
    if plugin is not None:
        zero_stage = int(accelerator.state.deepspeed_plugin.zero_stage)
    return Runtime(
        accelerator=accelerator,
        device=accelerator.device,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        deepspeed=plugin is not None,
        zero_stage=zero_stage,
        precision=precision,
    )


@contextmanager
def model_init_context(rt: Runtime) -> Iterator[None]:
    """ZeRO-3 with zero3_init_flag: parameters are partitioned as the model is built (deepspeed.zero.Init)."""
    plugin = rt.accelerator.state.deepspeed_plugin if rt.deepspeed else None
    if plugin is not None and rt.zero_stage == 3 and plugin.zero3_init_flag:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=plugin.deepspeed_config):
            yield
    else:
        yield


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DeepSpeed / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _active(rt: Runtime) -> bool:
    return rt.distributed and dist.is_available() and dist.is_initialized()


def all_reduce(t: torch.Tensor, rt: Runtime, op: str = "sum") -> torch.Tensor:
    if _active(rt):
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def barrier(rt: Runtime) -> None:
    if _active(rt):
        dist.barrier()


def gather_objects(obj: Any, rt: Runtime) -> list[Any]:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not _active(rt):
        return [obj]
    out: list[Any] = [None] * rt.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, rt: Runtime) -> Any:
    if not _active(rt):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


__all__ = [
    "Runtime",
    "all_reduce",
    "barrier",
    "broadcast_object",
    "gather_objects",
    "make_runtime",
    "model_init_context",
    "resolve_precision",
    "unwrap",
    "using_deepspeed",
]
