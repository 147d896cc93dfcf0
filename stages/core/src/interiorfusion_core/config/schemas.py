"""Schemas of the seed's five configs (they load exactly as written) and the accelerate launcher config.

Interpretations of the seed, also listed in the README:
- `dit_structure.model.mlp_ratio: 8192` is the MLP *hidden width* (1536 × 5.33), not a ratio: values above
  16 are read as a width, small values as a ratio of `width` (`DiTModelConfig.mlp_hidden`).
- `rl.vggt_model: microsoft/VGGT-1B` names the wrong owner; VGGT is published as `facebook/VGGT-1B`.
  The seed's id is accepted and resolved to the real one (`RLConfig.resolved_vggt_model`).
- The VAE's `edge_preservation` loss is configured but absent from the seed's code; the VAE stage
  implements it (L1 between edge maps of rendered and true depth).
- `flow_matching.sigma_min/sigma_max` are EDM-style names; with rectified flow only `sigma_min` (the
  noise floor at t=1) and the logit-normal timestep law (`p_mean`, `p_std`) are used.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from interiorfusion_core.config.base import (
    RESOLUTIONS,
    DataLoaderConfig,
    LossTerm,
    NonNegativeFloat,
    NonNegativeInt,
    OptimizerConfig,
    PositiveFloat,
    PositiveInt,
    PretrainedRef,
    Probability,
    SchedulerConfig,
    StageConfig,
    Strict,
    TrainableStageConfig,
    TrainingConfig,
    check_resolution,
)


# ---------------------------------------------------------------------------------------------- VAE
class VAEModelConfig(Strict):
    latent_dim: PositiveInt = 64
    base_resolution: int = 256
    target_resolution: int = 1024
    # Channel widths per U-Net level, finest first; 5 levels = 4 downsamplings = 16× compression.
    channels: list[PositiveInt] = Field(default_factory=lambda: [32, 64, 128, 256, 512])
    blocks_per_level: PositiveInt = 2
    sparse_backend: Literal["auto", "torch", "spconv", "minkowski"] = "auto"

    _res = field_validator("base_resolution", "target_resolution")(check_resolution)

    @model_validator(mode="after")
    def _order(self) -> VAEModelConfig:
        if self.target_resolution < self.base_resolution:
            raise ValueError("target_resolution must be >= base_resolution")
        return self


class VAELossConfig(Strict):
    reconstruction: LossTerm = LossTerm(weight=1.0, type="l1")
    kl_divergence: LossTerm = LossTerm(weight=1.0e-3)
    depth_consistency: LossTerm = LossTerm(weight=0.5, type="l1")
    normal_consistency: LossTerm = LossTerm(weight=0.3, type="cosine")
    edge_preservation: LossTerm = LossTerm(weight=0.2, type="l1")
    pruning: LossTerm = LossTerm(weight=1.0, type="bce")
    # The seed sums the KL over everything; "mean" (per latent element) keeps its weight independent of scene
    # size and batch. "sum" sums per sample and averages over the batch (the seed's formula, per sample).
    kl_reduction: Literal["mean", "sum"] = "mean"
    # Views per sample rendered for the depth/normal/edge terms (0 disables them).
    render_views: NonNegativeInt = 2


class VAEEncodeConfig(Strict):
    """The encode job that runs after training: latents of the whole dataset for stages 2–3."""

    enabled: bool = True
    splits: list[str] = Field(default_factory=lambda: ["train", "val", "test"])
    samples_per_shard: PositiveInt = 256
    # Held-out split used for the reconstruction metrics (occupancy IoU, material L1) and the preview.
    eval_split: str = "val"
    eval_samples: PositiveInt = 8


class VAEPretrainConfig(TrainableStageConfig):
    kind: Literal["vae_pretrain"] | None = None
    model: VAEModelConfig = Field(default_factory=VAEModelConfig)
    scheduler: SchedulerConfig = Field(default_factory=lambda: SchedulerConfig(type="cosine_with_restarts"))
    data: DataLoaderConfig = Field(default_factory=DataLoaderConfig)
    loss: VAELossConfig = Field(default_factory=VAELossConfig)
    encode: VAEEncodeConfig = Field(default_factory=VAEEncodeConfig)


# ---------------------------------------------------------------------------------------------- DiTs
class ConditioningConfig(Strict):
    image_encoder: PretrainedRef = PretrainedRef(source="facebook/dinov3-vitl16-pretrain-lvd1689m")
    image_dim: PositiveInt = 1024
    depth_dim: PositiveInt = 256
    layout_dim: PositiveInt = 512
    semantic_encoder: PretrainedRef = PretrainedRef(source="facebook/mask2former-swin-large-ade-semantic")
    semantic_dim: PositiveInt = 256
    image_size: PositiveInt = 512


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
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        return self

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio) if self.mlp_ratio > 16 else round(self.width * self.mlp_ratio)


class FlowMatchingConfig(Strict):
    sigma_min: NonNegativeFloat = 0.001
    sigma_max: PositiveFloat = 80.0
    p_mean: float = -1.2
    p_std: PositiveFloat = 1.2


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
    loss: StructureLossConfig = Field(default_factory=StructureLossConfig)


class MaterialLossConfig(Strict):
    albedo: LossTerm = LossTerm(weight=1.0, type="l1")
    metallic_roughness: LossTerm = LossTerm(weight=0.5, type="l1")
    normal: LossTerm = LossTerm(weight=0.5, type="cosine")
    perceptual: LossTerm = LossTerm(weight=0.3, type="lpips", network="vgg")
    rendering: LossTerm = LossTerm(weight=0.5, type="mse")


class DiTMaterialConfig(DiTStageConfig):
    kind: Literal["dit_material"] | None = None
    loss: MaterialLossConfig = Field(default_factory=MaterialLossConfig)
    lpips_weights: PretrainedRef = PretrainedRef(source="lpips:vgg")


# ---------------------------------------------------------------------------------------------- Fine-tuning
class LoRAConfig(Strict):
    rank: PositiveInt = 32
    alpha: PositiveFloat = 32
    target_modules: list[str] = Field(
        default_factory=lambda: ["attention.qkv", "attention.proj", "mlp.fc1", "mlp.fc2"], min_length=1
    )
    dropout: Probability = 0.0


class FinetuneLoRAConfig(TrainableStageConfig):
    kind: Literal["finetune_lora"] | None = None
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    training: TrainingConfig = Field(default_factory=lambda: TrainingConfig(lr=1.0e-5))
    data: DataLoaderConfig = Field(default_factory=lambda: DataLoaderConfig(dataset="InteriorFusion-Real"))


VGGT_ID_FIXES = {"microsoft/VGGT-1B": "facebook/VGGT-1B"}


class RLRewardWeights(Strict):
    depth_consistency: NonNegativeFloat = 0.25
    point_cloud_consistency: NonNegativeFloat = 0.25
    pose_stability: NonNegativeFloat = 0.25
    edit_quality: NonNegativeFloat = 0.25


class RLConfig(Strict):
    algorithm: Literal["GRPO"] = "GRPO"
    group_size: int = Field(default=8, ge=2)
    reward_weights: RLRewardWeights = Field(default_factory=RLRewardWeights)
    vggt_model: str = "facebook/VGGT-1B"
    vggt_random_init: bool = False
    clip_range: PositiveFloat = 1.0e-4
    sde_noise_level: PositiveFloat = 0.7
    sampling_steps: PositiveInt = 10

    @property
    def resolved_vggt_model(self) -> str:
        return VGGT_ID_FIXES.get(self.vggt_model, self.vggt_model)


class RLTrainingConfig(Strict):
    num_iterations: PositiveInt = 10000
    lr: PositiveFloat = 1.0e-6
    kl_penalty: NonNegativeFloat = 0.01
    batch_size: PositiveInt = 1
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    log_every: PositiveInt = 10
    checkpoint_every: PositiveInt = 500


class RLFinetuneConfig(StageConfig):
    kind: Literal["rl_finetune"] | None = None
    rl: RLConfig = Field(default_factory=RLConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    training: RLTrainingConfig = Field(default_factory=RLTrainingConfig)


# ---------------------------------------------------------------------------------------------- accelerate
class DeepSpeedPluginConfig(Strict):
    """accelerate's `deepspeed_config:` block (not DeepSpeed's own JSON)."""

    zero_stage: Literal[0, 1, 2, 3] = 3
    offload_optimizer_device: Literal["none", "cpu", "nvme"] = "none"
    offload_param_device: Literal["none", "cpu", "nvme"] = "none"
    offload_optimizer_nvme_path: str | None = None
    offload_param_nvme_path: str | None = None
    gradient_accumulation_steps: PositiveInt | Literal["auto"] = 1
    gradient_clipping: NonNegativeFloat | Literal["auto"] = 1.0
    zero3_init_flag: bool = True
    zero3_save_16bit_model: bool = False
    deepspeed_config_file: str | None = None
    deepspeed_multinode_launcher: str | None = None
    deepspeed_hostfile: str | None = None


class AccelerateConfig(StageConfig):
    """The subset of accelerate's launcher config this project uses; unknown keys are refused like accelerate
    itself does. The seed's `deep_speed_config` key is rejected with a pointer to `deepspeed_config`."""

    kind: Literal["accelerate"] | None = None
    compute_environment: Literal["LOCAL_MACHINE", "AMAZON_SAGEMAKER"] = "LOCAL_MACHINE"
    distributed_type: Literal["NO", "MULTI_CPU", "MULTI_GPU", "DEEPSPEED", "FSDP"] = "DEEPSPEED"
    deepspeed_config: DeepSpeedPluginConfig | None = None
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    downcast_bf16: bool | str | None = None
    machine_rank: int = Field(default=0, ge=0)
    num_machines: PositiveInt = 1
    num_processes: PositiveInt = 1
    gpu_ids: str | None = None
    main_process_ip: str | None = None
    main_process_port: int | None = None
    main_training_function: str = "main"
    rdzv_backend: Literal["static", "c10d", "etcd", "etcd-v2"] = "static"
    same_network: bool = True
    use_cpu: bool = False
    debug: bool = False
    enable_cpu_affinity: bool = False
    tpu_env: list[str] = Field(default_factory=list)
    tpu_use_cluster: bool = False
    tpu_use_sudo: bool = False

    @model_validator(mode="after")
    def _deepspeed_block(self) -> AccelerateConfig:
        if self.distributed_type == "DEEPSPEED" and self.deepspeed_config is None:
            raise ValueError("distributed_type DEEPSPEED needs a deepspeed_config block")
        return self


# ---------------------------------------------------------------------------------------------- pipeline
class PipelineStageEntry(Strict):
    """How one stage runs inside a pipeline."""

    config: str
    enabled: bool = True
    executor: Literal["inprocess", "subprocess", "docker", "kubernetes"] = "inprocess"
    # `--set` overrides applied on top of the stage config.
    set: list[str] = Field(default_factory=list)
    # subprocess: processes for `accelerate launch` (1 = plain `python -m`), and its launcher config.
    num_processes: PositiveInt = 1
    accelerate_config: str | None = None
    # docker/kubernetes: the stage image (default interiorfusion/<stage>:latest) and GPUs to request.
    image: str | None = None
    gpus: NonNegativeInt = 0
    # Retries for infrastructure faults (never for user errors such as a bad config).
    retries: NonNegativeInt = 2
    retry_delay_seconds: NonNegativeFloat = 10.0


class PipelineConfig(StageConfig):
    kind: Literal["pipeline"] | None = None
    name: str = Field(default="default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    # Where stage outputs go; default `$INTERIORFUSION_ARTIFACT_ROOT` or the local state dir.
    artifact_root: str | None = None
    experiment: str = "interiorfusion"
    stages: dict[str, PipelineStageEntry]


CONFIG_KINDS: dict[str, type[StageConfig]] = {
    "vae_pretrain": VAEPretrainConfig,
    "dit_structure": DiTStructureConfig,
    "dit_material": DiTMaterialConfig,
    "finetune_lora": FinetuneLoRAConfig,
    "rl_finetune": RLFinetuneConfig,
    "accelerate": AccelerateConfig,
    "pipeline": PipelineConfig,
}

# Keys that tell a config's kind when it has no `kind:` line, checked in order.
_KIND_SIGNATURES: list[tuple[str, tuple[str, ...]]] = [
    ("pipeline", ("stages",)),
    ("accelerate", ("distributed_type",)),
    ("accelerate", ("deepspeed_config",)),
    ("accelerate", ("deep_speed_config",)),
    ("rl_finetune", ("rl",)),
    ("finetune_lora", ("lora",)),
    ("dit_structure", ("flow_matching",)),
    ("dit_structure", ("model", "width")),
    ("dit_material", ("loss", "albedo")),
    ("vae_pretrain", ("model", "latent_dim")),
    ("vae_pretrain", ("loss", "reconstruction")),
]


def detect_kind(raw: dict, extra_kinds: dict[str, type[StageConfig]] | None = None) -> str | None:
    """The config kind named by `kind:` or recognised from the keys a file has."""
    kind = raw.get("kind")
    if isinstance(kind, str):
        return kind
    for name, path in _KIND_SIGNATURES:
        node: object = raw
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            if name == "dit_structure" and isinstance(raw.get("loss"), dict) and "albedo" in raw["loss"]:
                return "dit_material"
            return name
    return None


__all__ = ["CONFIG_KINDS", "RESOLUTIONS", "StageConfig", "detect_kind"]
