"""Declarative hyper-parameter search spaces, validated against the config's own field ranges.

A space is a YAML mapping (the shipped ones live next to this file, users pass a path)::

    name: my_space
    description: why these ranges
    method: bam                      # optional: the method whose options the space tunes
    params:
      method.reg: {type: loguniform, low: 0.01, high: 0.3}
      method.num_sink_iter: {type: choice, values: [1, 2, 3, 5, 10]}
      method.top_k_sink: {type: choice, values: [0, 32, 64, 128], clip: bam_targets}

Keys are dotted config fields (the same keys ``--set`` takes). Types: ``uniform`` and ``loguniform``
(float ``low``/``high``), ``randint`` (integers ``low``..``high``, both INCLUDED, unlike
``tune.randint``), ``choice`` (``values``, sampled) and ``grid`` (``values``, every value is run).

Why validate here: a sweep launches many Ray jobs, and a range endpoint outside a field's declared
range would only surface as errored trials minutes later. :func:`load_space` builds the experiment
config once per range endpoint / choice value through ``config_from_dict`` so the field's own
``opt()`` range and the cross-field rules (``Method.check``) decide, and raises ``ConfigError``
naming the space parameter and the allowed range before anything starts.

``clip`` names a rule whose limit depends on the run (e.g. ``bam_targets``: BAM's ``top_k_sink``
must not exceed ``num_target_crops x batch_size x workers``, the targets in the global batch): the
values above the limit are lowered to it. It is applied at load time against the base config and
again per trial, in case the space also samples the batch size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from trainers.options import ConfigError

SPACES_DIR = Path(__file__).parent
PARAM_TYPES = ("uniform", "loguniform", "choice", "randint", "grid")
DISCRETE_TYPES = ("choice", "grid", "randint")


def _bam_targets(d: dict[str, Any]) -> int:
    """Targets in BAM's global batch: the columns the top-k keeps (``num_target_crops x B x W``)."""
    method = d.get("method") or {}
    return int(method.get("num_target_crops", 2)) * int(d["optim"]["batch_size"]) * max(int(d["train"]["workers"]), 1)


#: clip rules: name -> (limit from the nested config dict, what the limit is)
CLIP_RULES: dict[str, tuple[Callable[[dict[str, Any]], float], str]] = {
    "bam_targets": (_bam_targets, "method.num_target_crops x optim.batch_size x train.workers"),
}


@dataclasses.dataclass(frozen=True)
class SpaceParam:
    """One searched config field."""

    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    values: tuple[Any, ...] = ()
    clip: str | None = None
    help: str = ""

    @property
    def discrete(self) -> bool:
        return self.type in DISCRETE_TYPES

    def candidates(self) -> list[Any]:
        """The values validation checks: both range endpoints, or every choice."""
        if self.type in ("choice", "grid"):
            return list(self.values)
        return [self.low, self.high]

    def grid_values(self) -> list[Any]:
        """Every value a grid search runs (discrete types only)."""
        if self.type == "randint":
            return list(range(int(self.low), int(self.high) + 1))
        return list(self.values)

    def to_tune(self, search: str = "random") -> Any:
        """The Ray Tune domain. ``search``: random (grid type -> grid_search), grid (every discrete
        param -> grid_search), optuna (Optuna samples categoricals itself, so grid -> choice)."""
        from ray import tune

        if search == "grid" and self.discrete:
            return tune.grid_search(self.grid_values())
        if self.type == "uniform":
            return tune.uniform(float(self.low), float(self.high))
        if self.type == "loguniform":
            return tune.loguniform(float(self.low), float(self.high))
        if self.type == "randint":
            return tune.randint(int(self.low), int(self.high) + 1)  # tune's upper bound is exclusive
        if self.type == "grid" and search != "optuna":
            return tune.grid_search(list(self.values))
        return tune.choice(list(self.values))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type}
        if self.type in ("choice", "grid"):
            d["values"] = list(self.values)
        else:
            d["low"], d["high"] = self.low, self.high
        if self.clip:
            d["clip"] = self.clip
        if self.help:
            d["help"] = self.help
        return d


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """A named, validated set of searched params (flat dotted keys)."""

    name: str
    params: dict[str, SpaceParam]
    description: str = ""
    method: str | None = None
    source: str = ""

    def to_tune(self, search: str = "random") -> dict[str, Any]:
        """``param_space`` for ``ray.tune.Tuner`` (flat dotted keys)."""
        return {k: p.to_tune(search) for k, p in self.params.items()}

    def grid_size(self, search: str = "random") -> int:
        """How many trials one pass over the grid axes makes (1 when there are none)."""
        axes = [p for p in self.params.values() if p.type == "grid" or (search == "grid" and p.discrete)]
        return math.prod(len(p.grid_values()) for p in axes) if axes else 1

    def clip_values(self, sampled: dict[str, Any], merged: dict[str, Any]) -> dict[str, Any]:
        """Lower clipped params to their limit computed on ``merged`` (base + sampled, nested)."""
        out = dict(sampled)
        for key, p in self.params.items():
            if p.clip and key in out and out[key] is not None:
                limit = CLIP_RULES[p.clip][0](merged)
                if out[key] > limit:
                    out[key] = type(out[key])(limit)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (round-trips through :func:`space_from_dict`)."""
        d: dict[str, Any] = {"name": self.name, "description": self.description}
        if self.method:
            d["method"] = self.method
        d["params"] = {k: p.to_dict() for k, p in self.params.items()}
        return d


def available_spaces() -> list[str]:
    """Names of the shipped spaces."""
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def _number(value: Any, where: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(where, f"expected a finite number, got {value!r}")
    return value


def _parse_param(key: str, spec: Any, space: str) -> SpaceParam:
    where = str(key)
    if not isinstance(key, str) or ("." not in key and key != "seed"):
        raise ConfigError(where, f"search space {space!r}: keys are dotted config fields such as method.reg")
    if not isinstance(spec, dict):
        raise ConfigError(where, f"search space {space!r}: expected a mapping with 'type', got {spec!r}")
    unknown = set(spec) - {"type", "low", "high", "values", "clip", "help"}
    if unknown:
        raise ConfigError(where, f"search space {space!r}: unknown entries {sorted(unknown)}; "
                                 "allowed: type, low, high, values, clip, help")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise ConfigError(where, f"search space {space!r}: type {kind!r}; allowed: {list(PARAM_TYPES)}")
    clip = spec.get("clip")
    if clip is not None and clip not in CLIP_RULES:
        raise ConfigError(where, f"search space {space!r}: unknown clip rule {clip!r}; allowed: {sorted(CLIP_RULES)}")
    help_text = str(spec.get("help", ""))
    if kind in ("choice", "grid"):
        values = spec.get("values")
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(where, f"search space {space!r}: {kind} needs a non-empty 'values' list, got {values!r}")
        if "low" in spec or "high" in spec:
            raise ConfigError(where, f"search space {space!r}: {kind} takes 'values', not low/high")
        return SpaceParam(key, kind, values=tuple(values), clip=clip, help=help_text)
    if "values" in spec:
        raise ConfigError(where, f"search space {space!r}: {kind} takes low/high, not 'values'")
    if "low" not in spec or "high" not in spec:
        raise ConfigError(where, f"search space {space!r}: {kind} needs 'low' and 'high'")
    low, high = _number(spec["low"], where), _number(spec["high"], where)
    if kind == "randint":
        if not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(where, f"search space {space!r}: randint needs integer low/high, got {low!r}, {high!r}")
        low, high = int(low), int(high)
        if low > high:
            raise ConfigError(where, f"search space {space!r}: empty range low={low} > high={high} (need low <= high)")
    else:
        low, high = float(low), float(high)
        if not low < high:
            raise ConfigError(where, f"search space {space!r}: empty range low={low} >= high={high} (need low < high)")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(where, f"search space {space!r}: loguniform needs low > 0, got low={low}")
    return SpaceParam(key, kind, low=low, high=high, clip=clip, help=help_text)


def space_from_dict(raw: dict[str, Any], default_name: str = "custom", source: str = "") -> SearchSpace:
    """Parse the YAML form (structure only; :func:`validate_space` checks it against a config)."""
    if not isinstance(raw, dict):
        raise ConfigError("--space", f"a search space must be a YAML mapping, got {type(raw).__name__}")
    unknown = set(raw) - {"name", "description", "method", "params"}
    if unknown:
        raise ConfigError("--space", f"unknown top-level entries {sorted(unknown)}; allowed: name, description, method, params")
    name = str(raw.get("name") or default_name)
    params_raw = raw.get("params")
    if not isinstance(params_raw, dict) or not params_raw:
        raise ConfigError("--space", f"search space {name!r} needs a non-empty 'params' mapping")
    params = {key: _parse_param(key, spec, name) for key, spec in params_raw.items()}
    method = raw.get("method")
    if method is not None and not isinstance(method, str):
        raise ConfigError("--space", f"search space {name!r}: 'method' must be a method name, got {method!r}")
    return SearchSpace(name=name, params=params, description=str(raw.get("description") or ""),
                       method=method, source=source)


def _resolve(name_or_path: str | Path) -> tuple[dict[str, Any], str, str]:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError("--space", f"no such file {str(p)!r}; shipped spaces: {available_spaces()}")
        with open(p) as f:
            return yaml.safe_load(f), p.stem, str(p)
    shipped = SPACES_DIR / f"{p.name}.yaml"
    if shipped.exists():
        with open(shipped) as f:
            return yaml.safe_load(f), p.name, f"search_spaces/{p.name}.yaml"
    raise ConfigError("--space", f"unknown space {str(name_or_path)!r}; shipped spaces: {available_spaces()} "
                                 "(or a path to a YAML file)")


def validate_space(space: SearchSpace, base_cfg: Any) -> SearchSpace:
    """Check every endpoint / choice against ``base_cfg`` (an ``ExperimentConfig``) and clip.

    Each value is checked on its own on top of the base config (not every combination). Returns
    the space with clipped choice values de-duplicated and clipped ranges lowered.
    """
    from orchestrator.config import apply_overrides, config_from_dict

    base = base_cfg.to_dict()
    if space.method and space.method != base_cfg.method_name:
        raise ConfigError("method.name", f"search space {space.name!r} tunes method {space.method!r} but the base "
                                         f"config uses {base_cfg.method_name!r}; pick a {space.method} config")
    flat_base = _flatten_sections(base)
    params: dict[str, SpaceParam] = {}
    for key, p in space.params.items():
        if key == "method.name":
            raise ConfigError(key, f"search space {space.name!r}: the method cannot be searched inside one space")
        current = flat_base.get(key)
        if p.type in ("uniform", "loguniform") and isinstance(current, int) and not isinstance(current, bool):
            raise ConfigError(key, f"search space {space.name!r}: {key} is an integer field; use randint or choice, "
                                   f"not {p.type}")
        if p.clip:
            limit = CLIP_RULES[p.clip][0](base)
            p = _clip_param(p, limit, space.name)
        for value in p.candidates():
            what = "value" if p.type in ("choice", "grid") else ("low" if value == p.low else "high")
            try:
                config_from_dict(apply_overrides(base, {key: value}))
            except ConfigError as err:
                same = err.field == key
                detail = err.message if same else f"{err.field}: {err.message}"
                raise ConfigError(key, f"search space {space.name!r}: {p.type} {what}={value!r} is invalid: "
                                       f"{detail}") from err
        params[key] = p
    return dataclasses.replace(space, params=params)


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
        raise ConfigError(p.key, f"search space {space!r}: low={p.low} exceeds the clip limit {limit} ({rule})")
    return dataclasses.replace(p, high=min(p.high, type(p.high)(limit)))


def _flatten_sections(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "backbone_kwargs":
            out.update(_flatten_sections(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_space(name_or_path: str | Path | dict[str, Any], base_cfg: Any) -> SearchSpace:
    """Load a shipped space by name, a YAML file, or a dict; validate and clip it against ``base_cfg``."""
    if isinstance(name_or_path, dict):
        raw, default_name, source = name_or_path, "custom", "dict"
    else:
        raw, default_name, source = _resolve(name_or_path)
    space = space_from_dict(raw, default_name=default_name, source=source)
    return validate_space(space, base_cfg)


__all__ = [
    "CLIP_RULES", "PARAM_TYPES", "SearchSpace", "SpaceParam", "available_spaces", "load_space",
    "space_from_dict", "validate_space",
]
