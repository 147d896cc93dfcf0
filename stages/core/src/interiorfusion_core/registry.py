"""Stage classes: every stage package registers its Stage class under the `interiorfusion.stages` entry-point group,
so a new stage plugs into the CLI, the flows and `config check` without touching them.

What a stage *is* (name, config kind, inputs) is known without importing it: `interiorfusion_core.config.kinds`
reads it from the stage's config schema. This module imports the stage's code itself, for running it.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from interiorfusion_core.config.kinds import broken_stage_note, register_kind, stage_specs
from interiorfusion_core.config.pipeline import PIPELINE_ORDER
from interiorfusion_core.config.yamlio import did_you_mean
from interiorfusion_core.errors import UserError

if TYPE_CHECKING:
    from interiorfusion_core.stage import Stage

GROUP = "interiorfusion.stages"

_extra: dict[str, type[Stage]] = {}
# Stages whose package is installed but failed to import: reported when used, never fatal to the others.
_broken: dict[str, str] = {}


def register_stage(stage_cls: type[Stage]) -> type[Stage]:
    """Register a stage in-process (tests, notebooks); installed packages use entry points instead."""
    _extra[stage_cls.name] = stage_cls
    register_kind(stage_cls.config_kind, stage_cls.config_model, stage_cls.spec())
    return stage_cls


@lru_cache(maxsize=1)
def _installed_names() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def _load(name: str) -> type[Stage] | None:
    ep = _installed_names().get(name)
    if ep is None:
        return None
    try:
        return ep.load()  # type: ignore[attr-defined]
    except Exception as exc:
        _broken[name] = f"{type(exc).__name__}: {exc}"
        return None


def _order(names: list[str]) -> list[str]:
    rank = {name: i for i, name in enumerate(PIPELINE_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def stage_names() -> list[str]:
    """Installed and registered stages, in pipeline order, without importing any of them."""
    return _order(list({*_installed_names(), *_extra}))


def stages() -> dict[str, type[Stage]]:
    """Every stage class (imports them all; stages that fail to import are left out and reported on use)."""
    found = {}
    for name in stage_names():
        cls = _extra.get(name) or _load(name)
        if cls is not None:
            found[name] = cls
    return found


def get_stage(name: str) -> type[Stage]:
    if name in _extra:
        return _extra[name]
    cls = _load(name)
    if cls is not None:
        return cls
    if name in _broken:
        raise UserError(f"stage '{name}' is installed but failed to import ({_broken[name]})")
    available = stage_names()
    spec_note = ""
    if name in stage_specs():
        spec_note = f" (its config schema is installed, but no package registers the '{name}' stage itself yet)"
    listed = ", ".join(available) or "none installed"
    raise UserError(f"unknown stage '{name}'{did_you_mean(name, available)}{spec_note} (installed stages: "
                    f"{listed}){broken_stage_note()}")


__all__ = ["GROUP", "get_stage", "register_stage", "stage_names", "stages"]
