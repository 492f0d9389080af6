"""The typed contract between the sweep's process and each trial driver (a Tune trial's actor).

One :class:`TrialPlan` per sweep, handed to every trial through ``tune.with_parameters``; it is rebuilt
from the stored :class:`~orchestrator.sweep.record.SweepRecord` on resume, so a resumed trial sees the
same plan. A trial's own part (the sampled params) comes from Tune, see :func:`trial_params`."""

from __future__ import annotations

import dataclasses
from typing import Any

from orchestrator.config import ExperimentConfig, apply_overrides
from search_spaces import SearchSpace


@dataclasses.dataclass(frozen=True)
class TrialPlan:
    """What every trial of one sweep needs besides its sampled params."""

    sweep_name: str
    base: ExperimentConfig  #: the trials' base config (data already prepared by the sweep)
    space: SearchSpace
    tracking_uri: str
    experiment: str
    experiment_id: str
    parent_run_id: str  #: the sweep's MLflow run; each trial opens a child of it
    train_storage: str  #: absolute: each trial's Ray Train run lives here as ``train-<trial id>[...]``
    reaper_name: str  #: the placement-group reaper actor (see orchestrator/reaper.py)
    gate_epochs: tuple[int, ...] = ()  #: ASHA's rungs, where the workers wait for Tune's decision
    pbt_interval: int | None = None  #: PBT's perturbation interval; None when the scheduler is not PBT
    #: the collapse stop: ``(metric, threshold, patience)``; None = off (orchestrator/sweep/collapse.py)
    collapse: tuple[str, float, int] | None = None

    @property
    def relays_checkpoints(self) -> bool:
        """PBT clones Tune-level checkpoints, so only a PBT trial hands its Train checkpoints to Tune."""
        return self.pbt_interval is not None


def plain(value: Any) -> Any:
    """numpy scalars (Tune samples) -> Python scalars, which the config's type coercion accepts."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, tuple, dict)) else value


def trial_params(sampled: dict[str, Any], base: dict[str, Any], space: SearchSpace) -> tuple[dict, dict]:
    """(clipped flat params, merged nested config dict) for one trial; ``base`` is the nested base config."""
    params = {k: plain(v) for k, v in sampled.items()}
    params = space.clip_values(params, apply_overrides(base, params))
    return params, apply_overrides(base, params)


def trial_epochs(trial_config: dict[str, Any], base_epochs: int) -> int:
    """The epochs a trial is meant to run: its sampled ``optim.epochs``, else the base config's."""
    if "optim.epochs" in trial_config:
        return int(plain(trial_config["optim.epochs"]))
    return int(base_epochs)
