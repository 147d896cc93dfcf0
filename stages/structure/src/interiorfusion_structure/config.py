"""The Structure DiT's config (`kind: dit_structure`, the seed's configs/dit_structure.yaml) and the blocks the
material and fine-tuning stages reuse. Pydantic only.

Interpretations of the seed:
- `model.mlp_ratio: 8192` is the MLP *hidden width* (1536 × 5.33; TRELLIS.2's 1.3B DiT has the same): values
  above 16 are a width, smaller ones a ratio of `width` (`DiTModelConfig.mlp_hidden`).
- `flow_matching` uses EDM's names on a rectified flow. With x_t = (1 − t)·x0 + t·x1 (t = 1 is data, the seed's
  convention), x_t / t = x1 + σ·x0 with σ = (1 − t) / t: EDM's σ is the rectified flow's noise-to-signal ratio.
  So every key keeps its EDM meaning: ln σ ~ N(p_mean, p_std²) is logit(t) ~ N(−p_mean, p_std²) (a logit-normal
  timestep law), and [sigma_min, sigma_max] bounds t to [1 / (1 + sigma_max), 1 / (1 + sigma_min)] in training
  and sampling (`FlowMatchingConfig.t_range`).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from interiorfusion_core.config.base import (
    DataLoaderConfig,
    LossTerm,
    PositiveFloat,
    PositiveInt,
    PretrainedRef,
    StageSpec,
    Strict,
    TrainableStageConfig,
)


class ConditioningConfig(Strict):
    image_encoder: PretrainedRef = PretrainedRef(source="facebook/dinov3-vitl16-pretrain-lvd1689m")
    image_dim: PositiveInt = 1024
    depth_dim: PositiveInt = 256
    layout_dim: PositiveInt = 512
    semantic_encoder: PretrainedRef = PretrainedRef(source="facebook/mask2former-swin-large-ade-semantic")
    semantic_dim: PositiveInt = 256
    image_size: int = Field(default=512, ge=16, le=4096, multiple_of=16)  # ViT patch 16


class DiTModelConfig(Strict):
    width: PositiveInt = 1536
    depth: PositiveInt = 30
    num_heads: PositiveInt = 12
    # The seed writes 8192 here: a hidden width, not a ratio (see module docstring).
    mlp_ratio: PositiveFloat = 8192
    qk_norm: bool = True
    rope: bool = True
    conditioning: ConditioningConfig = Field(default_factory=ConditioningConfig)

    @model_validator(mode="after")
    def _heads(self) -> DiTModelConfig:
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads} (each head gets "
                             "width / num_heads channels)")
        if (self.width // self.num_heads) % 2:
            raise ValueError(f"head width {self.width // self.num_heads} (width / num_heads) must be even (rotary "
                             "embeddings rotate channel pairs)")
        return self

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio) if self.mlp_ratio > 16 else round(self.width * self.mlp_ratio)


class FlowMatchingConfig(Strict):
    """EDM's names, rectified-flow meaning (module docstring): σ = (1 − t) / t."""

    sigma_min: PositiveFloat = 0.001
    sigma_max: PositiveFloat = 80.0
    p_mean: float = Field(default=-1.2, ge=-10, le=10)
    p_std: PositiveFloat = Field(default=1.2, le=10)

    @model_validator(mode="after")
    def _range(self) -> FlowMatchingConfig:
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min {self.sigma_min} must be below sigma_max {self.sigma_max} (they bound "
                             "the noise-to-signal ratio σ = (1 − t) / t)")
        return self

    @property
    def t_range(self) -> tuple[float, float]:
        """(t_min, t_max) for t = 1 / (1 + σ), σ ∈ [sigma_min, sigma_max]."""
        return 1.0 / (1.0 + self.sigma_max), 1.0 / (1.0 + self.sigma_min)


class StructureLossConfig(Strict):
    flow_matching: LossTerm = LossTerm(weight=1.0)
    depth_guidance: LossTerm = LossTerm(weight=0.3)


class DiTStageConfig(TrainableStageConfig):
    """What both DiT stages share: the backbone, optimisation, data and the flow-matching law."""

    model: DiTModelConfig = Field(default_factory=DiTModelConfig)
    data: DataLoaderConfig = Field(default_factory=DataLoaderConfig)
    flow_matching: FlowMatchingConfig = Field(default_factory=FlowMatchingConfig)


class DiTStructureConfig(DiTStageConfig):
    kind: Literal["dit_structure"] | None = None
    stage: ClassVar[StageSpec] = StageSpec(
        name="structure", config_kind="dit_structure", inputs={"latents": "vae"},
        description="rectified-flow Structure DiT over the VAE's geometry latents",
    )
    signature: ClassVar[tuple[str, ...]] = ("loss.flow_matching", "loss.depth_guidance", "flow_matching",
                                            "model.width")
    loss: StructureLossConfig = Field(default_factory=StructureLossConfig)
