"""Config files in and out: YAML plus ``key=value`` overrides into a stage's typed config.

The dataclasses live in qgate.config; this module turns text into them. Overrides use dotted
keys for nested sections (``scaling.num_workers=4``); every value is coerced to its field's
type, and unknown keys or wrong types fail with the key's name before any work starts.
Relative paths are made absolute so Ray workers and `ray job submit` find them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import types
import typing
from typing import Literal, Union

import yaml

from qgate.config import ConfigError, _check


def _parse_scalar(text: str):
    return yaml.safe_load(text) if text != "" else ""


def _type_name(tp) -> str:
    """A type annotation as a config error names it: ``int or None``, ``one of 'a', 'b'``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is dict:
        return f"a mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    if tp is type(None):
        return "None"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """Check (and lightly coerce: int -> float) one value against a type annotation."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            with contextlib.suppress(ConfigError):
                return _coerce(value, arg, key)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        _check(
            value in typing.get_args(tp),
            key,
            f"must be one of {typing.get_args(tp)}, got {value!r}",
        )
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str | int | float) and item is str:
            value = [value] if isinstance(value, str) else value
        _check(isinstance(value, list), key, f"expected a list, got {type(value).__name__}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        _check(isinstance(value, dict), key, f"expected a mapping, got {type(value).__name__}")
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"expected a mapping, got {type(value).__name__}")
        return build(tp, value, prefix=f"{key}.")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-5 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        _check(ok, key, f"expected a number, got {value!r}")
        return float(value)
    if tp is int or tp is bool:
        ok = isinstance(value, tp) and (tp is bool or not isinstance(value, bool))
        _check(ok, key, f"expected {tp.__name__}, got {value!r}")
        return value
    if tp is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def build(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix and not str(e).startswith(prefix):
            raise ConfigError(f"{prefix}{e}") from None
        raise


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as YAML scalars) to a config dict."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        node[parts[-1]] = _parse_scalar(raw)
    return data


PATH_FIELDS = {
    "run_dir", "base_model", "gates", "corpus", "target", "output", "scores", "storage_path",
    "target_model", "data", "model", "adapter", "test_data", "task_dir", "include_path",
    "reference", "api_key_file",
}  # fmt: skip
ROOT_ENV = "QGATE_ROOT"


def _absolute(value, root: str):
    if isinstance(value, list):
        return [_absolute(v, root) for v in value]
    if not isinstance(value, str) or not value or value == "auto" or "://" in value:
        return value
    return os.path.normpath(os.path.join(root, os.path.expanduser(value)))


def resolve_paths(data: dict) -> dict:
    """Make relative local paths absolute, against $QGATE_ROOT or else the current directory.

    Ray Train workers do not run in the driver's directory, and a `ray job submit` job runs
    in an uploaded copy of the working dir without runs/ or data/: set QGATE_ROOT to the
    directory the paths are relative to (the README shows how).
    """
    root = os.environ.get(ROOT_ENV) or os.getcwd()
    return {k: _absolute(v, root) if k in PATH_FIELDS else v for k, v in data.items()}


def load_config(cls, path: str | None = None, overrides: list[str] | None = None):
    """Read a YAML config (optional) plus overrides into dataclass ``cls``.

    Relative paths are made absolute (see :func:`resolve_paths`).
    """
    data = read_yaml(path) if path else {}
    return build(cls, resolve_paths(apply_overrides(data, overrides or [])))


def read_yaml(path: str) -> dict:
    """A YAML config file's top-level mapping (clear errors for a missing file or a list)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def to_dict(cfg) -> dict:
    """Plain dict of a config (for resolved-config files and manifests)."""
    return dataclasses.asdict(cfg)


def write_config(cfg, out_dir: str, name: str = "config.yaml") -> str:
    """Write the resolved config beside a stage's artifacts; returns its path."""
    from qgate.atomic import write_text

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path
