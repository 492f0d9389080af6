"""The search-space types: one searched field (:class:`SpaceParam`) and a named set of them
(:class:`SearchSpace`), with their Ray Tune form and the ``clip`` rules whose limit depends on the run."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

PARAM_TYPES = ("uniform", "loguniform", "choice", "randint", "grid")
DISCRETE_TYPES = ("choice", "grid", "randint")


def _bam_targets(d: dict[str, Any]) -> int:
    """Targets in BAM's global batch: the columns the top-k keeps (``num_target_crops x B x W``)."""
    method = d.get("method") or {}
    return (
        int(method.get("num_target_crops", 2))
        * int(d["optim"]["batch_size"])
        * max(int(d["train"]["workers"]), 1)
    )


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
        """The YAML form (round-trips through :func:`search_spaces.space_from_dict`)."""
        d: dict[str, Any] = {"name": self.name, "description": self.description}
        if self.method:
            d["method"] = self.method
        d["params"] = {k: p.to_dict() for k, p in self.params.items()}
        return d
