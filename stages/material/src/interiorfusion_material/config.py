"""The Material DiT's config (`kind: dit_material`, the seed's configs/dit_material.yaml). Pydantic only; the
backbone and flow law are the structure stage's (interiorfusion_structure.config)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from interiorfusion_core.config.base import (
    CosineTerm,
    DistanceTerm,
    PerceptualTerm,
    PretrainedRef,
    SquaredTerm,
    StageSpec,
    Strict,
)
from interiorfusion_structure.config import DiTStageConfig


class MaterialLossConfig(Strict):
    albedo: DistanceTerm = DistanceTerm(weight=1.0, type="l1")
    metallic_roughness: DistanceTerm = DistanceTerm(weight=0.5, type="l1")
    normal: CosineTerm = CosineTerm(weight=0.5)
    perceptual: PerceptualTerm = PerceptualTerm(weight=0.3, network="vgg")
    rendering: SquaredTerm = SquaredTerm(weight=0.5, type="mse")


class DiTMaterialConfig(DiTStageConfig):
    kind: Literal["dit_material"] | None = None
    stage: ClassVar[StageSpec] = StageSpec(
        name="material", config_kind="dit_material", inputs={"latents": "vae", "structure": "structure"},
        description="Material DiT: PBR materials conditioned on geometry latents",
    )
    signature: ClassVar[tuple[str, ...]] = ("loss.albedo", "loss.metallic_roughness", "loss.perceptual",
                                            "loss.rendering", "lpips_weights")
    loss: MaterialLossConfig = Field(default_factory=MaterialLossConfig)
    # The VGG16 backbone LPIPS needs (torchvision's weights file); `random_init` for tests and smoke only.
    lpips_weights: PretrainedRef = PretrainedRef(source="lpips:vgg")
