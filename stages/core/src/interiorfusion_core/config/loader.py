"""Load a YAML config, apply `--set a.b.c=value` overrides, validate, and explain errors in one line."""

from __future__ import annotations

import hashlib
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from interiorfusion_core.config.base import StageConfig
from interiorfusion_core.config.kinds import broken_kinds, config_class, config_kinds
from interiorfusion_core.config.yamlio import did_you_mean, parse_yaml, read_yaml
from interiorfusion_core.errors import ConfigError


@dataclass(frozen=True)
class LoadedConfig:
    kind: str
    model: StageConfig
    path: str

    @property
    def resolved(self) -> dict[str, Any]:
        """The config with every default filled in, as plain JSON types."""
        data = self.model.model_dump(mode="json")
        data["kind"] = self.kind
        return data

    @property
    def digest(self) -> str:
        return config_digest(self.resolved)


def config_digest(resolved: dict[str, Any]) -> str:
    canonical = json.dumps(resolved, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...], path: str) -> dict[str, Any]:
    """`a.b.c=value` with value parsed as YAML; list items by index (`training.curriculum.0.lr=1e-5`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{path}: --set {item}: expected KEY=VALUE, e.g. training.max_steps=100")
        dotted, _, text = item.partition("=")
        keys = dotted.strip().split(".")
        if not all(keys):
            raise ConfigError(f"{path}: --set {item}: empty key segment")
        try:
            value = parse_yaml(text, f"{path}: --set {dotted}")
        except ConfigError:
            value = text
        node: Any = raw
        for depth, key in enumerate(keys[:-1]):
            node = _child(node, key, keys[: depth + 1], path)
        _assign(node, keys[-1], value, keys, path)
    return raw


def _child(node: Any, key: str, at: list[str], path: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, key, at, path)]
    if not isinstance(node, dict):
        raise ConfigError(f"{path}: {'.'.join(at)}: cannot set a key inside a {type(node).__name__}")
    return node.setdefault(key, {})


def _assign(node: Any, key: str, value: Any, at: list[str], path: str) -> None:
    if isinstance(node, list):
        node[_index(node, key, at, path)] = value
    elif isinstance(node, dict):
        node[key] = value
    else:
        raise ConfigError(f"{path}: {'.'.join(at)}: cannot set a key inside a {type(node).__name__}")


def _index(node: list, key: str, at: list[str], path: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(f"{path}: {'.'.join(at)}: list index out of range (the list has {len(node)} items)")
    return int(key)


def _has(raw: dict[str, Any], dotted: str) -> bool:
    node: Any = raw
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def detect_kind(raw: dict[str, Any], path: str = "config") -> str:
    """The kind named by `kind:`, else the one kind whose signature keys the file has and whose schema accepts it
    (several accept it: the one matching most signature keys; none accepts it: the one with the fewest errors,
    so the user sees the error of the kind they meant)."""
    kind = raw.get("kind")
    if isinstance(kind, str):
        return kind
    kinds = config_kinds()
    scored = {k: sum(_has(raw, s) for s in cls.signature) for k, cls in kinds.items()}
    candidates = [k for k, n in scored.items() if n > 0]
    if not candidates:
        broken = broken_kinds()
        note = f"; note: {', '.join(sorted(broken))} could not be loaded" if broken else ""
        raise ConfigError(
            f"{path}: cannot tell which kind of config this is; add `kind: <{'|'.join(sorted(kinds))}>`{note}"
        )
    errors: dict[str, int] = {}
    for k in candidates:
        try:
            kinds[k].model_validate(raw)
            errors[k] = 0
        except ValidationError as exc:
            errors[k] = len(exc.errors())
    return min(candidates, key=lambda k: (errors[k], -scored[k], k))


def load_config(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    kind: str | None = None,
) -> LoadedConfig:
    """Validate one config file. Raises ConfigError with `FILE: a.b.c: what is wrong`."""
    path = str(path)
    raw = apply_overrides(read_yaml(path), overrides, path)
    named = raw.get("kind")
    if kind is not None and isinstance(named, str) and named != kind:
        raise ConfigError(f"{path}: kind: this is a '{named}' config but a '{kind}' config is needed")
    kind = kind or detect_kind(raw, path)
    model_cls = config_class(kind, path)
    try:
        model = model_cls.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(explain(exc, model_cls, path)) from None
    return LoadedConfig(kind=kind, model=model, path=path)


def explain(exc: ValidationError, model_cls: type[BaseModel], path: str) -> str:
    """Turn pydantic's error list into the one line a user needs (the first error, and a count)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = [str(p) for p in first["loc"]]
    where = ".".join(loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        candidates = _fields_at(model_cls, first["loc"][:-1])
        what = f"unknown key '{loc[-1]}'{did_you_mean(loc[-1], candidates)}"
        if loc[-1] == "deep_speed_config":
            what += " (accelerate reads `deepspeed_config`; the seed's `deep_speed_config` is ignored by it)"
    elif first["type"] == "missing":
        what = "required key is missing"
    else:
        msg = first["msg"].removeprefix("Value error, ")
        got = first.get("input")
        shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
        what = f"{msg}{shown}"
        # A check on the whole file names its own keys: no "(top level)" prefix.
        if first["type"] == "value_error" and not loc:
            where = ""
    more = f" [and {len(errors) - 1} more error(s)]" if len(errors) > 1 else ""
    return f"{path}: {where + ': ' if where else ''}{what}{more}"


def _fields_at(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the nested model at `loc` (for did-you-mean), best effort."""
    current: Any = model_cls
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return []
        current = _first_model(current.model_fields[part].annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _first_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _first_model(arg)
        if found is not None:
            return found
    return None


__all__ = ["LoadedConfig", "apply_overrides", "config_digest", "detect_kind", "explain", "load_config"]
