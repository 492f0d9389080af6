"""The sweep's entry point: check, record, launch (or resume) the Tuner, then summarise.

Resume: ``--resume NAME`` restores ``<storage>/<NAME>`` with ``Tuner.restore(resume_unfinished=True)``:
finished trials are not run again; an unfinished trial reruns its driver (see
:mod:`orchestrator.sweep.trial`). Everything needed to rebuild the trainable is in the sweep's record
(:mod:`orchestrator.sweep.record`).

A trial Tune kills (ASHA stop, PBT pause) takes its Train controller with it but not the controller's
worker placement group; :mod:`orchestrator.reaper` removes it, so stopped trials free their CPUs.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from orchestrator import console, preflight, provenance, tracking
from orchestrator.config import ExperimentConfig
from orchestrator.sweep import record as rec
from orchestrator.sweep import report
from orchestrator.sweep.lineage import TAG_ROLE, TAG_SWEEP, TAG_SWEEP_STATUS, child_runs, lineage_callback
from orchestrator.sweep.settings import (
    COLLAPSE_METRIC,
    COLLAPSE_PATIENCE,
    COLLAPSE_THRESHOLD,
    METRIC,
    MODE,
    SweepSettings,
    check_arguments,
    check_watch,
    checked_sweep,
)
from orchestrator.sweep.tune_setup import (
    connect_ray,
    expected_trials,
    new_tuner,
    num_samples,
    restored_tuner,
    trial_plan,
)
from search_spaces import SearchSpace
from trainers.options import ConfigError


def run_sweep(
    base_cfg: ExperimentConfig | None,
    space: str | Path | dict | SearchSpace | None,
    trials: int = 8,
    scheduler: str = "asha",
    search: str = "random",
    max_concurrent: int = 2,
    workers_per_trial: int | None = None,
    gpus_per_trial: float | None = None,
    storage_path: str | None = None,
    name: str | None = None,
    tracking_uri: str | None = None,
    resume: bool = False,
    *,
    grace_period: int = 1,
    reduction_factor: float = 2.0,
    perturbation_interval: int = 1,
    quantile_fraction: float = 0.25,
    driver_cpus: float = 0.25,
    seed: int | None = None,
    resume_errored: bool = False,
    address: str | None = None,
    metric: str = METRIC,
    mode: str = MODE,
    collapse_metric: str = COLLAPSE_METRIC,
    collapse_threshold: float = COLLAPSE_THRESHOLD,
    collapse_patience: int = COLLAPSE_PATIENCE,
) -> dict[str, Any]:
    """Run (or, with ``resume=True``, continue) a sweep; returns

    ``{"name", "experiment_path", "parent_run_id", "tracking_uri", "best_config" (searched params of the best
    trial), "best_metric" (its final ``metric``), "best_trial_id", "trials": [{"trial_id", "params",
    "metric", "knn_top1", "rankme", "epochs", "status", "stop_reason", "mlflow_run_id"}],
    "total_trial_epochs", "interrupted"}``.

    ``metric`` / ``mode``: what Tune optimises, any per-epoch metric the runs log (checked before
    launch). ``collapse_*``: a trial whose ``collapse_metric`` stays below ``collapse_threshold`` for
    ``collapse_patience`` evaluations in a row is stopped and tagged ``stopped: collapse`` (0 = never).

    ``gpus_per_trial`` is split evenly over ``workers_per_trial`` workers. Config and space errors raise
    ``ConfigError`` before Ray or MLflow is touched. On resume ``base_cfg`` / ``space`` / the search
    settings come from the stored sweep (arguments other than ``name``/``storage_path`` are ignored).
    """
    # absolute once, here: trial drivers run in their trial directory
    storage = tracking.absolute_path(
        storage_path or (base_cfg.train.storage_path if base_cfg else ".bamray/ray_results")
    )
    if resume:
        if not name:
            raise ConfigError("--resume", "needs the sweep name")
        return _resume(storage, name, tracking_uri, resume_errored, address)
    if base_cfg is None or space is None:
        raise ConfigError("--config", "a new sweep needs a base config and a space")
    check_arguments(
        scheduler=scheduler,
        search=search,
        trials=trials,
        max_concurrent=max_concurrent,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
    )
    cfg, space = checked_sweep(
        base_cfg,
        space,
        workers_per_trial=workers_per_trial,
        gpus_per_trial=gpus_per_trial,
        scheduler=scheduler,
        search=search,
        grace_period=grace_period,
        perturbation_interval=perturbation_interval,
        quantile_fraction=quantile_fraction,
    )
    cfg = _prepared(cfg, metric, mode, (collapse_metric, collapse_threshold, collapse_patience))
    name = _new_sweep_name(name or f"{cfg.name}-{space.name}", storage)
    uri = tracking.resolve_tracking_uri(tracking_uri or cfg.tracking.tracking_uri)
    console.get().log_path or console.get().open_log(console.default_log_path("sweep", uri))
    # Before Ray starts and before the parent run exists: store, storage, address, one trial's resources.
    trial_cfg = (
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, address=address)) if address else cfg
    )
    preflight.check_job(trial_cfg, uri, storage)
    settings = SweepSettings(
        name=name,
        trials=trials,
        scheduler=scheduler,
        search=search,
        max_concurrent=max_concurrent,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
        perturbation_interval=perturbation_interval,
        quantile_fraction=quantile_fraction,
        driver_cpus=driver_cpus,
        seed=seed,
        storage_path=storage,
        tracking_uri=uri,
        experiment=cfg.tracking.experiment,
        metric=metric,
        mode=mode,
        collapse_metric=collapse_metric,
        collapse_threshold=collapse_threshold,
        collapse_patience=collapse_patience,
    )
    return _start(cfg, space, settings, address)


def _prepared(
    cfg: ExperimentConfig, metric: str, mode: str, collapse: tuple[str, float, int]
) -> ExperimentConfig:
    """The trials' data resolved once, here (not racing in every trial), and what the sweep optimises and
    watches checked against what its runs will log."""
    from orchestrator.training.data_prep import knn_source, prepare_data, steps_per_epoch

    cfg, meta = prepare_data(cfg)
    steps_per_epoch(cfg, meta)
    check_watch(cfg, knn_source(cfg, meta) is not None, metric, mode, *collapse)
    return cfg


def _new_sweep_name(name: str, storage: str) -> str:
    """``name``, refused if a sweep of that name is already stored (``--resume`` continues it)."""
    if rec.sweep_exists(rec.join(storage, name)):
        raise ConfigError(
            "--name",
            f"a sweep named {name!r} already exists in {storage}; continue it with "
            f"--resume {name}, or pick another --name",
        )
    return name


def _start(
    cfg: ExperimentConfig, space: SearchSpace, settings: SweepSettings, address: str | None
) -> dict[str, Any]:
    """The parent run (params, space and base config as artifacts), the sweep's record, then the Tuner."""
    uri, name = settings.tracking_uri, settings.name
    exp_path = rec.join(settings.storage_path, name)
    experiment_id = tracking.ensure_experiment(uri, settings.experiment)
    parent = tracking.create_run(
        uri,
        settings.experiment,
        name,
        provenance.run_tags(
            cfg.method_name, {TAG_ROLE: "sweep", TAG_SWEEP: name, tracking.TAG_STORAGE: exp_path}
        ),
    )
    pbt = settings.scheduler == "pbt"
    tracking.log_params(
        uri,
        parent,
        {
            "space": space.name,
            "scheduler": settings.scheduler,
            "search": settings.search,
            "trials": settings.trials,
            "num_samples": num_samples(space, settings.trials, settings.search),
            "max_concurrent": settings.max_concurrent,
            "workers_per_trial": cfg.train.workers,
            "gpus_per_worker": cfg.train.gpus_per_worker,
            "grace_period": settings.grace_period,
            "reduction_factor": settings.reduction_factor,
            "seed": settings.seed,
            "metric": settings.metric,
            "mode": settings.mode,
            "collapse_metric": settings.collapse_metric,
            "collapse_threshold": settings.collapse_threshold,
            "collapse_patience": settings.collapse_patience,
            **(
                {
                    "perturbation_interval": settings.perturbation_interval,
                    "quantile_fraction": settings.quantile_fraction,
                }
                if pbt
                else {}
            ),
            "base_config": cfg.name,
            "epochs": cfg.optim.epochs,
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "space.yaml").write_text(yaml.safe_dump(space.to_dict(), sort_keys=False))
        Path(tmp, "base_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        tracking.log_artifacts(uri, parent, tmp)
    record = rec.SweepRecord(
        settings=settings, base=cfg, space=space, parent_run_id=parent, experiment_id=experiment_id
    )
    rec.save_record(exp_path, record)
    print(f"sweep {name}: {exp_path}; MLflow parent run {parent} ({uri})", flush=True)
    return _fit(record, exp_path, address, resume_errored=None)


def _resume(
    storage: str, name: str, tracking_uri: str | None, resume_errored: bool, address: str | None
) -> dict[str, Any]:
    exp_path = rec.join(storage, name)
    record = rec.load_record(storage, name)
    if tracking_uri:
        settings = dataclasses.replace(
            record.settings, tracking_uri=tracking.resolve_tracking_uri(tracking_uri)
        )
        record = dataclasses.replace(record, settings=settings)
    uri = record.settings.tracking_uri
    tracking.reopen_run(uri, record.parent_run_id)
    tracking.log_tags(uri, record.parent_run_id, {TAG_SWEEP_STATUS: "resumed"})
    print(f"resuming sweep {name} from {exp_path}", flush=True)
    return _fit(record, exp_path, address, resume_errored=resume_errored)


def _fit(
    record: rec.SweepRecord, exp_path: str, address: str | None, resume_errored: bool | None
) -> dict[str, Any]:
    """Run the Tuner (a new one, or the stored one when ``resume_errored`` is not None), then summarise."""
    from data.run_actors import pin_ray_data_singletons
    from orchestrator.reaper import start_reaper

    settings, plan = record.settings, trial_plan(record, exp_path)
    uri, parent = settings.tracking_uri, record.parent_run_id
    started = connect_ray(address, record.base, settings)
    reaper = start_reaper(plan.reaper_name)
    pin_ray_data_singletons()
    try:
        if resume_errored is not None:
            tuner = restored_tuner(plan, settings, exp_path, resume_errored)
        else:
            callback = lineage_callback(uri, record.experiment_id, parent, record.base.optim.epochs)
            tuner = new_tuner(plan, settings, [callback])
        if settings.scheduler == "pbt" and settings.seed is not None:
            import random

            random.seed(settings.seed)  # Tune's PBT draws its exploit/explore choices from `random`
        t0 = time.perf_counter()
        with console.get().prints_to_log():  # Tune's start-of-sweep box and TensorBoard hint
            tuner.fit()
        wall = time.perf_counter() - t0
    except BaseException as err:
        tracking.log_tags(uri, parent, {TAG_SWEEP_STATUS: "crashed"})
        tracking.finish_run(uri, parent, "FAILED", f"{type(err).__name__}: {err}")
        raise
    finally:
        _release_ray(reaper, settings.name, started)
    return _summarise(record, exp_path, wall)


def _release_ray(reaper: Any, sweep: str, started: bool) -> None:
    """Let the reaper remove the groups of trials Tune killed on its way out, then shut down a Ray we started."""
    import ray

    try:
        ray.get(reaper.settle.remote(), timeout=60)
        ray.kill(reaper)
    except Exception as err:  # noqa: BLE001 - cleanup must not hide why the sweep ended
        print(f"sweep {sweep}: placement-group reaper: {type(err).__name__}: {err}", flush=True)
    if started:
        ray.shutdown()


def _summarise(record: rec.SweepRecord, exp_path: str, wall: float) -> dict[str, Any]:
    """Rows from Tune's experiment state, children reconciled, parent finished; the run_sweep result."""
    settings, parent = record.settings, record.parent_run_id
    uri = settings.tracking_uri
    children = child_runs(uri, record.experiment_id, parent)
    rows = report.results(exp_path, record.base, record.space, children, settings.metric, settings.mode)
    report.reconcile_children(uri, rows, children)
    # A search algorithm that respects max_concurrent creates trials lazily: an interrupted sweep may have
    # fewer trials than planned, all of them finished (the rest exist only in the searcher's saved state).
    interrupted = any(r["status"] == "unfinished" for r in rows) or len(rows) < expected_trials(
        record.space, settings
    )
    best = report.finish_parent(uri, parent, rows, record.space, interrupted, settings.metric, settings.mode)
    tracking.log_metrics(uri, parent, {"sweep_wall_time_s": wall}, step=0)
    console.log_to_run(uri, parent)
    out = {
        "name": settings.name,
        "experiment_path": exp_path,
        "parent_run_id": parent,
        "tracking_uri": uri,
        "best_config": dict(best["params"]) if best else None,
        "metric": settings.metric,
        "mode": settings.mode,
        "best_metric": best["metric"] if best else None,
        "best_trial_id": best["trial_id"] if best else None,
        "trials": rows,
        "total_trial_epochs": sum(r["epochs"] for r in rows),
        "interrupted": interrupted,
        "wall_time_s": wall,
    }
    report.print_summary(out, record.space)
    return out
