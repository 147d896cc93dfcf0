"""Config schemas (pydantic v2) and the YAML loader with one-line errors. Pydantic only: nothing here imports torch.

Layers: base (shared blocks, StageSpec) → yamlio (strict YAML) → kinds (entry-point discovery) → pipeline
(instance graphs) / launcher (accelerate) → loader. Stage schemas live in their stage packages.
"""

from interiorfusion_core.config.base import StageConfig, StageSpec, TrainableStageConfig
from interiorfusion_core.config.kinds import config_kinds, register_kind, stage_specs
from interiorfusion_core.config.loader import LoadedConfig, config_digest, detect_kind, load_config

__all__ = [
    "LoadedConfig",
    "StageConfig",
    "StageSpec",
    "TrainableStageConfig",
    "config_digest",
    "config_kinds",
    "detect_kind",
    "load_config",
    "register_kind",
    "stage_specs",
]
