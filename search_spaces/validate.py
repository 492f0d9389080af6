"""Checking a space against a base config, before any Ray job starts.

The check itself is handed in (:data:`ConfigCheck`): this package sits below the orchestrator and must
not import its config, yet the field's own declared range and the cross-field rules must decide, not a
second copy of them here."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from search_spaces.parse import read_space
from search_spaces.space import CLIP_RULES, SearchSpace, SpaceParam
from trainers.options import ConfigError, flatten

#: Validates the base config with flat overrides (``{"method.reg": 0.1}``) applied; raises ``ConfigError``
#: naming the field when the combination is invalid. ``orchestrator.sweep`` builds it from the config.
ConfigCheck = Callable[[dict[str, Any]], object]


def validate_space(space: SearchSpace, base: Mapping[str, Any], check: ConfigCheck) -> SearchSpace:
    """Check every endpoint / choice on top of ``base`` (the nested config dict) with ``check``, and clip.

    Each value is checked on its own (not every combination). Returns the space with clipped choice
    values de-duplicated and clipped ranges lowered.
    """
    base_method = (base.get("method") or {}).get("name")
    if space.method and space.method != base_method:
        raise ConfigError(
            "method.name",
            f"search space {space.name!r} tunes method {space.method!r} but the base "
            f"config uses {base_method!r}; pick a {space.method} config",
        )
    flat_base = flatten(dict(base))
    params: dict[str, SpaceParam] = {}
    for key, p in space.params.items():
        if key == "method.name":
            raise ConfigError(
                key, f"search space {space.name!r}: the method cannot be searched inside one space"
            )
        current = flat_base.get(key)
        if p.type in ("uniform", "loguniform") and isinstance(current, int) and not isinstance(current, bool):
            raise ConfigError(
                key,
                f"search space {space.name!r}: {key} is an integer field; use randint or choice, "
                f"not {p.type}",
            )
        if p.clip:
            p = _clip_param(p, CLIP_RULES[p.clip][0](dict(base)), space.name)
        for value in p.candidates():
            _check_value(p, value, check, space.name)
        params[key] = p
    return dataclasses.replace(space, params=params)


def _check_value(p: SpaceParam, value: Any, check: ConfigCheck, space: str) -> None:
    what = "value" if p.type in ("choice", "grid") else ("low" if value == p.low else "high")
    try:
        check({p.key: value})
    except ConfigError as err:
        detail = err.message if err.field == p.key else f"{err.field}: {err.message}"
        raise ConfigError(
            p.key, f"search space {space!r}: {p.type} {what}={value!r} is invalid: {detail}"
        ) from err


def _clip_param(p: SpaceParam, limit: float, space: str) -> SpaceParam:
    rule = CLIP_RULES[p.clip][1]
    if p.type in ("choice", "grid"):
        clipped: list[Any] = []
        for v in p.values:
            v = type(v)(limit) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > limit else v
            if v not in clipped:
                clipped.append(v)
        return dataclasses.replace(p, values=tuple(clipped))
    if p.low > limit:
        raise ConfigError(
            p.key, f"search space {space!r}: low={p.low} exceeds the clip limit {limit} ({rule})"
        )
    return dataclasses.replace(p, high=min(p.high, type(p.high)(limit)))


def load_space(
    name_or_path: str | Path | dict[str, Any], base: Mapping[str, Any], check: ConfigCheck
) -> SearchSpace:
    """Load a shipped space by name, a YAML file, or a dict; validate and clip it against ``base``."""
    return validate_space(read_space(name_or_path), base, check)
