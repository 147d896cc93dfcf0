"""The VAE stage's config (`kind: vae_pretrain`, the seed's configs/vae_pretrain.yaml). Pydantic only.

Interpretations of the seed:
- `model.base_resolution` / `model.target_resolution`: training starts at the base resolution and ends at the
  target; the target is the resolution the latent describes (its grid is target / compression, e.g. 1024³ → 64³
  with 5 levels) and the one the held-out evaluation and the encode job run at. With a curriculum, its first phase
  must be at base and its last at target; without one, training runs at the target.
- The VAE's `edge_preservation` loss is configured but absent from the seed's code; the VAE implements it
  (Sobel edges of rendered vs true depth).
- The seed sums the KL; `loss.kl_reduction` chooses mean (default) or the seed's per-sample sum.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from interiorfusion_core.config.base import (
    BCETerm,
    CosineTerm,
    CrossEntropyTerm,
    DataLoaderConfig,
    DistanceTerm,
    LossTerm,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    Probability,
    SchedulerConfig,
    StageSpec,
    Strict,
    TrainableStageConfig,
    check_resolution,
)


class VAEModelConfig(Strict):
    latent_dim: PositiveInt = 64
    base_resolution: int | None = None
    target_resolution: int = 1024
    # Channel widths per U-Net level, finest first; 5 levels = 4 downsamplings = 16× compression.
    channels: list[PositiveInt] = Field(default_factory=lambda: [32, 64, 128, 256, 512], min_length=2)
    blocks_per_level: PositiveInt = 2
    sparse_backend: Literal["auto", "torch", "spconv", "minkowski"] = "auto"
    # Per training sample, the probability that the material branch decodes from the material latent alone (its
    # geometry inputs zeroed), so the material latent carries the materials (interiorfusion_vae.model).
    material_geometry_dropout: Probability = 0.5

    @model_validator(mode="after")
    def _resolutions(self) -> VAEModelConfig:
        check_resolution(self.target_resolution)
        if self.base_resolution is not None:
            check_resolution(self.base_resolution)
            if self.base_resolution > self.target_resolution:
                raise ValueError(f"base_resolution {self.base_resolution} must be <= target_resolution "
                                 f"{self.target_resolution} (training grows towards the target)")
        for name in ("base_resolution", "target_resolution"):
            res = getattr(self, name)
            if res is not None and res // self.compression < 2:
                raise ValueError(
                    f"{name} {res} is too small for {len(self.channels)} levels ({self.compression}× compression "
                    "leaves a latent grid under 2³); use fewer channels entries or a larger resolution"
                )
        return self

    @property
    def compression(self) -> int:
        """Linear compression of the encoder: one halving per level after the first."""
        return 2 ** (len(self.channels) - 1)

    @property
    def latent_resolution(self) -> int:
        """The latent grid side at the target resolution (what the DiTs generate)."""
        return self.target_resolution // self.compression


class VAELossConfig(Strict):
    reconstruction: DistanceTerm = DistanceTerm(weight=1.0, type="l1")
    kl_divergence: LossTerm = LossTerm(weight=1.0e-3)
    depth_consistency: DistanceTerm = DistanceTerm(weight=0.5, type="l1")
    normal_consistency: CosineTerm = CosineTerm(weight=0.3)
    edge_preservation: DistanceTerm = DistanceTerm(weight=0.2, type="l1")
    pruning: BCETerm = BCETerm(weight=1.0)
    # Per-voxel semantic class (the data's labels) from the geometry branch. 0.1: at initialisation its
    # cross-entropy (ln 28 ≈ 3.3) weighs about as much as the shape term, and it must not steer the geometry
    # latent away from shape; samples without labels are skipped and counted.
    semantic: CrossEntropyTerm = CrossEntropyTerm(weight=0.1)
    # The pruning heads also train on their own false proposals: at each level up to this many × the true
    # children are added from the heads' highest wrong logits (0 = pure teacher forcing), so free decoding meets
    # false parents it has seen in training. The ratio ramps linearly from 0 at `pruning_proposals_start` (a
    # fraction of training.max_steps) to its value at the last step: an untrained head's proposals are noise, and
    # on the smoke config proposals from step 1 at ratio 1 pushed every head to keep nothing (held-out IoU
    # 0.245 → 0.128).
    pruning_proposals: NonNegativeFloat = 0.5
    pruning_proposals_start: float = Field(default=0.5, ge=0.0, lt=1.0)
    # The seed sums the KL over everything; "mean" (per latent element) keeps its weight independent of scene
    # size and batch. "sum" sums per sample and averages over the batch (the seed's formula, per sample).
    kl_reduction: Literal["mean", "sum"] = "mean"
    # Views per sample rendered for the depth/normal/edge terms (0 disables them).
    render_views: NonNegativeInt = 2


class VAEEncodeConfig(Strict):
    """The encode job that runs after training: latents of the whole dataset for stages 2–3 (docs/latents.md)."""

    enabled: bool = True
    splits: list[Literal["train", "val", "test"]] = Field(default_factory=lambda: ["train", "val", "test"])
    # Voxel grids to encode, each with its own latents and normalisation statistics: a downstream curriculum trains
    # on several. Unset: every resolution of training.curriculum plus model.target_resolution (filled in by
    # VAEPretrainConfig, so the resolved config shows the list).
    resolutions: list[int] | None = Field(default=None, min_length=1)
    samples_per_shard: PositiveInt = 256
    # Held-out split used for the reconstruction metrics (occupancy IoU, material L1) and the preview.
    eval_split: Literal["train", "val", "test"] = "val"
    eval_samples: PositiveInt = 8

    @field_validator("resolutions")
    @classmethod
    def _each_resolution(cls, values: list[int] | None) -> list[int] | None:
        if values is None:
            return None
        for res in values:
            check_resolution(res)
        repeated = sorted({r for r in values if values.count(r) > 1})
        if repeated:
            raise ValueError(f"{', '.join(map(str, repeated))} listed more than once")
        return sorted(values)


class VAEPretrainConfig(TrainableStageConfig):
    kind: Literal["vae_pretrain"] | None = None
    stage: ClassVar[StageSpec] = StageSpec(
        name="vae", config_kind="vae_pretrain", inputs={"data": "data"},
        description="SLAT-Interior sparse VAE: trains, evaluates on held-out scenes, encodes latents",
    )
    signature: ClassVar[tuple[str, ...]] = ("model.latent_dim", "loss.reconstruction", "loss.kl_divergence", "encode")

    model: VAEModelConfig = Field(default_factory=VAEModelConfig)
    scheduler: SchedulerConfig = Field(default_factory=lambda: SchedulerConfig(type="cosine_with_restarts"))
    data: DataLoaderConfig = Field(default_factory=DataLoaderConfig)
    loss: VAELossConfig = Field(default_factory=VAELossConfig)
    encode: VAEEncodeConfig = Field(default_factory=VAEEncodeConfig)

    @model_validator(mode="after")
    def _curriculum_spans_model(self) -> VAEPretrainConfig:
        m, phases = self.model, self.training.curriculum
        for i, p in enumerate(phases):
            if p.resolution % m.compression or p.resolution // m.compression < 2:
                raise ValueError(
                    f"training.curriculum.{i}.resolution {p.resolution} must be a multiple of the VAE's "
                    f"{m.compression}× compression with a latent grid of at least 2³"
                )
        if phases:
            if m.base_resolution is not None and phases[0].resolution != m.base_resolution:
                raise ValueError(f"model.base_resolution {m.base_resolution} must equal the first curriculum "
                                 f"phase's resolution {phases[0].resolution} (training starts there)")
            if phases[-1].resolution != m.target_resolution:
                raise ValueError(f"model.target_resolution {m.target_resolution} must equal the last curriculum "
                                 f"phase's resolution {phases[-1].resolution} (the latents describe that grid)")
        elif m.base_resolution is not None and m.base_resolution != m.target_resolution:
            raise ValueError(f"model.base_resolution {m.base_resolution} differs from target_resolution "
                             f"{m.target_resolution} but there is no training.curriculum to grow from one to the other")
        return self

    @model_validator(mode="after")
    def _encode_resolutions(self) -> VAEPretrainConfig:
        m, enc = self.model, self.encode
        if enc.resolutions is None:
            enc.resolutions = sorted({p.resolution for p in self.training.curriculum} | {m.target_resolution})
        for i, res in enumerate(enc.resolutions):
            if res % m.compression or res // m.compression < 2:
                raise ValueError(
                    f"encode.resolutions.{i}: {res} must be a multiple of the VAE's {m.compression}× compression "
                    f"with a latent grid of at least 2³ ({res} / {m.compression} = {res / m.compression:g}); encode "
                    f"at {2 * m.compression} or more"
                )
        return self

    @property
    def first_resolution(self) -> int:
        """The resolution training starts at."""
        phases = self.training.curriculum
        return phases[0].resolution if phases else self.model.target_resolution
