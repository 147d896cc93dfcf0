"""The Material DiT's config (`kind: dit_material`, the seed's configs/dit_material.yaml). Pydantic only; the
backbone, condition encoders and flow law are the structure stage's (interiorfusion_structure.config).

Interpretations of the seed (docs/material.md):
- The seed names five losses and no generative objective. Stage 3 is a rectified flow over the VAE's material
  latents (the seed's convention, t = 1 is data) with the structure stage's flow-matching loss (`loss.flow_matching`,
  our addition, weight 1), and the seed's five terms applied to the one-step estimate x̂1 = x_t + (1 − t)·v,
  decoded by the frozen VAE's material decoder on the sample's true geometry.
- `type:` fields are honoured: albedo and metallic_roughness take `l1` or `mse`, rendering `mse` or `l1`, normal
  `cosine`, perceptual `lpips` with `network` vgg / alex / squeeze.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from interiorfusion_core.config.base import (
    CosineTerm,
    DistanceTerm,
    LossTerm,
    NonNegativeInt,
    PerceptualTerm,
    PositiveInt,
    PretrainedRef,
    SquaredTerm,
    StageSpec,
    Strict,
)
from interiorfusion_structure.config import DiTStageConfig, SamplingConfig


class MaterialLossConfig(Strict):
    # Our addition (the seed names no generative loss): the velocity MSE of the rectified flow.
    flow_matching: LossTerm = LossTerm(weight=1.0)
    albedo: DistanceTerm = DistanceTerm(weight=1.0, type="l1")
    metallic_roughness: DistanceTerm = DistanceTerm(weight=0.5, type="l1")
    normal: CosineTerm = CosineTerm(weight=0.5)
    perceptual: PerceptualTerm = PerceptualTerm(weight=0.3, network="vgg")
    rendering: SquaredTerm = SquaredTerm(weight=0.5, type="mse")


class RenderConfig(Strict):
    """The images the rendering and perceptual losses compare: `views` of each sample's stored views (the
    condition view first), shaded at `image_size` (longest side; larger views are subsampled) from the sample's
    true depth, so a pixel shows the voxel the data's renderer saw."""

    views: PositiveInt = 1
    image_size: PositiveInt = 64


class GeometryConditionConfig(Strict):
    """The geometry latent enters per token. Training sees the data's geometry; generation sees stage 2's, which is
    off by the structure flow's error. Noise augmentation closes part of that gap: each training sample's geometry
    condition gets Gaussian noise of a level drawn from U(0, `train_noise`) in the normalised latent space, and the
    level is itself a token channel; sampling sets the level (`noise`: 0 for true geometry, `generated_noise` for
    stage 2's) and adds no noise."""

    train_noise: float = Field(default=0.5, ge=0, le=5)
    generated_noise: float = Field(default=0.25, ge=0, le=5)


class MaterialSamplingConfig(SamplingConfig):
    """The structure stage's sampler settings for the material flow (occupancy_* are unused)."""

    cfg_scale: float = Field(default=1.0, ge=0, le=50)


class MaterialEvalConfig(Strict):
    """Held-out materials on true geometry (eval.json, MLflow `heldout/*`) against the untrained network, the
    training set's mean material and the VAE's own reconstruction (the ceiling). The first split is also the
    validation split (losses and the material previews logged at each validation)."""

    splits: list[str] = Field(default_factory=lambda: ["val", "test"], min_length=1)
    samples: NonNegativeInt = 8
    # Validation logs this many material previews (albedo, roughness, metallic, normal, shaded) to MLflow.
    log_samples: NonNegativeInt = 2

    # Held-out scenes generated end to end (stage 2's geometry, then materials) and exported as textured .glb.
    end_to_end: NonNegativeInt = 2


class DiTMaterialConfig(DiTStageConfig):
    kind: Literal["dit_material"] | None = None
    stage: ClassVar[StageSpec] = StageSpec(
        name="material", config_kind="dit_material", inputs={"latents": "vae", "structure": "structure"},
        description="Material DiT: PBR materials conditioned on geometry latents",
    )
    signature: ClassVar[tuple[str, ...]] = ("loss.albedo", "loss.metallic_roughness", "loss.perceptual",
                                            "loss.rendering", "lpips_weights")
    loss: MaterialLossConfig = Field(default_factory=MaterialLossConfig)
    render: RenderConfig = Field(default_factory=RenderConfig)
    geometry: GeometryConditionConfig = Field(default_factory=GeometryConditionConfig)
    sampling: MaterialSamplingConfig = Field(default_factory=MaterialSamplingConfig)
    eval: MaterialEvalConfig = Field(default_factory=MaterialEvalConfig)
    # The backbone LPIPS needs: torchvision's ImageNet weights file for `loss.perceptual.network`, a local path or
    # `torchvision` (torch.hub's checkpoint folder under $TORCH_HOME); `random_init` for tests and smoke only.
    lpips_weights: PretrainedRef = PretrainedRef(source="torchvision")
    # Tokens per micro-batch cap (latent cells) on top of training.batch_size samples.
    max_tokens: PositiveInt = 262144
