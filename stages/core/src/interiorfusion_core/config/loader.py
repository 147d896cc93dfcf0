"""Load a YAML config, apply `--set a.b.c=value` overrides, validate, and explain errors in one line."""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from interiorfusion_core.config.schemas import CONFIG_KINDS, StageConfig, detect_kind
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


def known_kinds() -> dict[str, type[StageConfig]]:
    """The seed's kinds plus every kind a registered stage brings."""
    from interiorfusion_core.registry import stage_config_kinds

    return {**CONFIG_KINDS, **stage_config_kinds()}


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise ConfigError(f"{path}: {where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


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
            value = yaml.safe_load(text)
        except yaml.YAMLError:
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


def load_config(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    kind: str | None = None,
) -> LoadedConfig:
    """Validate one config file. Raises ConfigError with `FILE: a.b.c: what is wrong`."""
    path = str(path)
    raw = apply_overrides(read_yaml(path), overrides, path)
    kinds = known_kinds()
    detected = detect_kind(raw)
    if kind is None:
        kind = detected
    elif detected is not None and raw.get("kind") is not None and detected != kind:
        raise ConfigError(f"{path}: kind: this is a '{detected}' config but a '{kind}' config is needed")
    if kind is None:
        raise ConfigError(
            f"{path}: cannot tell which kind of config this is; add `kind: <{'|'.join(sorted(kinds))}>`"
        )
    if kind not in kinds:
        hint = _did_you_mean(kind, kinds)
        raise ConfigError(f"{path}: kind: unknown kind '{kind}'{hint}")
    model_cls = kinds[kind]
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
        what = f"unknown key '{loc[-1]}'{_did_you_mean(loc[-1], candidates)}"
        if loc[-1] == "deep_speed_config":
            what += " (accelerate reads `deepspeed_config`; the seed's `deep_speed_config` is ignored by it)"
    elif first["type"] == "missing":
        what = "required key is missing"
    else:
        msg = first["msg"].removeprefix("Value error, ")
        got = first.get("input")
        shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
        what = f"{msg}{shown}"
    more = f" [and {len(errors) - 1} more error(s)]" if len(errors) > 1 else ""
    return f"{path}: {where}: {what}{more}"


def _fields_at(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the nested model at `loc` (for did-you-mean), best effort."""
    import typing

    current: Any = model_cls
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return []
        annotation = current.model_fields[part].annotation
        current = _first_model(annotation, typing)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _first_model(annotation: Any, typing: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _first_model(arg, typing)
        if found is not None:
            return found
    return None


def _did_you_mean(word: str, candidates: Any) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
