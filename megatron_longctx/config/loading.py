"""Dataclass trees from YAML/dicts with strict keys, and dotted ``a.b=value`` overrides.

``from_dict(cls, raw)`` builds a dataclass (recursively through nested dataclasses, lists of
dataclasses and ``X | None``), rejecting unknown keys with the full dotted path and the allowed
names. ``apply_overrides(raw, ["stages.1.lr=5e-6", ...])`` edits the raw dict before building, so a
mistyped override fails the same way a mistyped recipe key does. ``expand_env`` expands ``${ENV}``
in every string once, when a recipe is loaded (``ExperimentConfig.load``); code downstream reads
plain values.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe or override that cannot be built; the message names the key and the fix."""


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _build(tp, value, path: str):
    if value is None:
        return None
    tp = _strip_optional(tp)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(
                f"{path or 'config'}: expected a mapping for {tp.__name__}, "
                f"got {type(value).__name__} {value!r}"
            )
        return from_dict(tp, value, path)
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_build(item, v, f"{path}.{i}") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError as err:
            raise ConfigError(f"{path}: expected a number, got {value!r}") from err
    if tp is int and isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (int, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def check_keys(
    raw: dict,
    allowed,
    path: str = "",
    *,
    noun: str = "config key(s)",
    error: type[ValueError] = ConfigError,
    where: str = "",
    required=(),
) -> None:
    """The one strict-key rule (recipes, mixtures, eval settings): every key of ``raw`` is one of
    ``allowed``, and every ``required`` key is there.

    The error names each offending key by its full dotted path and lists the allowed names, e.g.
    "unknown config key(s) stages.0.bogus; allowed under stages.0: eval, init_from, lr, ...".

    Args:
        raw: the mapping read from YAML (or a dotted override).
        allowed: the names it may hold. path: its dotted path ("" = the top level).
        noun / error / where: the caller's wording, exception type and an optional "where:" prefix.
        required: names it must hold.
    """
    dotted = f"{path}." if path else ""
    head = f"{where}: " if where else ""
    unknown = sorted(set(raw) - set(allowed), key=str)
    if unknown:
        raise error(
            f"{head}unknown {noun} {', '.join(dotted + str(k) for k in unknown)}; "
            f"allowed under {path or 'the top level'}: {', '.join(sorted(allowed))}"
        )
    missing = sorted(set(required) - set(raw))
    if missing:
        raise error(f"{head}missing required {noun} {', '.join(dotted + k for k in missing)}")


def from_dict(cls, raw: dict, path: str = ""):
    """Builds dataclass ``cls`` from ``raw``; unknown keys raise ConfigError (``check_keys``)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    refused = getattr(cls, "NOT_IN_RECIPE", {})  # fields set by the code, not by a recipe
    set_by_code = sorted(set(raw) & set(refused))
    if set_by_code:
        key = set_by_code[0]
        raise ConfigError(f"{path + '.' if path else ''}{key} is not a config key: {refused[key]}")
    check_keys(raw, fields, path)
    kwargs = {
        name: _build(hints[name], raw[name], f"{path}.{name}" if path else name) for name in raw
    }
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{path or cls.__name__}: {err}") from err


_ENV = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def _expand_one(m: re.Match) -> str:
    name = m.group(1) or m.group(3)
    if name in os.environ:
        return os.environ[name]
    return m.group(2) if m.group(2) is not None else m.group(0)  # unset: default, else kept


def expand_env(value):
    """Expands ``$VAR`` / ``${VAR}`` / ``${VAR:-default}`` in every string of a nested structure.

    The one expansion rule of the project: recipes, mixture YAMLs and data prefixes all use it.
    An unset variable without a default is left in place (the data checks then name it).
    """
    if isinstance(value, str):
        return _ENV.sub(_expand_one, value)
    if isinstance(value, list):
        return [expand_env(v) for v in value]
    if isinstance(value, dict):
        return {k: expand_env(v) for k, v in value.items()}
    return value


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Applies ``a.b.c=value`` overrides (value parsed as YAML; list items by index)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like a.b=value")
        dotted, text = item.split("=", 1)
        value = yaml.safe_load(text) if text != "" else ""
        keys = dotted.strip().split(".")
        node: Any = raw
        for i, key in enumerate(keys):
            last = i == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise ConfigError(
                        f"override {dotted}: {'.'.join(keys[:i])} has "
                        f"{len(node)} items, no index {key}"
                    )
                if last:
                    node[int(key)] = value
                else:
                    node = node[int(key)]
            else:
                if last:
                    node[key] = value
                else:
                    if node.get(key) is None:
                        node[key] = {}
                    node = node[key]
    return raw


def to_dict(obj) -> Any:
    """Dataclass tree -> plain dict (for printing, wandb and checkpoints)."""
    if dataclasses.is_dataclass(obj):
        refused = getattr(obj, "NOT_IN_RECIPE", {})
        return {
            f.name: to_dict(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if f.name not in refused
        }
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
