"""The fine-tuning stages' configs: LoRA (`kind: finetune_lora`, the seed's configs/finetune_lora.yaml) and GRPO
(`kind: rl_finetune`, configs/rl_finetune.yaml). Pydantic only.

Interpretations of the seed:
- `training.lr` (both files) replaces `optimizer.lr`.
- `rl.vggt_model: microsoft/VGGT-1B` names the wrong owner; VGGT is published by Meta as `facebook/VGGT-1B`.
  The seed's id is accepted and resolved to the real one (`RLConfig.resolved_vggt_model`).
- `training.num_iterations` (GRPO) is the number of policy updates: the engine's `max_steps`.
- `training.kl_penalty` is the weight of the KL to the frozen reference policy.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from interiorfusion_core.config.base import (
    DataLoaderConfig,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    StageSpec,
    Strict,
    TrainableStageConfig,
    TrainingConfig,
)


class LoRAConfig(Strict):
    rank: PositiveInt = 32
    alpha: PositiveFloat = 32
    # Module-name suffixes (peft's matching: a module named `….attention.qkv` matches `attention.qkv`). The DiT's
    # self-attention and MLP only: the cross-attention's `cross_attention.q|kv|proj` do not match.
    target_modules: list[str] = Field(
        default_factory=lambda: ["attention.qkv", "attention.proj", "mlp.fc1", "mlp.fc2"], min_length=1
    )
    # A dropout probability of 1 would zero every adapter input.
    dropout: float = Field(default=0.0, ge=0, lt=1)
    # Which DiTs get adapters: stage 2's (both its flows: occupancy and latent) and stage 3's. `material` needs the
    # stage's optional `material` input; without it only the structure DiT is tuned (and the log says so).
    models: list[Literal["structure", "material"]] = Field(
        default_factory=lambda: ["structure", "material"], min_length=1)
    # Also write the adapters merged into full weights (what `interiorfusion generate` loads from this output).
    merge: bool = True

    @model_validator(mode="after")
    def _unique(self) -> LoRAConfig:
        if len(set(self.models)) != len(self.models) or len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError("lora.models and lora.target_modules must not repeat an entry")
        return self


class LoRAEvalConfig(Strict):
    """Held-out flow loss of the real scans after tuning, against the same network with its adapters disabled (the
    base model) on the same samples and noise."""

    splits: list[str] = Field(default_factory=lambda: ["val", "test"], min_length=1)
    samples: NonNegativeInt = 16
    # Noise and timestep draws per sample (the flow loss of one draw is noisy: its mean over a few is the number).
    draws: PositiveInt = 4


class MixedDataConfig(DataLoaderConfig):
    # Mixing weight when several datasets feed one stage (the seed's fine-tuning config): each batch comes from
    # this dataset with probability weight / (weight + replay.weight).
    weight: NonNegativeFloat = 1.0


class ReplayConfig(Strict):
    """The base run's own training rooms (its synthetic latents) mixed into the LoRA batches by weight, against
    forgetting what the base knew; 0 (the default, the seed's setting) trains on the real scans alone."""

    weight: NonNegativeFloat = 0.0


class FinetuneLoRAConfig(TrainableStageConfig):
    kind: Literal["finetune_lora"] | None = None
    stage: ClassVar[StageSpec] = StageSpec(
        name="lora", config_kind="finetune_lora", inputs={"structure": "structure", "data": "data"},
        optional_inputs={"material": "material"},
        description="LoRA fine-tuning of the DiTs on real scans",
    )
    signature: ClassVar[tuple[str, ...]] = ("lora",)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    training: TrainingConfig = Field(default_factory=lambda: TrainingConfig(lr=1.0e-5))
    data: MixedDataConfig = Field(default_factory=lambda: MixedDataConfig(dataset="InteriorFusion-Real"))
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    eval: LoRAEvalConfig = Field(default_factory=LoRAEvalConfig)

    @model_validator(mode="after")
    def _some_data(self) -> FinetuneLoRAConfig:
        if self.data.weight + self.replay.weight <= 0:
            raise ValueError("data.weight and replay.weight are both 0: no batch could be drawn")
        return self


VGGT_ID_FIXES = {"microsoft/VGGT-1B": "facebook/VGGT-1B"}


class RLRewardWeights(Strict):
    depth_consistency: NonNegativeFloat = 0.25
    point_cloud_consistency: NonNegativeFloat = 0.25
    pose_stability: NonNegativeFloat = 0.25
    edit_quality: NonNegativeFloat = 0.25

    @model_validator(mode="after")
    def _some(self) -> RLRewardWeights:
        if not any(self.model_dump().values()):
            raise ValueError("at least one reward weight must be positive (an all-zero reward gives zero advantages)")
        return self


class RLRewardParams(Strict):
    """How the geometric rewards (interiorfusion_finetune.rewards, docs/finetune-rewards.md) measure: each error
    becomes a reward exp(-error / scale) in [0, 1], so a scale is the error that scores 1/e ≈ 0.37."""

    # Rewards render and compare at this longer image side (the condition depth is resampled to it, nearest):
    # the cost of the render and of the point clouds grows with its square.
    render_size: PositiveInt = 128
    depth_scale_m: PositiveFloat = 0.1  # mean |depth error| over pixels valid in both
    # Weight of pixels where only the generated scene has depth (the condition has none) in the coverage term;
    # scans have sensor holes where a correct scene does have a surface: lower it for them.
    depth_render_only_weight: Probability = 1.0
    chamfer_scale_m: PositiveFloat = 0.1  # symmetric Chamfer (mean of both directions' mean distances)
    max_points: PositiveInt = 8192  # per point cloud, an even subset beyond that (Chamfer, ICP)
    pose_rotation_scale_deg: PositiveFloat = 5.0
    pose_translation_scale_m: PositiveFloat = 0.1
    icp_iterations: PositiveInt = 30  # the geometric pose estimator's point-to-plane ICP
    # ICP pairs farther apart than this are outliers (a part of the room one view has and the other lacks).
    icp_max_pair_m: PositiveFloat = 0.5
    # Grows the edited region on every side (a generated edit may spill a little beyond the object's boxes).
    edit_margin_m: NonNegativeFloat = 0.0


class RLConfig(Strict):
    algorithm: Literal["GRPO"] = "GRPO"
    group_size: int = Field(default=8, ge=2)  # advantages are normalised within a group: 1 sample has none
    reward_weights: RLRewardWeights = Field(default_factory=RLRewardWeights)
    reward_params: RLRewardParams = Field(default_factory=RLRewardParams)
    # pose_stability's estimator: "geometric" (ICP of the rendered depth onto the condition depth, CPU only) or
    # "vggt" (the `vggt` package and the rl.vggt_model weights). Whether vggt can be loaded is checked when the
    # reward model is built, not here: a config is validated on machines that will not train it.
    pose_estimator: Literal["geometric", "vggt"] = "geometric"
    vggt_model: str = "facebook/VGGT-1B"
    vggt_random_init: bool = False  # tests only: VGGT with random weights (its poses mean nothing)
    # PPO's ratio clip: the ratio is kept within [1 − clip_range, 1 + clip_range].
    clip_range: float = Field(default=1.0e-4, gt=0, lt=1)
    # Flow-GRPO's SDE noise level a in σ_t = a·sqrt(...); 0 would be the deterministic ODE (no log-probability).
    sde_noise_level: float = Field(default=0.7, gt=0, le=2)
    sampling_steps: int = Field(default=10, ge=2)
    # Only the first this many sampling steps are random, the rest the ODE's (Flow-GRPO-Fast's SDE window): the
    # policy gradient then sees fewer random dimensions per rollout, each with more effect on the scene. None: all.
    sde_window: PositiveInt | None = None
    advantage_std: Literal["group", "batch"] = "group"
    # What the policy gradient trains: LoRA adapters on the policy flows (the default; the reference policy is the
    # same network with them disabled) or the whole network ("full": a frozen copy is the reference; refused under
    # DeepSpeed ZeRO-3, where full-model GRPO is known to hang).
    policy: Literal["lora", "full"] = "lora"
    # Which of the Structure DiT's flows are the policy: sampled by the SDE, their steps in the loss, their blocks
    # adapted. The occupancy decides where the cells are, and with them most of the geometric rewards; a flow left
    # out is sampled by its ODE (part of the environment).
    policy_flows: list[Literal["occupancy", "latent"]] = Field(default_factory=lambda: ["occupancy", "latent"],
                                                               min_length=1)
    # Share of each rollout's SDE steps whose log-probability enters the loss (Flow-GRPO's timestep_fraction):
    # each step is one more forward pass with its activations kept for the single backward.
    timestep_fraction: float = Field(default=1.0, gt=0, le=1)
    # Rank 0 logs a render of the iteration's best rollout every this many iterations (0: never).
    log_renders_every: NonNegativeInt = 10
    # Every this many iterations the conditions are edit pairs' `after` views and edit_quality joins the reward
    # (0: never). The pairs come from the `data` input, else from the conditions' own dataset; either must have
    # been written with the data stage's `edits:`.
    edit_every: NonNegativeInt = 0

    @model_validator(mode="after")
    def _vggt_options(self) -> RLConfig:
        # Random VGGT weights only make sense where VGGT is used; elsewhere the flag is a mistake, not a no-op.
        if self.vggt_random_init and self.pose_estimator != "vggt":
            raise ValueError("rl.vggt_random_init is true but rl.pose_estimator is not vggt; drop it or set "
                             "rl.pose_estimator: vggt")
        if self.sde_window is not None and self.sde_window > self.sampling_steps:
            raise ValueError(f"rl.sde_window {self.sde_window} is more than rl.sampling_steps {self.sampling_steps}")
        if len(set(self.policy_flows)) != len(self.policy_flows):
            raise ValueError(f"rl.policy_flows {self.policy_flows} names a flow twice")
        if self.edit_every and self.reward_weights.edit_quality == 0:
            raise ValueError("rl.edit_every is set but rl.reward_weights.edit_quality is 0: the edit iterations "
                             "would score nothing new; give it a weight or set rl.edit_every: 0")
        return self

    @property
    def resolved_vggt_model(self) -> str:
        return VGGT_ID_FIXES.get(self.vggt_model, self.vggt_model)


class RLTrainingConfig(TrainingConfig):
    """The seed's RL `training:` block on top of the engine's: `num_iterations` is `max_steps`."""

    num_iterations: PositiveInt | None = None
    kl_penalty: NonNegativeFloat = 0.01

    @model_validator(mode="before")
    @classmethod
    def _iterations_are_steps(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("num_iterations") is not None:
            if data.get("max_steps") is not None and data["max_steps"] != data["num_iterations"]:
                raise ValueError("training.num_iterations and training.max_steps disagree; set one of them")
            data = {**data, "max_steps": data["num_iterations"]}
        return data


class RLEvalConfig(Strict):
    """After training: held-out conditions generated by the ODE (deterministic) with the tuned policy and with the
    base (adapters disabled), each scored by the same rewards; and the same for the first `train_samples`
    training prompts, the ones GRPO optimised (whether the reward rose, without the rollouts' sampling noise)."""

    splits: list[str] = Field(default_factory=lambda: ["val", "test"], min_length=1)
    samples: NonNegativeInt = 8
    train_samples: NonNegativeInt = 8


class RLFinetuneConfig(TrainableStageConfig):
    kind: Literal["rl_finetune"] | None = None
    stage: ClassVar[StageSpec] = StageSpec(
        # The prompts: the LoRA run's real scans when `lora` is wired (and its merged weights are the start),
        # else the structure run's own training rooms.
        name="grpo", config_kind="rl_finetune", inputs={"structure": "structure"},
        # `data`: the dataset whose edit pairs the edit iterations use (rl.edit_every; default: the conditions').
        optional_inputs={"lora": "lora", "data": "data"},
        description="GRPO reinforcement fine-tuning with geometric rewards",
    )
    signature: ClassVar[tuple[str, ...]] = ("rl",)
    rl: RLConfig = Field(default_factory=RLConfig)
    # The policy's adapters (rl.policy: lora), on the blocks of rl.policy_flows only.
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    # `training.batch_size` is the conditions per rank per iteration; each is sampled rl.group_size times.
    training: RLTrainingConfig = Field(
        default_factory=lambda: RLTrainingConfig(num_iterations=10000, lr=1.0e-6)
    )
    eval: RLEvalConfig = Field(default_factory=RLEvalConfig)


__all__ = ["FinetuneLoRAConfig", "LoRAConfig", "LoRAEvalConfig", "RLConfig", "RLEvalConfig", "RLFinetuneConfig",
           "RLRewardParams", "RLTrainingConfig",
           "ReplayConfig"]
