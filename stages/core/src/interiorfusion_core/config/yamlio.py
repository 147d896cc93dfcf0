"""Reading config YAML strictly: a mapping with a duplicated key is an error naming the file, the key and both
lines (PyYAML's default silently keeps the last one, so a pasted block could override a value unseen)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from interiorfusion_core.errors import ConfigError


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, second: int):
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicated mapping keys (merge keys `<<:` keep their YAML meaning)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                hash(key)
            except TypeError:
                continue  # SafeLoader itself reports unhashable keys
            if key in seen:
                raise _DuplicateKey(key, seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=StrictLoader)
    except _DuplicateKey as dup:
        raise ConfigError(
            f"{where}: line {dup.second}: key '{dup.key}' is given twice (also on line {dup.first}); YAML would "
            "silently keep the last one, so remove one of them"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}" if mark else "?"
        raise ConfigError(f"{where}: {at}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: file not found")
    data = parse_yaml(p.read_text(), str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
