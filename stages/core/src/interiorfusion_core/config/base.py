"""Building blocks shared by every stage config: strict models, the training/optimiser sections, loss terms, the
stage spec. Pydantic only: validating a config must never import torch or a stage's model code."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

RESOLUTIONS = (32, 64, 128, 256, 512, 1024)


class Strict(BaseModel):
    """Unknown keys are errors: a typo must never silently become a default."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, le=1)]


# Adam's betas and EMA decays: 1.0 would never forget (Adam divides by 1 - beta**t = 0).
Decay = Annotated[float, Field(ge=0, lt=1)]


def check_resolution(value: int) -> int:
    if value not in RESOLUTIONS:
        raise ValueError(
            f"resolution must be a power of two from {RESOLUTIONS[0]} to {RESOLUTIONS[-1]} (voxel grids halve "
            f"level by level), got {value}"
        )
    return value


class OptimizerConfig(Strict):
    type: Literal["AdamW"] = "AdamW"
    lr: PositiveFloat = 1.0e-4
    weight_decay: NonNegativeFloat = 0.01
    betas: tuple[Decay, Decay] = (0.9, 0.999)
    eps: PositiveFloat = 1.0e-8


class SchedulerConfig(Strict):
    type: Literal["cosine_with_restarts", "linear_warmup_cosine", "constant_with_warmup"] = "linear_warmup_cosine"
    warmup_steps: NonNegativeInt = 0
    # cosine_with_restarts: number of hard restarts over a curriculum phase (transformers' num_cycles).
    num_cycles: PositiveInt = 1
    # Floor of the cosine, as a fraction of the phase's peak lr.
    min_lr_ratio: Probability = 0.0
    # Linear re-warmup at the start of every curriculum phase after the first (the first phase uses
    # warmup_steps). 0 = a later phase starts straight at its peak lr.
    phase_warmup_steps: NonNegativeInt = 0


class CurriculumPhase(Strict):
    resolution: int
    steps: PositiveInt
    lr: PositiveFloat

    _resolution = field_validator("resolution")(check_resolution)


class EMAConfig(Strict):
    decay: Decay = 0.9999
    start_step: NonNegativeInt = 0


class LRScalingConfig(Strict):
    """Grendel-GS batch scaling (opt-in), with k = global batch / reference_batch:
    lr × sqrt(k), Adam β → β**k, and (scale_eps) eps / sqrt(k). See docs/engine.md."""

    enabled: bool = False
    # The batch the base lr/betas were tuned for; scaling uses batch / reference_batch.
    reference_batch: PositiveInt = 1
    # Grendel-GS's code also divides Adam eps by sqrt(batch); the seed's formula does not.
    scale_eps: bool = True


class TrainingConfig(Strict):
    """The seed's `training:` section plus the engine's own knobs (all defaulted)."""

    # The seed's fine-tuning configs put the learning rate here; when set it replaces `optimizer.lr`.
    lr: PositiveFloat | None = None
    batch_size: PositiveInt = 1
    num_gpus: PositiveInt = 1
    effective_batch_size: PositiveInt | None = None
    max_steps: PositiveInt = 1000
    gradient_accumulation: PositiveInt = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    curriculum: list[CurriculumPhase] = Field(default_factory=list)
    seed: NonNegativeInt = 0
    grad_clip: NonNegativeFloat = 1.0
    log_every: PositiveInt = 10
    val_every: PositiveInt = 1000
    val_batches: PositiveInt = 4
    checkpoint_every: PositiveInt = 1000
    keep_last_checkpoints: PositiveInt = 3
    ema: EMAConfig | None = None
    nonfinite_policy: Literal["skip", "rollback", "abort"] = "skip"
    max_nonfinite_skips: PositiveInt = 100
    lr_scaling: LRScalingConfig = Field(default_factory=LRScalingConfig)
    activation_checkpointing: bool = False
    # Intra-op threads per process on CPU (None: OMP_NUM_THREADS, else cores / processes on this machine).
    cpu_threads: PositiveInt | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TrainingConfig:
        implied = self.batch_size * self.num_gpus * self.gradient_accumulation
        if self.effective_batch_size is not None and self.effective_batch_size != implied:
            raise ValueError(
                f"effective_batch_size {self.effective_batch_size} != batch_size × num_gpus × "
                f"gradient_accumulation = {implied}"
            )
        if self.curriculum:
            total = sum(p.steps for p in self.curriculum)
            if total != self.max_steps:
                raise ValueError(f"curriculum steps add up to {total} but max_steps is {self.max_steps}")
        return self

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_gpus * self.gradient_accumulation


class DataLoaderConfig(Strict):
    """Where a stage reads its samples from; the shards themselves come in as `--input data=URI`."""

    # The dataset this stage trains on: it must be the one its data input holds (the contract checks it).
    dataset: str = "InteriorFusion-Train"
    num_workers: NonNegativeInt = 2
    pin_memory: bool = False
    # Fraction of corrupt samples tolerated before the stage fails.
    max_corrupt_fraction: Probability = 0.01
    # Samples each worker fetches ahead (ranged reads on a few threads) while it decodes: hides a remote object
    # store's per-request latency. 0 (fetch, then decode) is the default: against a local S3 server on 2 cores
    # the extra threads only compete with the decoding (bench/data_pipeline.py: S3 at 0.89-0.91x local with 4,
    # 0.95-0.98x without).
    read_ahead: NonNegativeInt = 0


# ---------------------------------------------------------------------------------------------- loss terms
# Each term's `type:` lists exactly what the stage's code implements, so every accepted value changes behaviour
# and anything else is refused at load.
class LossTerm(Strict):
    """A weighted term with no variants (KL, flow matching, ...)."""

    weight: NonNegativeFloat = 1.0


class DistanceTerm(LossTerm):
    """A per-element distance: mean absolute (l1) or mean squared (mse) error."""

    type: Literal["l1", "mse"] = "l1"


class SquaredTerm(DistanceTerm):
    type: Literal["l1", "mse"] = "mse"


class CosineTerm(LossTerm):
    """1 − cosine similarity of unit vectors (normals)."""

    type: Literal["cosine"] = "cosine"


class BCETerm(LossTerm):
    type: Literal["bce"] = "bce"


class CrossEntropyTerm(LossTerm):
    """Cross-entropy of per-element class logits (semantic classes)."""

    type: Literal["cross_entropy"] = "cross_entropy"


class PerceptualTerm(LossTerm):
    """LPIPS (the `lpips` package) with the named backbone."""

    type: Literal["lpips"] = "lpips"
    network: Literal["vgg", "alex", "squeeze"] = "vgg"


class PretrainedRef(Strict):
    """A frozen network: local path or hub id. `random_init` is for tests and smoke configs only."""

    source: str
    random_init: bool = False


@dataclass(frozen=True)
class StageSpec:
    """What the platform knows about a stage without importing it: its name, config kind and inputs (input name →
    the stage that must have produced it). Declared on the stage's config class, so pipelines are validated as
    graphs without torch; the stage class (`interiorfusion.stages` entry point) takes its attributes from it."""

    name: str
    config_kind: str
    inputs: Mapping[str, str] = field(default_factory=dict)
    optional_inputs: Mapping[str, str] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", MappingProxyType(dict(self.inputs)))
        object.__setattr__(self, "optional_inputs", MappingProxyType(dict(self.optional_inputs)))

    @property
    def all_inputs(self) -> dict[str, str]:
        return {**self.inputs, **self.optional_inputs}


class StageConfig(Strict):
    """Base of every config kind. `kind` is optional in files: it is detected from `signature` keys."""

    kind: str | None = None
    # The stage this config kind runs (None: a config that is not a stage's, e.g. pipeline, accelerate).
    stage: ClassVar[StageSpec | None] = None
    # Dotted key paths that mark a file without `kind:` as probably this kind (e.g. "loss.albedo").
    signature: ClassVar[tuple[str, ...]] = ()


class TrainableStageConfig(StageConfig):
    """What the training engine reads: every config of a stage that trains derives from this, so a missing
    section is a load-time error of the stage's schema, never an AttributeError mid-run."""

    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)

    @property
    def base_lr(self) -> float:
        """`training.lr` where a config keeps it there (the seed's fine-tuning configs), else `optimizer.lr`."""
        return float(self.training.lr if self.training.lr is not None else self.optimizer.lr)
