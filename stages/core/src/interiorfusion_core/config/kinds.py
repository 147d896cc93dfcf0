"""Which config kinds exist: every kind a package registers under the `interiorfusion.configs` entry-point group
(name = kind, value = `module:ConfigClass` in a pydantic-only module); core registers its own two (pipeline,
accelerate) the same way.

Loading a kind imports only its schema module, never torch or a stage's model code. A package whose schema fails
to import is remembered with its real error and reported when that kind is asked for (never as "unknown kind").
"""

from __future__ import annotations

from functools import lru_cache
from importlib.metadata import entry_points

from interiorfusion_core.config.base import StageConfig, StageSpec
from interiorfusion_core.config.yamlio import did_you_mean
from interiorfusion_core.errors import ConfigError

GROUP = "interiorfusion.configs"

# Registered in-process (tests, notebooks); installed packages use entry points.
_extra: dict[str, type[StageConfig]] = {}
_extra_specs: dict[str, StageSpec] = {}


@lru_cache(maxsize=1)
def _installed() -> tuple[dict[str, type[StageConfig]], dict[str, str]]:
    found: dict[str, type[StageConfig]] = {}
    broken: dict[str, str] = {}
    for ep in entry_points(group=GROUP):
        try:
            cls = ep.load()
        except Exception as exc:
            broken[ep.name] = f"{ep.value} failed to import ({type(exc).__name__}: {exc})"
            continue
        if not (isinstance(cls, type) and issubclass(cls, StageConfig)):
            broken[ep.name] = f"{ep.value} is not a StageConfig subclass"
            continue
        spec = cls.stage
        if spec is not None and spec.config_kind != ep.name:
            broken[ep.name] = f"{ep.value} declares config kind '{spec.config_kind}', not '{ep.name}'"
            continue
        found[ep.name] = cls
    return found, broken


def register_kind(kind: str, cls: type[StageConfig], spec: StageSpec | None = None) -> None:
    """Register a config kind in-process (and the stage it runs, when its class declares none)."""
    _extra[kind] = cls
    if spec is not None:
        _extra_specs[spec.name] = spec


def config_kinds() -> dict[str, type[StageConfig]]:
    return {**_installed()[0], **_extra}


def broken_kinds() -> dict[str, str]:
    """Kinds whose package is installed but whose schema could not be loaded: kind → the real error."""
    return {k: v for k, v in _installed()[1].items() if k not in _extra}


def config_class(kind: str, where: str = "") -> type[StageConfig]:
    kinds = config_kinds()
    if kind in kinds:
        return kinds[kind]
    prefix = f"{where}: " if where else ""
    broken = broken_kinds()
    if kind in broken:
        raise ConfigError(f"{prefix}kind: config kind '{kind}' is installed but its schema {broken[kind]}")
    raise ConfigError(f"{prefix}kind: unknown kind '{kind}'{did_you_mean(kind, kinds)} "
                      f"(known: {', '.join(sorted(kinds))})")


def stage_specs() -> dict[str, StageSpec]:
    """Stage name → its spec, from every stage config kind (no stage code imported)."""
    specs: dict[str, StageSpec] = {}
    for cls in config_kinds().values():
        if cls.stage is not None:
            specs[cls.stage.name] = cls.stage
    return {**specs, **_extra_specs}


def broken_stage_note() -> str:
    """A suffix naming kinds that failed to load, for errors about a stage that may have been among them."""
    broken = broken_kinds()
    if not broken:
        return ""
    return "; note: " + "; ".join(f"config kind '{k}': {v}" for k, v in sorted(broken.items()))


__all__ = ["GROUP", "broken_kinds", "config_class", "config_kinds", "register_kind", "stage_specs"]
