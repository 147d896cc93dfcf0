"""Stage discovery: every stage package registers its Stage class under the `interiorfusion.stages`
entry-point group, so a new stage plugs into the CLI, the flows and `config check` without touching them."""

from __future__ import annotations

from functools import lru_cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from interiorfusion_core.errors import UserError

if TYPE_CHECKING:
    from interiorfusion_core.config.schemas import StageConfig
    from interiorfusion_core.contract import Stage

GROUP = "interiorfusion.stages"
# Canonical pipeline order; stages not listed run after these, alphabetically.
PIPELINE_ORDER = ("data", "vae", "structure", "material", "lora", "grpo", "evaluate")

_extra: dict[str, type[Stage]] = {}
# Stages whose package is installed but failed to import: reported when used, never fatal to the others.
_broken: dict[str, str] = {}


def register_stage(stage_cls: type[Stage]) -> type[Stage]:
    """Register a stage in-process (tests, notebooks); installed packages use entry points instead."""
    _extra[stage_cls.name] = stage_cls
    return stage_cls


@lru_cache(maxsize=1)
def _installed() -> dict[str, type[Stage]]:
    found: dict[str, type[Stage]] = {}
    for ep in entry_points(group=GROUP):
        try:
            found[ep.name] = ep.load()
        except Exception as exc:
            _broken[ep.name] = f"{type(exc).__name__}: {exc}"
    return found


def stages() -> dict[str, type[Stage]]:
    merged = {**_installed(), **_extra}
    order = {name: i for i, name in enumerate(PIPELINE_ORDER)}
    return dict(sorted(merged.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def get_stage(name: str) -> type[Stage]:
    available = stages()
    if name in _broken and name not in available:
        raise UserError(f"stage '{name}' is installed but failed to import ({_broken[name]})")
    if name not in available:
        listed = ", ".join(available) or "none installed"
        raise UserError(f"unknown stage '{name}' (installed stages: {listed})")
    return available[name]


def stage_config_kinds() -> dict[str, type[StageConfig]]:
    return {cls.config_kind: cls.config_model for cls in stages().values() if cls.config_model is not None}
