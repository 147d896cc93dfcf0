"""The Structure DiT's config (`kind: dit_structure`, the seed's configs/dit_structure.yaml) and the blocks the
material and fine-tuning stages reuse. Pydantic only.

Interpretations of the seed:
- `model.mlp_ratio: 8192` is the MLP *hidden width* (1536 × 5.33; TRELLIS.2's 1.3B DiT has the same): values
  above 16 are a width, smaller ones a ratio of `width` (`DiTModelConfig.mlp_hidden`).
- `flow_matching` uses EDM's names on a rectified flow (t = 1 is data, the seed's convention). `sigma_min` /
  `sigma_max` keep their meaning as bounds of the noise-to-signal ratio σ = (1 − t) / t, so t ∈ [1 / (1 +
  sigma_max), 1 / (1 + sigma_min)] (`FlowMatchingConfig.t_range`; sigma_min is the noise floor). `p_mean` /
  `p_std` are the logit-normal timestep law's parameters in the seed's own t: logit(t) ~ N(p_mean, p_std²), so
  p_mean = −1.2 concentrates training on noisy timesteps (median t = 0.23), TRELLIS.2's emphasis
  (interiorfusion_structure.flow explains why not EDM's ln σ ~ N(p_mean, p_std²)).
- The seed's rectified flow moves features on fixed coordinates; generation also needs the coordinates. A second,
  smaller flow with the same backbone (`occupancy`) generates the coarse occupancy of the latent grid first
  (docs/structure.md).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from interiorfusion_core.config.base import (
    DataLoaderConfig,
    LossTerm,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    PretrainedRef,
    Probability,
    StageSpec,
    Strict,
    TrainableStageConfig,
)

Modality = Literal["image", "depth", "layout", "semantic", "camera"]
MODALITIES: tuple[Modality, ...] = ("image", "depth", "layout", "semantic", "camera")


class ConditionDropout(Strict):
    """Per-modality probability that a training sample sees the modality's null token instead (classifier-free
    guidance needs the model to have seen every condition missing)."""

    image: Probability = 0.1
    depth: Probability = 0.1
    layout: Probability = 0.1
    semantic: Probability = 0.1
    # The camera places the image in the voxel frame; the sampler always knows it, so it is never dropped.
    camera: Probability = 0.0


class ConditioningConfig(Strict):
    """The condition tokens the DiT cross-attends to (interiorfusion_structure.conditions,
    docs/structure-conditions.md)."""

    # The condition-token width D every modality is projected to; the DiT projects D to its own width.
    width: PositiveInt = 1024
    # Modalities left out are not built at all (no frozen encoder is loaded for them).
    modalities: list[Modality] = Field(default_factory=lambda: list(MODALITIES))
    dropout: ConditionDropout = Field(default_factory=ConditionDropout)
    image_encoder: PretrainedRef = PretrainedRef(source="facebook/dinov3-vitl16-pretrain-lvd1689m")
    # transformers DINOv3ViTConfig kwargs for `image_encoder.random_init` (tests, smoke); None: a tiny default.
    image_encoder_config: dict[str, Any] | None = None
    image_dim: PositiveInt = 1024  # the image encoder's hidden size (checked when it is built)
    depth_dim: PositiveInt = 256
    # Channels of the depth CNN's stride-2 blocks before the last one (which has depth_dim): 4 blocks = stride 16.
    depth_channels: list[PositiveInt] = Field(default_factory=lambda: [32, 64, 128])
    layout_dim: PositiveInt = 512
    layout_layers: PositiveInt = 4
    layout_heads: PositiveInt = 8
    # Statements beyond this many (walls, doors, windows first, then boxes) are dropped.
    max_layout_tokens: PositiveInt = 256
    semantic_encoder: PretrainedRef = PretrainedRef(source="facebook/mask2former-swin-large-ade-semantic")
    # transformers Mask2FormerConfig kwargs for `semantic_encoder.random_init`; None: a tiny default (Swin 16).
    semantic_encoder_config: dict[str, Any] | None = None
    semantic_dim: PositiveInt = 256  # Mask2Former's pixel-decoder feature_size (checked when it is built)
    # Pixel-decoder levels that become tokens, coarse to fine: 0 = 1/32, 1 = 1/16, 2 = 1/8 of image_size.
    semantic_levels: list[Annotated[int, Field(ge=0, le=2)]] = Field(default_factory=lambda: [0, 1])
    camera_dim: PositiveInt = 256
    image_size: int = Field(default=512, ge=16, le=4096, multiple_of=16)  # ViT patch 16
    # Frozen features are computed once per image and resolution and stored beside the data.
    feature_cache: bool = True

    @model_validator(mode="after")
    def _check(self) -> ConditioningConfig:
        if not self.modalities:
            raise ValueError("modalities is empty: the DiT needs at least one condition (e.g. [camera])")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities {self.modalities} names a modality twice")
        if len(set(self.semantic_levels)) != len(self.semantic_levels) or not self.semantic_levels:
            raise ValueError(f"semantic_levels {self.semantic_levels} must be distinct levels among 0, 1, 2")
        if self.layout_dim % self.layout_heads:
            raise ValueError(f"layout_dim {self.layout_dim} is not divisible by layout_heads {self.layout_heads}")
        for ref, extra in (("image_encoder", self.image_encoder_config),
                           ("semantic_encoder", self.semantic_encoder_config)):
            if extra is not None and not getattr(self, ref).random_init:
                raise ValueError(f"{ref}_config is only used with {ref}.random_init: true (pretrained weights "
                                 "bring their own config)")
        return self

    def enabled(self, modality: str) -> bool:
        return modality in self.modalities


class AttentionConfig(Strict):
    """Self-attention over a sample's latent tokens: `full`, or `window` (cubic windows of `window` latent cells,
    shifted by half a window on odd blocks; a full-attention block every `full_every` blocks, 0: none)."""

    kind: Literal["full", "window"] = "full"
    window: PositiveInt = 8
    full_every: NonNegativeInt = 0
    # flash-attn varlen where installed on CUDA, else grouped SDPA (interiorfusion_structure.attention).
    backend: Literal["auto", "flash", "sdpa", "mask"] = "auto"


class DiTModelConfig(Strict):
    width: PositiveInt = 1536
    depth: PositiveInt = 30
    num_heads: PositiveInt = 12
    # The seed writes 8192 here: a hidden width, not a ratio (see module docstring).
    mlp_ratio: PositiveFloat = 8192
    qk_norm: bool = True
    rope: bool = True
    rope_theta: PositiveFloat = 10000.0
    attention: AttentionConfig = Field(default_factory=AttentionConfig)
    gradient_checkpointing: bool = False
    # Both flows also get the condition depth lifted into the latent grid per token (surface / free space seen from
    # the condition camera; interiorfusion_structure.lifting). Dropped with the depth modality.
    lift_depth: bool = True
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
    # `uniform`: the seed's code; `logit_normal`: the seed's config (p_mean, p_std). interiorfusion_structure.flow.
    timestep: Literal["uniform", "logit_normal"] = "logit_normal"

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


class DepthGuidanceTerm(LossTerm):
    """L1 between the condition depth and the depth rendered from the one-step estimate's decoded geometry.
    Samples with t below `min_t` are left out: their x̂1 is a blur whose rendered depth says nothing yet."""

    min_t: float = Field(default=0.5, ge=0, le=1)
    # The condition images are rendered at this size for the loss (the data's size when larger is downsampled).
    image_size: PositiveInt = 64


class StructureLossConfig(Strict):
    flow_matching: LossTerm = LossTerm(weight=1.0)
    depth_guidance: DepthGuidanceTerm = DepthGuidanceTerm(weight=0.3)
    # The coarse-occupancy flow's own flow-matching loss (it trains beside the latent flow, same batch).
    occupancy: LossTerm = LossTerm(weight=1.0)


class OccupancyFlowConfig(Strict):
    """The sparse-structure flow: a DiT over the dense occupancy of the latent grid, `patch`³ cells per token
    (space-to-depth: lossless, so no second VAE). Its sample's occupied cells are the latent flow's coordinates."""

    width: PositiveInt = 768
    depth: PositiveInt = 12
    num_heads: PositiveInt = 12
    mlp_ratio: PositiveFloat = 4.0
    patch: PositiveInt = 4

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio) if self.mlp_ratio > 16 else round(self.width * self.mlp_ratio)


class SamplingConfig(Strict):
    """Generation (validation samples, `interiorfusion generate`): ODE sampler, steps and CFG scales."""

    method: Literal["euler", "heun"] = "euler"
    steps: PositiveInt = 25
    occupancy_steps: PositiveInt = 25
    cfg_scale: float = Field(default=3.0, ge=0, le=50)
    # Per-modality guidance on top (1: none), e.g. {image: 2.0}. Keys: interiorfusion_structure.conditions.
    cfg_modality: dict[str, float] = Field(default_factory=dict)
    # Occupancy probability above which a latent cell is generated (the flow's ±1 target: threshold 0).
    occupancy_threshold: float = Field(default=0.0, ge=-1, le=1)
    seed: NonNegativeInt = 0


class StructureEvalConfig(Strict):
    """Held-out generation after training (eval.json, MLflow): scenes from the splits' condition views. The first
    split is also the validation split (losses and the previews logged at each validation)."""

    splits: list[str] = Field(default_factory=lambda: ["val", "test"], min_length=1)
    samples: NonNegativeInt = 8
    # F-score thresholds in metres (metric frame) and the points per scene for Chamfer.
    fscore_thresholds: list[PositiveFloat] = Field(default_factory=lambda: [0.05, 0.1])
    max_points: PositiveInt = 20000
    # Validation logs this many generated previews to MLflow at each `training.val_every`.
    log_samples: NonNegativeInt = 2


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
    occupancy: OccupancyFlowConfig = Field(default_factory=OccupancyFlowConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    eval: StructureEvalConfig = Field(default_factory=StructureEvalConfig)
    # Tokens per micro-batch cap (latent cells) on top of training.batch_size samples.
    max_tokens: PositiveInt = 262144
