"""What defines a sweep besides its base config and space, and every check of it that must fail before
Ray or MLflow is touched (a bad argument found after Ray started costs minutes and leaves runs behind)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search_spaces import SearchSpace, load_space, validate_space
from trainers.options import ConfigError

if TYPE_CHECKING:
    from orchestrator.config import ExperimentConfig

#: What Tune optimises by default (``--metric`` / ``--mode``) and the clock its schedulers read.
METRIC, MODE, TIME_ATTR = "knn_top1", "max", "epoch"
#: the collapse stop's defaults (orchestrator/sweep/collapse.py): ``std_norm`` below 0.05 twice in a row
COLLAPSE_METRIC, COLLAPSE_THRESHOLD, COLLAPSE_PATIENCE = "std_norm", 0.05, 2
SCHEDULERS = ("asha", "pbt", "fifo")
SEARCHES = ("random", "optuna", "grid")
#: PBT copies weights between trials, so it may only perturb params that keep every tensor's shape.
PBT_REFUSED_PREFIXES = ("model.", "data.", "train.workers", "optim.batch_size", "optim.epochs")


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    """Everything besides the base config and the space that defines a sweep (stored for resume)."""

    name: str
    trials: int
    scheduler: str = "asha"
    search: str = "random"
    max_concurrent: int = 2
    grace_period: int = 1
    reduction_factor: float = 2.0
    perturbation_interval: int = 1
    quantile_fraction: float = 0.25
    driver_cpus: float = 0.25
    seed: int | None = None
    storage_path: str = ""
    tracking_uri: str = ""
    experiment: str = "bamray"
    metric: str = METRIC
    mode: str = MODE
    collapse_metric: str = COLLAPSE_METRIC
    collapse_threshold: float = COLLAPSE_THRESHOLD
    collapse_patience: int = COLLAPSE_PATIENCE


def config_check(base: dict[str, Any]) -> Callable[[dict[str, Any]], ExperimentConfig]:
    """The validator a search space is checked with: ``base`` plus flat overrides, built and validated as
    an experiment config (the fields' own ranges and the cross-field rules decide)."""

    from orchestrator.config import apply_overrides, config_from_dict

    def check(overrides: dict[str, Any]) -> ExperimentConfig:
        return config_from_dict(apply_overrides(base, overrides))

    return check


def sweep_space(space: str | Path | dict | SearchSpace, cfg: ExperimentConfig) -> SearchSpace:
    """``space`` (a shipped name, a YAML path, a dict or a parsed space) validated and clipped against ``cfg``."""
    base = cfg.to_dict()
    if isinstance(space, SearchSpace):
        return validate_space(space, base, config_check(base))
    return load_space(space, base, config_check(base))


def check_scheduler(scheduler: str) -> None:
    if scheduler not in SCHEDULERS:
        raise ConfigError("--scheduler", f"got {scheduler!r}; allowed: {list(SCHEDULERS)}")


def check_arguments(
    *,
    scheduler: str,
    search: str,
    trials: int,
    max_concurrent: int,
    grace_period: int,
    reduction_factor: float,
) -> None:
    """The command-line arguments on their own, before the config and space are looked at."""
    if search not in SEARCHES:
        raise ConfigError("--search", f"got {search!r}; allowed: {list(SEARCHES)}")
    check_scheduler(scheduler)
    for field, value, low in (
        ("--trials", trials, 1),
        ("--max-concurrent", max_concurrent, 1),
        ("--grace-period", grace_period, 1),
    ):
        if value < low:
            raise ConfigError(field, f"got {value}; must be >= {low}")
    if reduction_factor <= 1:
        raise ConfigError("--reduction-factor", f"got {reduction_factor}; must be > 1")


def trial_base(
    cfg: ExperimentConfig, workers_per_trial: int | None, gpus_per_trial: float | None
) -> ExperimentConfig:
    """The base config every trial starts from: ``--workers-per-trial`` and ``--gpus-per-trial`` (split
    evenly over the workers) applied and re-validated, since they change cross-field limits."""
    from orchestrator.config import apply_overrides, config_from_dict

    overrides: dict[str, Any] = {}
    if workers_per_trial is not None:
        overrides["train.workers"] = workers_per_trial
    if gpus_per_trial is not None:
        workers = workers_per_trial if workers_per_trial is not None else cfg.train.workers
        overrides["train.gpus_per_worker"] = gpus_per_trial / max(workers, 1)
    return config_from_dict(apply_overrides(cfg.to_dict(), overrides)) if overrides else cfg


def check_trial_workers(cfg: ExperimentConfig, space: SearchSpace, from_flag: bool) -> None:
    """Every trial needs at least one Ray Train worker: with ``train.workers=0`` Ray Train runs the loop in
    the trial's own process, where Ray Tune refuses Ray Train's API (``ray.train.get_context`` raises), so
    every trial would fail after Ray had started."""
    why = "a sweep runs every trial on Ray Train workers; 0 (the in-process loop) cannot report to Ray Tune"
    if cfg.train.workers < 1:
        raise ConfigError(
            "--workers-per-trial" if from_flag else "train.workers",
            f"got {cfg.train.workers}; must be in [1, 1024]: {why}",
        )
    param = space.params.get("train.workers")
    lowest = min(int(v) for v in param.candidates()) if param is not None else 1
    if lowest < 1:
        raise ConfigError("space.train.workers", f"values reach {lowest}; must be in [1, 1024]: {why}")


def check_no_time_budget(cfg: ExperimentConfig, space: SearchSpace) -> None:
    """Trials are compared at equal epochs (ASHA's rungs, PBT's intervals), so none may shorten its own
    run to a time budget."""
    if cfg.train.time_budget_min > 0 or "train.time_budget_min" in space.params:
        raise ConfigError(
            "train.time_budget_min",
            f"got {cfg.train.time_budget_min}; must be 0 in a sweep "
            "(trials are compared at equal epochs: set optim.epochs)",
        )


def check_pbt(
    space: SearchSpace,
    cfg: ExperimentConfig,
    search: str,
    perturbation_interval: int,
    quantile_fraction: float,
) -> None:
    """PBT-specific checks, before launch: the search, the space's params, the intervals."""
    if search == "optuna":
        raise ConfigError(
            "--search", "pbt chooses the next params itself (exploit + explore); use random or grid"
        )
    for key in space.params:
        if key.startswith(PBT_REFUSED_PREFIXES) or key.endswith("_dim"):
            raise ConfigError(
                f"space.{key}",
                "pbt cannot perturb it: a trial continues from another trial's "
                "weights, which must keep their shapes and data layout",
            )
    epochs, freq = cfg.optim.epochs, cfg.train.checkpoint_freq
    if not 1 <= perturbation_interval < epochs:
        raise ConfigError(
            "--perturbation-interval",
            f"got {perturbation_interval}; must be in [1, optim.epochs - 1 = {epochs - 1}]",
        )
    if perturbation_interval % freq:
        raise ConfigError(
            "--perturbation-interval",
            f"got {perturbation_interval}; must be a multiple of "
            f"train.checkpoint_freq={freq} (PBT clones checkpoints)",
        )
    if not 0 < quantile_fraction <= 0.5:
        raise ConfigError("--quantile-fraction", f"got {quantile_fraction}; must be in (0, 0.5]")


def checked_sweep(
    cfg: ExperimentConfig,
    space: str | Path | dict | SearchSpace,
    *,
    workers_per_trial: int | None,
    gpus_per_trial: float | None,
    scheduler: str,
    search: str,
    grace_period: int,
    perturbation_interval: int,
    quantile_fraction: float,
) -> tuple[ExperimentConfig, SearchSpace]:
    """(trials' base config, validated space), or the ``ConfigError`` that names what is wrong."""
    cfg = trial_base(cfg, workers_per_trial, gpus_per_trial)
    space = sweep_space(space, cfg)
    check_trial_workers(cfg, space, workers_per_trial is not None)
    check_no_time_budget(cfg, space)
    if scheduler == "asha" and grace_period > cfg.optim.epochs:
        raise ConfigError(
            "--grace-period", f"got {grace_period}; must be in [1, optim.epochs={cfg.optim.epochs}]"
        )
    if scheduler == "pbt":
        check_pbt(space, cfg, search, perturbation_interval, quantile_fraction)
    return cfg, space


def check_watch(
    cfg: ExperimentConfig,
    labelled: bool,
    metric: str,
    mode: str,
    collapse_metric: str,
    collapse_threshold: float,
    collapse_patience: int,
) -> None:
    """``--metric`` / ``--mode`` and the collapse stop's settings against what the trials will log."""
    from orchestrator.sweep.collapse import check_metric

    check_metric(metric, mode, cfg, labelled)
    if collapse_threshold < 0:
        raise ConfigError("--collapse-threshold", f"got {collapse_threshold}; must be >= 0 (0 = never stop)")
    if collapse_patience < 1:
        raise ConfigError("--collapse-patience", f"got {collapse_patience}; must be >= 1")
    if collapse_threshold > 0 and cfg.eval.signal_samples > 0:  # no signals (0 samples): nothing to watch
        check_metric(collapse_metric, "min", cfg, labelled, field="--collapse-metric")
