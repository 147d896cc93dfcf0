"""The training engine every stage runs on: a Trainer driven by a small TrainTask (docs/engine.md)."""

from interiorfusion_core.engine.callbacks import Callback
from interiorfusion_core.engine.context import local_context
from interiorfusion_core.engine.data import InMemoryLoader, default_collate
from interiorfusion_core.engine.distributed import unwrap
from interiorfusion_core.engine.ema import EMA
from interiorfusion_core.engine.models import ModelSpec, get_model_spec, register_model_builder
from interiorfusion_core.engine.schedule import grendel_scaling, lr_at, plan_phases
from interiorfusion_core.engine.signals import Preempted, PreemptionGuard
from interiorfusion_core.engine.step import StepContext
from interiorfusion_core.engine.task import ResumableLoader, TrainTask, move_to
from interiorfusion_core.engine.trainer import NonFiniteError, Trainer, TrainResult, TrainState

__all__ = [
    "EMA",
    "Callback",
    "InMemoryLoader",
    "ModelSpec",
    "NonFiniteError",
    "Preempted",
    "PreemptionGuard",
    "ResumableLoader",
    "StepContext",
    "TrainResult",
    "TrainState",
    "TrainTask",
    "Trainer",
    "default_collate",
    "get_model_spec",
    "grendel_scaling",
    "local_context",
    "lr_at",
    "move_to",
    "plan_phases",
    "register_model_builder",
    "unwrap",
]
