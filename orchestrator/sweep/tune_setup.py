"""Ray Tune's side of a sweep: scheduler, search algorithm, trainable, and the Tuner built from them.

ASHA stops a trial at ``grace_period * reduction_factor**k`` epochs when its ``--metric`` is below the
rung's ``1 - 1/reduction_factor`` quantile; ``stop_last_trials=False`` lets a trial that reaches
``max_t = epochs`` finish on its own (so its driver logs the final artifacts) instead of being killed
on its last report.

PBT (synchronous ``PopulationBasedTraining``): every ``perturbation_interval`` epochs the whole population
pauses; the bottom ``quantile_fraction`` of trials (by ``--metric``) take a copy of a top trial's
checkpoint and continue with mutated params (continuous params x 0.8 / 1.2 or resampled, clipped to the
space's range; discrete ones moved to a neighbouring value or resampled). Each perturbation restarts
every trial's Train run: worth it when epochs are long, not for toy runs.
"""

from __future__ import annotations

import math
from typing import Any

from orchestrator import console
from orchestrator.config import ExperimentConfig
from orchestrator.local_ray import connect_or_start
from orchestrator.sweep.collapse import collapse_stopper
from orchestrator.sweep.plan import TrialPlan
from orchestrator.sweep.record import SweepRecord
from orchestrator.sweep.settings import TIME_ATTR, SweepSettings, check_scheduler
from orchestrator.sweep.trial import trial_driver
from search_spaces import SearchSpace


def pbt_mutations(space: SearchSpace) -> dict[str, Any]:
    """PBT's ``hyperparam_mutations``: continuous params resample from their domain, discrete ones from
    their values (PBT then moves them to a neighbouring value or resamples)."""
    return {key: p.grid_values() if p.discrete else p.to_tune("random") for key, p in space.params.items()}


def pbt_explore(space: SearchSpace):
    """PBT's ``custom_explore_fn``: keep perturbed values (x 0.8 / x 1.2) inside the space's range, so a
    trial never fails validation because of an exploration step."""

    def explore(config: dict[str, Any]) -> dict[str, Any]:
        for key, p in space.params.items():
            if key in config and not p.discrete:
                config[key] = float(min(max(config[key], p.low), p.high))
        return config

    return explore


def scheduler(settings: SweepSettings, epochs: int, space: SearchSpace | None = None):
    """The Tune scheduler ``settings`` names, for trials of ``epochs`` epochs."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    check_scheduler(settings.scheduler)
    if settings.scheduler == "fifo":
        return FIFOScheduler()
    if settings.scheduler == "pbt":
        assert space is not None
        # synch=True: the whole population is compared at the same epoch, so decisions do not depend on
        # which trial happened to report first (asynchronous PBT skips exploits whose donor has not been
        # checkpointed yet).
        return PopulationBasedTraining(
            time_attr=TIME_ATTR,
            perturbation_interval=settings.perturbation_interval,
            hyperparam_mutations=pbt_mutations(space),
            quantile_fraction=settings.quantile_fraction,
            custom_explore_fn=pbt_explore(space),
            synch=True,
        )
    return ASHAScheduler(
        time_attr=TIME_ATTR,
        max_t=epochs,
        grace_period=settings.grace_period,
        reduction_factor=settings.reduction_factor,
        stop_last_trials=False,
    )


def asha_rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """The epochs where :func:`scheduler`'s ``ASHAScheduler`` (one bracket) judges a trial, before the
    last one. Its milestones are ``grace_period * reduction_factor**k``; a trial is judged at the first
    epoch that reaches one (``ceil``, for a fractional factor). The trial's workers wait there for the
    decision (:mod:`orchestrator.epoch_gate`)."""
    rungs, milestone = set(), float(grace_period)
    while milestone < max_t:
        rungs.add(math.ceil(milestone - 1e-9))
        milestone *= reduction_factor
    return sorted(r for r in rungs if r < max_t)


def search_alg(settings: SweepSettings):
    """Optuna's TPE, or Tune's random / grid variant generator (both seeded by ``settings.seed``)."""
    if settings.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        sampler = optuna.samplers.TPESampler(seed=settings.seed)
        return OptunaSearch(sampler=sampler)
    from ray.tune.search import BasicVariantGenerator

    # A BasicVariantGenerator INSTANCE makes Tune ignore TuneConfig.max_concurrent_trials (ray/tune/tune.py
    # only wraps Searchers in a ConcurrencyLimiter), so the limit must be given to it directly.
    return BasicVariantGenerator(random_state=settings.seed, max_concurrent=settings.max_concurrent)


def num_samples(space: SearchSpace, trials: int, search: str) -> int:
    """Tune repeats the whole grid ``num_samples`` times: enough repeats to reach ``trials``. Optuna has
    no grid (grid params become categorical), so there ``num_samples`` is the trial count."""
    if search == "optuna":
        return trials
    return max(1, math.ceil(trials / space.grid_size(search)))


def expected_trials(space: SearchSpace, settings: SweepSettings) -> int:
    """Trials a complete sweep has: ``num_samples`` passes over the grid (Optuna has no grid)."""
    grid = 1 if settings.search == "optuna" else space.grid_size(settings.search)
    return num_samples(space, settings.trials, settings.search) * grid


def trial_plan(record: SweepRecord, exp_path: str) -> TrialPlan:
    """The plan every trial driver of the sweep ``record`` describes gets (the same on resume)."""
    settings, base = record.settings, record.base
    gates = (
        asha_rungs(settings.grace_period, settings.reduction_factor, base.optim.epochs)
        if settings.scheduler == "asha"
        else []
    )
    return TrialPlan(
        sweep_name=settings.name,
        base=base,
        space=record.space,
        tracking_uri=settings.tracking_uri,
        experiment=settings.experiment,
        experiment_id=record.experiment_id,
        parent_run_id=record.parent_run_id,
        train_storage=exp_path,
        reaper_name=reaper_name(settings.name),
        gate_epochs=tuple(gates),
        pbt_interval=settings.perturbation_interval if settings.scheduler == "pbt" else None,
        collapse=(settings.collapse_metric, settings.collapse_threshold, settings.collapse_patience)
        if settings.collapse_threshold > 0
        else None,
    )


def reaper_name(sweep: str) -> str:
    return f"bamray-pg-reaper-{sweep}"


def _trial_dirname(trial: Any) -> str:
    """Short trial directories (the default embeds every param value in the name)."""
    return f"trial_{trial.trial_id}"


def trainable(plan: TrialPlan, settings: SweepSettings):
    """:func:`~orchestrator.sweep.trial.trial_driver` bound to ``plan``, on a fraction of a CPU."""
    from ray import tune

    return tune.with_resources(tune.with_parameters(trial_driver, plan=plan), {"cpu": settings.driver_cpus})


def new_tuner(plan: TrialPlan, settings: SweepSettings, callbacks: list):
    """The Tuner of a new sweep, stored under ``settings.storage_path / settings.name``."""
    from ray import tune

    space = plan.space
    return tune.Tuner(
        trainable(plan, settings),
        param_space=space.to_tune(settings.search),
        tune_config=tune.TuneConfig(
            metric=settings.metric,
            mode=settings.mode,
            scheduler=scheduler(settings, plan.base.optim.epochs, space),
            search_alg=search_alg(settings),
            num_samples=num_samples(space, settings.trials, settings.search),
            # random/grid: the limit lives in the BasicVariantGenerator (see search_alg);
            # optuna: Tune wraps the Searcher in a ConcurrencyLimiter.
            max_concurrent_trials=settings.max_concurrent if settings.search == "optuna" else None,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=settings.name,
            storage_path=settings.storage_path,
            failure_config=tune.FailureConfig(max_failures=0),
            # Tune-level checkpoints exist only under PBT (copies of Train checkpoints). Ray warns that
            # <= 2 can delete a donor's checkpoint before a slower trial has cloned it.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=4),
            callbacks=callbacks,
            stop=collapse_stopper() if plan.collapse else None,
            # Tune's own console (a config box per trial start, a 30-line result box per trial end, a status
            # table every 30 s) stays off; each trial prints its epoch lines and one line when it ends, and
            # the sweep its results table (report.print_summary). `--verbose` gives Tune's back.
            verbose=2 if console.get().verbose else 0,
        ),
    )


def restored_tuner(plan: TrialPlan, settings: SweepSettings, exp_path: str, resume_errored: bool):
    """The Tuner of an interrupted sweep: finished trials stay finished, unfinished ones rerun their driver."""
    from ray import tune

    return tune.Tuner.restore(
        exp_path, trainable=trainable(plan, settings), resume_unfinished=True, resume_errored=resume_errored
    )


def connect_ray(address: str | None, cfg: ExperimentConfig, settings: SweepSettings) -> bool:
    """Ray for the sweep (see :func:`orchestrator.local_ray.connect_or_start`); a local one gets enough
    logical CPUs for ``max_concurrent`` trials plus 2 for Ray Data. True = the caller shuts it down."""
    per_trial = settings.driver_cpus + max(cfg.train.workers, 1) * cfg.train.cpus_per_worker
    return connect_or_start(address, max(4, math.ceil(settings.max_concurrent * per_trial) + 2))
