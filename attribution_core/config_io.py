"""Plain mappings (YAML / JSON) to typed, validated config dataclasses and back.

``from_mapping`` converts nested mappings and lists to the annotated dataclass fields and
refuses unknown keys by their dotted path; ``to_mapping`` is its inverse for a process
boundary (Ray, JSON manifests).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from attribution_core.errors import ConfigError

T = TypeVar("T")


def check(condition: bool, field: str, message: str) -> None:
    """Raise ``ConfigError`` naming ``field`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{field}: {message}")


def check_custom_resources(resources: dict[str, Any], field: str) -> None:
    """Custom Ray resources of a placement setting: names other than CPU/GPU/memory, amounts > 0."""
    bad = {k: v for k, v in resources.items()
           if not isinstance(v, (int, float)) or v <= 0 or k in ("CPU", "GPU", "memory")}
    check(not bad, field, f"needs custom resource names with amounts > 0 (CPUs and GPUs have settings of their "
          f"own), got {bad}")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type ``tp``, or raise ConfigError at ``where``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_mapping(tp, value, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, Mapping) and args and typing.get_origin(args[0]) is tuple:
            # An ordered YAML mapping written for a tuple of (name, value) pairs.
            value = list(value.items())
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {_coerce(key_type, k, where): _coerce(value_type, v, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(non_none[0], value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_mapping(cls: type[T], mapping: Mapping[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a plain mapping; unknown keys are refused by name."""
    mapping = dict(mapping or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        moved = [f"{prefix}{k} is now {cls.MOVED[k]}" for k in unknown if k in getattr(cls, "MOVED", {})]
        if moved:
            raise ConfigError(f"{'; '.join(moved)}: rename it in the config file")
        raise ConfigError(
            f"unknown setting(s) {', '.join(prefix + k for k in unknown)}; "
            f"known here: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in mapping.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def to_mapping(obj: Any) -> Any:
    """Plain (YAML/JSON-ready) form of a config dataclass: tuples become lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_mapping(v) for k, v in obj.items()}
    return obj


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping, with a clear error for a missing/bad file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config with a file from configs/")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, got {type(data).__name__}")
    return data
