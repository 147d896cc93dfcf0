"""The engine's self-test model: a tiny MLP regressing a fixed random teacher (config kind `engine_toy`).

Importing this module registers the `engine_toy` model builder (for the planner) and the `engine-toy` stage (for
tests and smoke runs through the real stage contract). Real stages never import it.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from interiorfusion_core.config.base import (
    CurriculumPhase,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    Probability,
    Strict,
    TrainableStageConfig,
)
from interiorfusion_core.contract import Stage, StageContext, StageResult
from interiorfusion_core.engine.callbacks import Callback
from interiorfusion_core.engine.data import InMemoryLoader
from interiorfusion_core.engine.models import register_model_builder
from interiorfusion_core.engine.task import TrainTask
from interiorfusion_core.engine.trainer import Trainer
from interiorfusion_core.registry import register_stage

TOY_KIND = "engine_toy"


class ToyModelConfig(Strict):
    in_dim: PositiveInt = 8
    hidden: PositiveInt = 32
    depth: PositiveInt = 2
    out_dim: PositiveInt = 1
    dropout: Probability = 0.0


class ToyDataConfig(Strict):
    num_samples: PositiveInt = 256
    val_samples: NonNegativeInt = 64
    noise: NonNegativeFloat = 0.01
    # Sign flips (python `random`) and input jitter (numpy): exercises every RNG a resume must restore.
    augment: bool = False


class ToyEngineConfig(TrainableStageConfig):
    kind: Literal["engine_toy"] | None = None
    model: ToyModelConfig = Field(default_factory=ToyModelConfig)
    data: ToyDataConfig = Field(default_factory=ToyDataConfig)


class ToyMLP(nn.Module):
    def __init__(self, cfg: ToyModelConfig):
        super().__init__()
        layers: list[nn.Module] = []
        width = cfg.in_dim
        for _ in range(cfg.depth):
            layers += [nn.Linear(width, cfg.hidden), nn.GELU()]
            if cfg.dropout:
                layers.append(nn.Dropout(cfg.dropout))
            width = cfg.hidden
        layers.append(nn.Linear(width, cfg.out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_toy_mlp(config: ToyEngineConfig) -> ToyMLP:
    return ToyMLP(config.model)


def _toy_activation_bytes(config: ToyEngineConfig, phase: Any, micro_batch: int, checkpointing: bool) -> float:
    m = config.model
    # fp32: every layer's input and output kept for backward (GELU keeps its input too).
    per_sample = m.in_dim + m.depth * 3 * m.hidden + m.out_dim
    return float(micro_batch * per_sample * 4)


register_model_builder(
    TOY_KIND, build_toy_mlp, tokens_per_sample=lambda config, phase: 1.0, activation_bytes=_toy_activation_bytes,
    description="engine self-test MLP",
)


@lru_cache(maxsize=8)
def toy_samples(n: int, in_dim: int, out_dim: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    teacher = torch.Generator().manual_seed(1234)
    w = torch.randn(in_dim, out_dim, generator=teacher) / in_dim**0.5
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_dim, generator=g)
    y = torch.sin(2.0 * x @ w) + noise * torch.randn(n, out_dim, generator=g)
    return x, y


class ToyDataset:
    def __init__(self, x: torch.Tensor, y: torch.Tensor, resolution: int | None):
        self.x, self.y, self.resolution = x, y, resolution

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "y": self.y[i], "resolution": self.resolution or 0}


class ToyTask(TrainTask):
    unit_name = "features"

    def __init__(self, config: ToyEngineConfig):
        self.config = config

    def build_model(self, config: Any) -> nn.Module:
        return build_toy_mlp(config)

    def _dataset(self, n: int, seed: int, resolution: int | None) -> ToyDataset:
        m, d = self.config.model, self.config.data
        x, y = toy_samples(n, m.in_dim, m.out_dim, d.noise, seed)
        return ToyDataset(x, y, resolution)

    def make_loader(self, phase: CurriculumPhase | None, rank: int, world_size: int, seed: int) -> InMemoryLoader:
        ds = self._dataset(self.config.data.num_samples, 1, phase.resolution if phase else None)
        return InMemoryLoader(ds, self.config.training.batch_size, rank=rank, world_size=world_size, seed=seed)

    def val_batches(self, rank: int, world_size: int) -> Any:
        n = self.config.data.val_samples
        if not n:
            return None
        bs = self.config.training.batch_size
        if n < bs * world_size:
            return None
        return InMemoryLoader(self._dataset(n, 2, None), bs, rank=rank, world_size=world_size, shuffle=False)

    def compute_losses(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        x, y = batch["x"], batch["y"]
        if self.config.data.augment and model.training:
            if random.random() < 0.5:  # the teacher is odd: sin(-a) = -sin(a)
                x, y = -x, -y
            x = x + float(np.random.normal(0.0, 0.01))
        pred = model(x)
        mse = F.mse_loss(pred.float(), y.float())
        l1 = (pred.float() - y.float()).abs().mean()
        return {"loss": mse + 0.1 * l1, "mse": mse, "l1": l1}

    def count_units(self, batch: Mapping[str, Any]) -> int:
        return int(batch["x"].numel())


class ToyStage(Stage):
    name = "engine-toy"
    config_kind = TOY_KIND
    config_model = ToyEngineConfig
    description = "engine self-test: a tiny MLP regression"
    # Tests hook in here (callbacks, a task subclass); real stages construct their Trainer directly.
    callbacks: ClassVar[list[Callback]] = []
    task_factory: ClassVar[Any] = ToyTask

    def run(self, ctx: StageContext) -> StageResult:
        result = Trainer(ctx, type(self).task_factory(ctx.config), callbacks=type(self).callbacks).fit()
        return StageResult(metrics=result.metrics, outputs={"checkpoint": result.checkpoint})


register_stage(ToyStage)

__all__ = ["TOY_KIND", "ToyDataset", "ToyEngineConfig", "ToyMLP", "ToyStage", "ToyTask", "build_toy_mlp"]
