"""Reading a space: a shipped name, a YAML file or a dict, parsed into :class:`~search_spaces.space.SearchSpace`
(structure only; :mod:`search_spaces.validate` checks it against a config)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from search_spaces.space import CLIP_RULES, PARAM_TYPES, SearchSpace, SpaceParam
from trainers.options import ConfigError

SPACES_DIR = Path(__file__).parent


def available_spaces() -> list[str]:
    """Names of the shipped spaces."""
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def _number(value: Any, where: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(where, f"expected a finite number, got {value!r}")
    return value


def _parse_header(key: Any, spec: Any, space: str) -> tuple[str, str | None, str]:
    """(type, clip rule, help) of one param, after the checks every type shares."""
    where = str(key)
    if not isinstance(key, str) or ("." not in key and key != "seed"):
        raise ConfigError(where, f"search space {space!r}: keys are dotted config fields such as method.reg")
    if not isinstance(spec, dict):
        raise ConfigError(where, f"search space {space!r}: expected a mapping with 'type', got {spec!r}")
    unknown = set(spec) - {"type", "low", "high", "values", "clip", "help"}
    if unknown:
        raise ConfigError(
            where,
            f"search space {space!r}: unknown entries {sorted(unknown)}; "
            "allowed: type, low, high, values, clip, help",
        )
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise ConfigError(where, f"search space {space!r}: type {kind!r}; allowed: {list(PARAM_TYPES)}")
    clip = spec.get("clip")
    if clip is not None and clip not in CLIP_RULES:
        raise ConfigError(
            where, f"search space {space!r}: unknown clip rule {clip!r}; allowed: {sorted(CLIP_RULES)}"
        )
    return kind, clip, str(spec.get("help", ""))


def _parse_range(where: str, kind: str, spec: dict[str, Any], space: str) -> tuple[float | int, float | int]:
    """(low, high) of a uniform / loguniform / randint param, checked non-empty."""
    if "values" in spec:
        raise ConfigError(where, f"search space {space!r}: {kind} takes low/high, not 'values'")
    if "low" not in spec or "high" not in spec:
        raise ConfigError(where, f"search space {space!r}: {kind} needs 'low' and 'high'")
    low, high = _number(spec["low"], where), _number(spec["high"], where)
    if kind == "randint":
        if not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(
                where, f"search space {space!r}: randint needs integer low/high, got {low!r}, {high!r}"
            )
        low, high = int(low), int(high)
        if low > high:
            raise ConfigError(
                where, f"search space {space!r}: empty range low={low} > high={high} (need low <= high)"
            )
        return low, high
    low, high = float(low), float(high)
    if not low < high:
        raise ConfigError(
            where, f"search space {space!r}: empty range low={low} >= high={high} (need low < high)"
        )
    if kind == "loguniform" and low <= 0:
        raise ConfigError(where, f"search space {space!r}: loguniform needs low > 0, got low={low}")
    return low, high


def _parse_param(key: str, spec: Any, space: str) -> SpaceParam:
    kind, clip, help_text = _parse_header(key, spec, space)
    where = str(key)
    if kind in ("choice", "grid"):
        values = spec.get("values")
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(
                where, f"search space {space!r}: {kind} needs a non-empty 'values' list, got {values!r}"
            )
        if "low" in spec or "high" in spec:
            raise ConfigError(where, f"search space {space!r}: {kind} takes 'values', not low/high")
        return SpaceParam(key, kind, values=tuple(values), clip=clip, help=help_text)
    low, high = _parse_range(where, kind, spec, space)
    return SpaceParam(key, kind, low=low, high=high, clip=clip, help=help_text)


def space_from_dict(raw: dict[str, Any], default_name: str = "custom", source: str = "") -> SearchSpace:
    """Parse the YAML form (structure only; :func:`search_spaces.validate_space` checks it against a config)."""
    if not isinstance(raw, dict):
        raise ConfigError("--space", f"a search space must be a YAML mapping, got {type(raw).__name__}")
    unknown = set(raw) - {"name", "description", "method", "params"}
    if unknown:
        raise ConfigError(
            "--space",
            f"unknown top-level entries {sorted(unknown)}; allowed: name, description, method, params",
        )
    name = str(raw.get("name") or default_name)
    params_raw = raw.get("params")
    if not isinstance(params_raw, dict) or not params_raw:
        raise ConfigError("--space", f"search space {name!r} needs a non-empty 'params' mapping")
    params = {key: _parse_param(key, spec, name) for key, spec in params_raw.items()}
    method = raw.get("method")
    if method is not None and not isinstance(method, str):
        raise ConfigError("--space", f"search space {name!r}: 'method' must be a method name, got {method!r}")
    return SearchSpace(
        name=name, params=params, description=str(raw.get("description") or ""), method=method, source=source
    )


def read_space(name_or_path: str | Path | dict[str, Any]) -> SearchSpace:
    """A shipped space by name, a YAML file, or a dict, parsed (not yet validated)."""
    if isinstance(name_or_path, dict):
        return space_from_dict(name_or_path, default_name="custom", source="dict")
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError("--space", f"no such file {str(p)!r}; shipped spaces: {available_spaces()}")
        with open(p) as f:
            return space_from_dict(yaml.safe_load(f), default_name=p.stem, source=str(p))
    shipped = SPACES_DIR / f"{p.name}.yaml"
    if shipped.exists():
        with open(shipped) as f:
            return space_from_dict(
                yaml.safe_load(f), default_name=p.name, source=f"search_spaces/{p.name}.yaml"
            )
    raise ConfigError(
        "--space",
        f"unknown space {str(name_or_path)!r}; shipped spaces: {available_spaces()} "
        "(or a path to a YAML file)",
    )
