"""``bamray sweep``: the sub-command's arguments and handler."""

from __future__ import annotations

import argparse
from typing import Any

from orchestrator.sweep.settings import (
    COLLAPSE_METRIC,
    COLLAPSE_PATIENCE,
    COLLAPSE_THRESHOLD,
    METRIC,
    MODE,
    SCHEDULERS,
    SEARCHES,
)
from trainers.options import ConfigError


def cmd_sweep(args: argparse.Namespace) -> int:
    """``bamray sweep``: 0 = finished with a best trial, 1 = interrupted or no trial produced a score.
    Imports the config and Ray-side modules here, not at the top: the parser is built for every command."""
    from orchestrator.config import load_config
    from orchestrator.sweep.run import run_sweep

    if args.resume:
        out = run_sweep(
            None,
            None,
            storage_path=args.storage_path,
            name=args.resume,
            tracking_uri=args.tracking_uri,
            resume=True,
            resume_errored=args.resume_errored,
            address=args.address,
        )
    else:
        if not args.config or not args.space:
            raise ConfigError("--config" if not args.config else "--space", "required for a new sweep")
        overrides = list(args.set or [])
        if args.tracking_uri:
            overrides.append(f"tracking.tracking_uri={args.tracking_uri}")
        cfg = load_config(args.config, overrides)
        out = run_sweep(
            cfg,
            args.space,
            trials=args.trials,
            scheduler=args.scheduler,
            search=args.search,
            max_concurrent=args.max_concurrent,
            workers_per_trial=args.workers_per_trial,
            gpus_per_trial=args.gpus_per_trial,
            storage_path=args.storage_path,
            name=args.name,
            tracking_uri=args.tracking_uri,
            grace_period=args.grace_period,
            reduction_factor=args.reduction_factor,
            perturbation_interval=args.perturbation_interval,
            quantile_fraction=args.quantile_fraction,
            seed=args.seed,
            address=args.address,
            metric=args.metric,
            mode=args.mode,
            collapse_metric=args.collapse_metric,
            collapse_threshold=args.collapse_threshold,
            collapse_patience=args.collapse_patience,
        )
    return 0 if (out["best_config"] is not None and not out["interrupted"]) else 1


def add_sweep_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bamray sweep`` on the CLI's subparsers."""
    s = subparsers.add_parser(
        "sweep",
        help="hyper-parameter sweep with Ray Tune (one Ray Train run per trial), tracked in MLflow",
        description="Ray Tune sweep: each trial fits a Ray Train run of the base config plus sampled params; "
        "the sweep is a parent MLflow run, every trial a child run. Spaces: search_spaces/*.yaml "
        "names or a YAML path.",
    )
    s.add_argument("--config", help="base config (shipped name or YAML path)")
    s.add_argument(
        "--space", help="search space: shipped name (bam_sinkhorn, dino, byol, simclr, mae) or YAML path"
    )
    s.add_argument(
        "--trials", type=int, default=8, help="trials (grid search: repeats of the grid to reach it)"
    )
    s.add_argument(
        "--scheduler",
        choices=SCHEDULERS,
        default="asha",
        help="asha = early stopping on --metric per epoch; pbt = population based training "
        "(synchronous; bottom trials clone top trials' checkpoints, params perturbed); fifo = none",
    )
    s.add_argument(
        "--search",
        choices=SEARCHES,
        default="random",
        help="random sampling, optuna TPE, or grid over the discrete params",
    )
    s.add_argument("--max-concurrent", type=int, default=2, help="trials running at once")
    s.add_argument("--workers-per-trial", type=int, help="Ray Train workers per trial (train.workers)")
    s.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, split over its workers")
    _add_scheduler_arguments(s)
    s.add_argument(
        "--storage-path",
        help="Tune/Train storage: local path or s3:// / gs:// URI "
        "(default: train.storage_path of the config)",
    )
    s.add_argument("--name", help="sweep name (default: <config name>-<space name>); must be new")
    s.add_argument(
        "--resume", metavar="NAME", help="continue an interrupted sweep; finished trials are not rerun"
    )
    s.add_argument("--resume-errored", action="store_true", help="with --resume: also retry errored trials")
    s.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else .bamray/mlflow.db)"
    )
    s.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a base-config field")
    s.set_defaults(func=cmd_sweep)
    return s


def _add_scheduler_arguments(parser: argparse.ArgumentParser) -> None:
    """What is optimised and when a trial is stopped; ASHA's and PBT's own knobs; the seed of the search
    and of PBT's choices."""
    group = parser.add_argument_group("scheduler and search")
    group.add_argument(
        "--metric",
        default=METRIC,
        help=f"what the sweep optimises: any per-epoch metric the runs log, e.g. knn_top1, rankme, "
        f"rankme_proj, std_norm, loss, bam_target_entropy (checked before launch; default {METRIC})",
    )
    group.add_argument(
        "--mode", choices=("max", "min"), default=MODE, help=f"maximise or minimise --metric (default {MODE})"
    )
    group.add_argument(
        "--collapse-metric",
        default=COLLAPSE_METRIC,
        help=f"label-free signal the collapse stop watches (default {COLLAPSE_METRIC}: std of normalised "
        "backbone features x sqrt(dim), ~1 healthy, 0 collapsed)",
    )
    group.add_argument(
        "--collapse-threshold",
        type=float,
        default=COLLAPSE_THRESHOLD,
        help=f"stop a trial whose --collapse-metric stays below this (default {COLLAPSE_THRESHOLD}; 0 = never)",
    )
    group.add_argument(
        "--collapse-patience",
        type=int,
        default=COLLAPSE_PATIENCE,
        help=f"... for this many evaluations in a row (default {COLLAPSE_PATIENCE})",
    )
    group.add_argument(
        "--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped"
    )
    group.add_argument(
        "--reduction-factor", type=float, default=2.0, help="ASHA: keep the top 1/rf at each rung"
    )
    group.add_argument(
        "--perturbation-interval",
        type=int,
        default=1,
        help="PBT: epochs between exploit/explore steps (a multiple of train.checkpoint_freq)",
    )
    group.add_argument(
        "--quantile-fraction",
        type=float,
        default=0.25,
        help="PBT: share of trials that clone a top trial (and of top trials they clone from)",
    )
    group.add_argument(
        "--seed",
        type=int,
        help="seed of the search algorithm and of PBT's choices (reproducible sampled params)",
    )
