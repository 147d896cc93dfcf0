"""accelerate's launcher config (`kind: accelerate`, the file `accelerate launch --config_file` reads).

The seed's configs/accelerate_deepspeed.yaml writes `deep_speed_config:` with DeepSpeed-JSON keys; accelerate's
key is `deepspeed_config` (its `train_batch_size`/`train_micro_batch_size_per_gpu: auto` are filled by accelerate
itself), so the seed's key is refused with that explanation.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from interiorfusion_core.config.base import NonNegativeFloat, PositiveInt, StageConfig, Strict


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
    signature: ClassVar[tuple[str, ...]] = ("distributed_type", "deepspeed_config", "deep_speed_config")
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
    main_process_port: int | None = Field(default=None, ge=1, le=65535)
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
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"machine_rank {self.machine_rank} must be below num_machines {self.num_machines} "
                             "(ranks count from 0)")
        if self.num_processes < self.num_machines:
            raise ValueError(f"num_processes {self.num_processes} (all machines together) is fewer than "
                             f"num_machines {self.num_machines}")
        return self
