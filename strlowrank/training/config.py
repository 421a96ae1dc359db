"""Typed run configuration: dataclass defaults < YAML file < command-line overrides.

Every field is declared with :func:`option`, which carries its help text, its valid range and,
for an enumerated field, its choices. Unknown keys, wrong types, out-of-range values and values
outside the choices raise :class:`ConfigError` with one line that names the field, e.g.
``train.lr: expected float, got 'fast'`` or ``train.device: must be one of ['auto', 'cpu',
'cuda'], got 'tpu'``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    min: float | None = None,
    max: float | None = None,
    choices: tuple | None = None,
    keys: tuple | None = None,
    factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with a help string and an optional range or set of choices.

    On a mapping or list field, ``min``, ``max`` and ``choices`` apply to each value (None
    values are not checked) and ``keys`` lists the mapping's allowed keys.
    """
    meta = {"help": help, "min": min, "max": max, "choices": choices, "keys": keys}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def to_dict(cfg: Any) -> dict:
    """Nested plain dict of a config dataclass (tuples become lists, for YAML)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it converted (int -> float, ...)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp) or (Any, Any)
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
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
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _check_range(value: Any, meta: dict, key: str) -> None:
    """Check ``value`` against the field's choices, keys and range (item by item for a mapping
    or a list)."""
    if isinstance(value, dict):
        allowed = meta.get("keys")
        for k, v in value.items():
            if allowed is not None and k not in allowed:
                raise ConfigError(f"{key}: unknown key {k!r}, must be one of {list(allowed)}")
            _check_range(v, meta, f"{key}.{k}")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_range(v, meta, f"{key}[{i}]")
        return
    if value is None:
        return
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"{key}: must be one of {list(meta['choices'])}, got {value!r}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and isinstance(value, (int, float)) and value < lo:
        raise ConfigError(f"{key}: must be >= {lo}, got {value!r}")
    if hi is not None and isinstance(value, (int, float)) and value > hi:
        raise ConfigError(f"{key}: must be <= {hi}, got {value!r}")


def from_dict(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (partial) nested dict, validating every key."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        value = data.get(name, dataclasses.MISSING)
        if dataclasses.is_dataclass(hints[name]):
            # a section's defaults are its factory's instance (tracks override TrainConfig's)
            base = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            base = to_dict(base) if base is not None else {}
            if isinstance(value, dict):
                value = _merge(base, value)
            elif value is dataclasses.MISSING:
                value = base
        if value is not dataclasses.MISSING:
            kwargs[name] = _coerce(value, hints[name], key)
            _check_range(kwargs[name], dict(f.metadata), key)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    """Recursive dict update (``update`` wins) without modifying either argument."""
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Set ``data['a']['b'] = value`` for ``dotted='a.b'``, creating levels as needed."""
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{p}' is not a section")
    node[leaf] = value


def parse_value(text: str) -> Any:
    """Parse a command-line value with YAML rules: 0.1 -> float, true -> bool, [a, b] -> list."""
    for number in (int, float):  # YAML 1.1 reads "1e-3" as a string
        try:
            return number(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with the safe loader; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: dict | None = None) -> Any:
    """Defaults of ``cls`` < YAML file ``path`` < ``overrides`` ({'train.lr': 0.1, ...})."""
    data = read_yaml(path) if path else {}
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def choices_text(meta: dict) -> str:
    """The allowed keys and values of a field as one short line ("" when it has none)."""
    keys, choices = meta.get("keys"), meta.get("choices")
    parts = [f"keys: {' | '.join(map(str, keys))}"] if keys else []
    if choices:
        parts.append(f"{'values' if keys else 'one of'}: {' | '.join(map(str, choices))}")
    return "; ".join(parts)


def describe_fields(cls: type, prefix: str = "", instance: Any = None) -> list[tuple]:
    """(dotted name, type name, default, help, choices) for every leaf field, for --help.

    ``choices`` is a short text ("one of: gru | lstm", "keys: ...; values: ...") or "".

    Defaults are read from a default instance, so a track's section factories show their values.
    """
    instance = from_dict(cls, {}) if instance is None else instance
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, value = hints[f.name], getattr(instance, f.name)
        if dataclasses.is_dataclass(tp):
            rows += describe_fields(tp, f"{prefix}{f.name}.", value)
            continue
        tname = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
        rows.append(
            (
                f"{prefix}{f.name}",
                tname,
                value,
                f.metadata.get("help", ""),
                choices_text(f.metadata),
            )
        )
    return rows
