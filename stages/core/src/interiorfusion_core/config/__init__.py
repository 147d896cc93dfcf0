"""Config schemas (pydantic v2) and the YAML loader with one-line errors."""

from interiorfusion_core.config.loader import LoadedConfig, config_digest, load_config
from interiorfusion_core.config.schemas import CONFIG_KINDS, StageConfig, detect_kind

__all__ = ["CONFIG_KINDS", "LoadedConfig", "StageConfig", "config_digest", "detect_kind", "load_config"]
