"""Frozen dataclass configs whose defaults are the paper's values, and their TOML overrides: the
machinery every config uses (ModelConfig: model/config.py, DataConfig: data/config.py, TrainConfig:
train/config.py).

Every config in splitnet is a frozen dataclass. `from_dict` builds one from a plain mapping (a TOML
table, a `--set key=value` list) and rejects unknown keys and wrong types with a message that names
the key, so a typo in an experiment file is an error, never a silently ignored setting.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Mapping


class ConfigError(ValueError):
    """A bad configuration value; the message names the offending key."""


def _choice(cfg, key, options):
    value = getattr(cfg, key)
    if value not in options:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, options))}")


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Coerce `value` to the field type `tp` where that is lossless; otherwise raise naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # TOML reads nan and inf: no setting means either
                raise ConfigError(f"{key}: must be a finite number, got {value}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
    elif origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ConfigError:
                pass
    else:
        return value
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {type(value).__name__} {value!r}")


def from_dict(cls, data: Mapping[str, Any], prefix: str = ""):
    """Build dataclass `cls` from `data`; unknown keys and wrong types raise ConfigError naming the key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or cls.__name__}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{full}: unknown key (known: {', '.join(sorted(names))})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, prefix=f"{full}.")
        else:
            kwargs[key] = _check_type(full, value, tp)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None


def replace(cfg, **changes):
    """dataclasses.replace with the same key checking as from_dict."""
    merged = to_dict(cfg)  # nested configs (TrainConfig's model, data, optim) as tables
    merged.update({k: to_dict(v) if dataclasses.is_dataclass(v) else v for k, v in changes.items()})
    return from_dict(type(cfg), merged)


def to_dict(cfg) -> dict:
    """A plain dict (nested for nested configs), tuples as lists: ready for TOML/JSON."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def set_item(key: str, value) -> str:
    """The --set item (load_config's `sets`) that gives `key` the string or path `value`, written as a
    TOML basic string: a backslash, a quote or a control character in a path reads back as itself."""
    return f'{key}="{"".join(_escaped(c) for c in str(value))}"'


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _escaped(c: str) -> str:
    if c in _ESCAPES:
        return _ESCAPES[c]
    return f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c


__all__ = ["ConfigError", "from_dict", "replace", "set_item", "to_dict"]
