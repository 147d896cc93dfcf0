"""The evaluate stage's config (`kind: evaluate`). Pydantic only: validating a pipeline never imports torch.

The stage trains nothing: it generates held-out scenes with a trained structure stage (a LoRA/GRPO output's merged
weights when one is given, the most tuned first), textures them with a material stage when one is given, and scores
the seed's eight validation metrics (interiorfusion_evaluate.metrics) against the ground truth, beside two reference
points: the frozen VAE's reconstruction of the truth (an upper bound) and a trivial baseline (docs/evaluate.md).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from interiorfusion_core.config.base import NonNegativeInt, PositiveInt, PretrainedRef, StageConfig, StageSpec

# Which stored views are rendered for the image metrics: `heldout` = every view but the condition view 0 (view 0
# alone when a sample stores one view); `all` = every stored view, the condition view included.
ViewChoice = Literal["heldout", "all"]


class EvaluateConfig(StageConfig):
    kind: Literal["evaluate"] | None = None
    stage: ClassVar[StageSpec] = StageSpec(
        name="evaluate", config_kind="evaluate", inputs={"structure": "structure"},
        optional_inputs={"material": "material", "lora": "lora", "grpo": "grpo", "data": "data"},
        description="Validation metrics of generated held-out scenes against the seed's targets",
    )
    signature: ClassVar[tuple[str, ...]] = ("fscore_tau", "reference_vae", "baseline")

    # The held-out split (one the structure run's VAE encoded). When it holds no sample, `fallback_split` is used
    # instead and the report says so: a small dataset may leave the test split empty. None: no fallback.
    split: str = "test"
    fallback_split: str | None = "val"
    samples: PositiveInt = 64  # at most this many scenes of the split, in its order
    points: PositiveInt = 10_000  # surface points per side for Chamfer and F-score
    fscore_tau: float = Field(default=0.1, gt=0)  # metres
    views: ViewChoice = "heldout"
    # The LPIPS backbone (interiorfusion_material.perceptual): torchvision's ImageNet weights file, a path or
    # `torchvision` ($TORCH_HOME/hub/checkpoints); `random_init` for tests and smoke only (values not calibrated).
    lpips_weights: PretrainedRef = PretrainedRef(source="torchvision")
    lpips_network: Literal["vgg", "alex", "squeeze"] = "vgg"
    # The trivial baseline: `nearest` = the training scene whose condition image is nearest (the frozen image
    # encoder's mean token, else the downsampled image); `mean` = the training set's most frequently occupied voxels.
    baseline: Literal["nearest", "mean", "none"] = "nearest"
    baseline_samples: NonNegativeInt = 256  # training scenes the baseline draws from (0: all)
    reference_vae: bool = True  # score the frozen VAE's reconstruction of the truth too
    seed: NonNegativeInt = 0  # surface-point sampling
    device: Literal["auto", "cpu", "cuda"] = "auto"
