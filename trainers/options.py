"""Typed option fields with declared ranges, shared by every config section.

A field declares its allowed range once (``opt(0.05, gt=0)``); ``validate`` checks a whole dataclass
and raises :class:`ConfigError` naming the dotted field and the range, so a bad value is refused
before any Ray job starts. Search spaces reuse the same declarations to reject out-of-range values.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

#: A number as people type it: ``1e-3``, ``5e-4``, ``1.0e6``, ``1_000``, ``-2``, ``.5``. YAML 1.1 (PyYAML)
#: reads several of these (``1e-3``, ``1.0e6``: no dot or no exponent sign) as strings, so a config field
#: that wants a number parses the string itself instead of refusing what the CLI's own help suggests.
_NUMBER = re.compile(r"[+-]?(?:\d(?:_?\d)*(?:\.(?:\d(?:_?\d)*)?)?|\.\d(?:_?\d)*)(?:[eE][+-]?\d+)?")


class ConfigError(ValueError):
    """A config value is invalid. ``field`` is the dotted path, ``message`` says the allowed range."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def opt(
    default: Any = dataclasses.MISSING,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    choices: Sequence[Any] | None = None,
    help: str = "",
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field carrying its valid range; see :func:`validate`."""
    meta = {
        "gt": gt,
        "ge": ge,
        "lt": lt,
        "le": le,
        "choices": tuple(choices) if choices else None,
        "help": help,
    }
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def range_text(f: dataclasses.Field) -> str:
    """Human-readable allowed range of a field, e.g. ``> 0`` or ``one of ['adamw', 'sgd']``."""
    m = f.metadata
    if m.get("choices"):
        return f"one of {list(m['choices'])}"
    parts = []
    if m.get("gt") is not None:
        parts.append(f"> {m['gt']}")
    if m.get("ge") is not None:
        parts.append(f">= {m['ge']}")
    if m.get("lt") is not None:
        parts.append(f"< {m['lt']}")
    if m.get("le") is not None:
        parts.append(f"<= {m['le']}")
    return " and ".join(parts) if parts else "any value of the declared type"


def check_value(f: dataclasses.Field, value: Any, path: str) -> None:
    """Raise ConfigError if ``value`` is outside the range declared on field ``f``."""
    m = f.metadata
    if m.get("choices") is not None:
        if value not in m["choices"]:
            raise ConfigError(path, f"got {value!r}; allowed: {range_text(f)}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(path, f"got {value!r}; must be finite ({range_text(f)})")
    bad = (
        (m.get("gt") is not None and not value > m["gt"])
        or (m.get("ge") is not None and not value >= m["ge"])
        or (m.get("lt") is not None and not value < m["lt"])
        or (m.get("le") is not None and not value <= m["le"])
    )
    if bad:
        raise ConfigError(path, f"got {value!r}; allowed: {range_text(f)}")


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Coerce YAML / CLI values to the annotated type (int -> float, list -> tuple), else raise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for a in args:
            try:
                return _coerce(a, value, path)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if tp is Any:
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(path, f"expected {len(args)} values, got {list(value)!r}")
            return tuple(_coerce(a, v, path) for a, v in zip(args, value))
        inner = args[0] if args else Any
        seq = [_coerce(inner, v, path) for v in value]
        return tuple(seq) if origin is tuple else seq
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(path, f"expected true/false, got {value!r}")
    if tp is int:
        number = _number(value)
        if number is None or not number.is_finite() or number != number.to_integral_value():
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return int(number)
    if tp is float:
        number = _number(value)
        if number is None:
            raise ConfigError(path, f"expected a number, got {value!r}")
        return float(number)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    return value


def _number(value: Any) -> Decimal | None:
    """``value`` as an exact Decimal when it is a number or a string people type for one (see
    :data:`_NUMBER`), else None. Exact, so ``1e3`` is an integer and ``1e-3`` is not; booleans are no
    numbers (``true`` for a learning rate is a mistake, not 1.0)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value)) if math.isfinite(value) else Decimal(value)
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return Decimal(value.strip().replace("_", ""))
    return None


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, coercing types, refusing unknown keys, then validating."""
    if data is not None and not isinstance(data, dict):
        section = prefix.rstrip(".") or cls.__name__
        raise ConfigError(section, f"is a section of fields; expected a mapping, got {data!r}")
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    kwargs = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            path = f"{prefix}{key}"
            raise ConfigError(path, f"unknown field; known fields: {sorted(names)}")
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        path = f"{prefix}{f.name}"
        tp = hints[f.name]
        value = data[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = value if isinstance(value, tp) else from_dict(tp, value, prefix=path + ".")
        else:
            kwargs[f.name] = _coerce(tp, value, path)
    obj = cls(**kwargs)
    validate(obj, prefix)
    return obj


def validate(obj: Any, prefix: str = "") -> None:
    """Check every field of a (nested) dataclass against its declared range."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, prefix=path + ".")
        else:
            check_value(f, value, path)


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain nested dict of a dataclass (tuples become lists, for YAML/JSON/MLflow)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(obj)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}} -> {'a.b': 1}`` (used for MLflow params and Tune keys)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
