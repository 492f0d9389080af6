"""`bamray sweep`: Ray Tune over a trial DRIVER function that fits one Ray Train run per trial.

Why a driver function and not ``Tuner(TorchTrainer)``: Train V2 (Ray >= 2.51) no longer runs as a Tune
trainable. Each trial runs :func:`trial_driver` (a fraction of a CPU, ``tune.with_resources``), which
builds the experiment config from the base config plus the sampled params, opens a CHILD MLflow run
(tag ``mlflow.parentRunId`` = the sweep's run), and fits ``orchestrator.train.build_trainer(...)`` with
``RunConfig(name=f"train-{trial_id}")`` and a callback that forwards every per-epoch ``ray.train.report``
(``knn_top1``, ``epoch``, ``loss``) to the driver, which reports it to Tune, so the scheduler sees them
(:func:`_fit_reporting_to_tune`). At ASHA's rungs the workers wait for Tune's decision before training on
(:mod:`orchestrator.epoch_gate`), so a stopped trial's curves end at the rung that stopped it.

Lineage in MLflow: the sweep's PARENT run holds the space, scheduler, search and trial count, and at
the end the best params (``best.<key>``), ``best_knn_top1``, a results table (CSV + markdown) and a PNG
of k-NN against each searched parameter. Each trial's CHILD run holds its params and tags (written by
its driver), its curves (written by the rank-0 Train worker) and its exported backbones. Statuses:
FINISHED for trials that ran every epoch; KILLED + ``bamray.trial_status=stopped_early`` for trials
the scheduler stopped (they did nothing wrong, so not FAILED); FAILED for errored trials. A trial
stopped by the scheduler loses its actor abruptly, so its status is written by
:class:`SweepLineageCallback` in the sweep's own process and reconciled once more at the end.

Resume: ``--resume NAME`` restores ``<storage>/<NAME>`` with ``Tuner.restore(resume_unfinished=True)``:
finished trials are not run again; an unfinished trial reruns its driver, whose Train run (same
deterministic name ``train-<trial_id>``) continues from its last checkpoint, and whose MLflow child run
is found by tag and re-opened. Everything needed to rebuild the trainable (base config, space,
settings, parent run id) is stored in ``<storage>/<NAME>/bamray_sweep.json``.

ASHA stops a trial at ``grace_period * reduction_factor**k`` epochs when its ``knn_top1`` is below the
rung's ``1 - 1/reduction_factor`` quantile; ``stop_last_trials=False`` lets a trial that reaches
``max_t = epochs`` finish on its own (so its driver logs the final artifacts) instead of being killed
on its last report.

PBT (``--scheduler pbt``, synchronous ``PopulationBasedTraining``): every ``--perturbation-interval``
epochs the whole population pauses; the bottom ``--quantile-fraction`` of trials (by ``knn_top1``) take
a copy of a top trial's checkpoint and continue with mutated params (continuous params x 0.8 / 1.2 or
resampled, clipped to the space's range; discrete ones moved to a neighbouring value or resampled). For
that the driver relays every Train checkpoint to Tune (``ray.tune.report(..., checkpoint=...)``, see
:func:`_fit_reporting_to_tune`), and a restarted driver (``ray.tune.get_checkpoint()`` set) starts a
NEW Train run named ``train-<trial_id>-<hash of that checkpoint>`` whose workers load it as their initial
state (``init_checkpoint``), with the trial's new params and its own MLflow run. Only params that keep
the weights' shapes may be perturbed (``model.*``, ``data.*`` and ``*_dim`` are refused). Each
perturbation restarts every trial's Train run: worth it when epochs are long, not for toy runs.

A trial Tune kills (ASHA stop, PBT pause) takes its Train controller with it but not the controller's
worker placement group; :mod:`orchestrator.reaper` removes it, so stopped trials free their CPUs.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from data.sources import is_uri
from orchestrator import tracking
from orchestrator.config import ExperimentConfig, apply_overrides, config_from_dict, load_config
from orchestrator.local_ray import start_local_ray
from search_spaces import SearchSpace, load_space, space_from_dict, validate_space
from trainers.options import ConfigError, flatten

METRIC, MODE, TIME_ATTR = "knn_top1", "max", "epoch"
SCHEDULERS = ("asha", "pbt", "fifo")
SEARCHES = ("random", "optuna", "grid")
META_FILE = "bamray_sweep.json"
TAG_ROLE, TAG_SWEEP, TAG_TRIAL_ID, TAG_TRIAL_STATUS = ("bamray.role", "bamray.sweep", "bamray.trial_id",
                                                       "bamray.trial_status")
TAG_PARENT = "mlflow.parentRunId"
#: Test hook: after this many trials ended, the sweep process interrupts itself exactly as Ctrl-C does
#: (Tune's SIGUSR1 handler: save the experiment state, stop the running trials, return), so resume can be
#: tested deterministically.
INTERRUPT_ENV = "BAMRAY_TEST_INTERRUPT_SWEEP_AFTER_TRIALS"


@dataclasses.dataclass
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


# ================================================================================================ helpers
def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if is_uri(base) else os.path.join(base, *parts)


def _absolute(path: str) -> str:
    """Relative paths are anchored at the project root (trial drivers run in their trial directory)."""
    if not path or is_uri(path) or os.path.isabs(path):
        return path
    return str((tracking.project_root() / path).resolve())


def _write_text(path: str, text: str) -> None:
    """Atomic for local paths (temp file + os.replace); URIs go through pyarrow's filesystem."""
    if is_uri(path):
        import pyarrow.fs

        fs, fs_path = pyarrow.fs.FileSystem.from_uri(path)
        with fs.open_output_stream(fs_path) as f:
            f.write(text.encode())
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bamray-", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _read_text(path: str) -> str | None:
    if is_uri(path):
        import pyarrow.fs

        fs, fs_path = pyarrow.fs.FileSystem.from_uri(path)
        if fs.get_file_info(fs_path).type == pyarrow.fs.FileType.NotFound:
            return None
        with fs.open_input_stream(fs_path) as f:
            return f.readall().decode()
    return Path(path).read_text() if os.path.exists(path) else None


def _plain(value: Any) -> Any:
    """numpy scalars (Tune samples) -> Python scalars, which the config's type coercion accepts."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, tuple, dict)) else value


def _trial_overrides(sampled: dict[str, Any], base: dict[str, Any], space: SearchSpace) -> tuple[dict, dict]:
    """(clipped flat params, merged nested config dict) for one trial."""
    params = {k: _plain(v) for k, v in sampled.items()}
    params = space.clip_values(params, apply_overrides(base, params))
    return params, apply_overrides(base, params)


def _check_scheduler(scheduler: str) -> None:
    if scheduler not in SCHEDULERS:
        raise ConfigError("--scheduler", f"got {scheduler!r}; allowed: {list(SCHEDULERS)}")


#: PBT copies weights between trials, so it may only perturb params that keep every tensor's shape.
PBT_REFUSED_PREFIXES = ("model.", "data.", "train.workers", "optim.batch_size", "optim.epochs")


def _check_trial_workers(cfg: ExperimentConfig, space: SearchSpace, from_flag: bool) -> None:
    """Every trial needs at least one Ray Train worker: with ``train.workers=0`` Ray Train runs the loop in
    the trial's own process, where Ray Tune refuses Ray Train's API (``ray.train.get_context`` raises), so
    every trial would fail after Ray had started."""
    why = "a sweep runs every trial on Ray Train workers; 0 (the in-process loop) cannot report to Ray Tune"
    if cfg.train.workers < 1:
        raise ConfigError("--workers-per-trial" if from_flag else "train.workers",
                          f"got {cfg.train.workers}; must be in [1, 1024]: {why}")
    param = space.params.get("train.workers")
    lowest = min(int(v) for v in param.candidates()) if param is not None else 1
    if lowest < 1:
        raise ConfigError("space.train.workers", f"values reach {lowest}; must be in [1, 1024]: {why}")


def _check_no_time_budget(cfg: ExperimentConfig, space: SearchSpace) -> None:
    """Trials are compared at equal epochs (ASHA's rungs, PBT's intervals), so none may shorten its own
    run to a time budget."""
    if cfg.train.time_budget_min > 0 or "train.time_budget_min" in space.params:
        raise ConfigError("train.time_budget_min", f"got {cfg.train.time_budget_min}; must be 0 in a sweep "
                                                   "(trials are compared at equal epochs: set optim.epochs)")


def check_pbt(space: SearchSpace, cfg: ExperimentConfig, search: str, perturbation_interval: int,
              quantile_fraction: float) -> None:
    """PBT-specific checks, before launch: the search, the space's params, the intervals."""
    if search == "optuna":
        raise ConfigError("--search", "pbt chooses the next params itself (exploit + explore); use random or grid")
    for key in space.params:
        if key.startswith(PBT_REFUSED_PREFIXES) or key.endswith("_dim"):
            raise ConfigError(f"space.{key}", "pbt cannot perturb it: a trial continues from another trial's "
                                              "weights, which must keep their shapes and data layout")
    epochs, freq = cfg.optim.epochs, cfg.train.checkpoint_freq
    if not 1 <= perturbation_interval < epochs:
        raise ConfigError("--perturbation-interval", f"got {perturbation_interval}; must be in [1, optim.epochs - 1 = "
                                                     f"{epochs - 1}]")
    if perturbation_interval % freq:
        raise ConfigError("--perturbation-interval", f"got {perturbation_interval}; must be a multiple of "
                                                     f"train.checkpoint_freq={freq} (PBT clones checkpoints)")
    if not 0 < quantile_fraction <= 0.5:
        raise ConfigError("--quantile-fraction", f"got {quantile_fraction}; must be in (0, 0.5]")


def _trial_epochs(trial_config: dict[str, Any], base: dict[str, Any]) -> int:
    if "optim.epochs" in trial_config:
        return int(_plain(trial_config["optim.epochs"]))
    return int(base["optim"]["epochs"])


def trial_outcome(status: str, last_result: dict[str, Any] | None, target_epochs: int) -> str:
    """Classify a Tune trial: completed | stopped_early | failed | unfinished.

    A TERMINATED trial that reported fewer epochs than its budget was stopped by the scheduler (a
    trial that ends on its own runs every epoch; a NaN loss makes the driver raise, so it is ERROR)."""
    if status == "ERROR":
        return "failed"
    if status != "TERMINATED":
        return "unfinished"
    epochs = int((last_result or {}).get(TIME_ATTR) or 0)
    return "completed" if epochs >= target_epochs else "stopped_early"


_MLFLOW_STATUS = {"completed": "FINISHED", "stopped_early": "KILLED", "failed": "FAILED", "unfinished": "KILLED"}


def _child_runs(uri: str, experiment_id: str, parent_run_id: str) -> dict[str, Any]:
    """trial id -> MLflow run of every child of the sweep's parent run."""
    c = tracking.client(uri)
    runs = tracking.with_retry(c.search_runs, [experiment_id],
                               filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'", max_results=5000)
    return {r.data.tags.get(TAG_TRIAL_ID): r for r in runs if r.data.tags.get(TAG_TRIAL_ID)}


def _mark_child(uri: str, run: Any, outcome: str, reason: str | None = None) -> None:
    """Write the child's final status and ``bamray.trial_status`` unless it already says so."""
    status = _MLFLOW_STATUS[outcome]
    if run.data.tags.get(TAG_TRIAL_STATUS) != outcome:
        tracking.log_tags(uri, run.info.run_id, {TAG_TRIAL_STATUS: outcome})
    if run.info.status != status:
        tracking.finish_run(uri, run.info.run_id, status, reason if outcome == "failed" else None)


# ================================================================================================ trial driver
class NonFiniteTrialError(RuntimeError):
    """The trial's loss went NaN/Inf: the Tune trial errors (FAILED), it was not stopped by the scheduler."""


def trial_driver(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One Tune trial: child MLflow run + one Ray Train run (``train-<trial_id>``) fitted to the end (PBT: one
    Train run per stretch between perturbation points, see :func:`_pbt_segments`).

    Runs inside the trial's actor (cwd = the trial directory, hence absolute paths everywhere).
    ``ctx`` is plain data (see :func:`_driver_context`), identical on resume."""
    from ray import tune

    from orchestrator.train import _best_checkpoint, _log_checkpoint_artifacts, _log_config_artifact

    trial_id = tune.get_context().get_trial_id()
    space = space_from_dict(ctx["space"])
    params, merged = _trial_overrides(config, ctx["base"], space)
    cfg = config_from_dict(merged)  # a bad combination errors this trial with the field named
    uri, parent = ctx["tracking_uri"], ctx["parent_run_id"]
    relay = bool(ctx.get("relay_checkpoints"))
    init = tune.get_checkpoint() if relay else None
    train_name = _train_run_name(trial_id, init)

    existing = _child_runs(uri, ctx["experiment_id"], parent).get(trial_id)
    if existing is not None:
        run_id = tracking.reopen_run(uri, existing.info.run_id).info.run_id
    else:
        tags = tracking.run_tags(cfg.method_name, {
            TAG_PARENT: parent, TAG_ROLE: "trial", TAG_SWEEP: ctx["name"], TAG_TRIAL_ID: trial_id,
            tracking.TAG_RAY_RUN: train_name, tracking.TAG_STORAGE: ctx["train_storage"],
        })
        run_id = tracking.create_run(uri, ctx["experiment"], f"{ctx['name']}-{trial_id}", tags)
        tracking.log_params(uri, run_id, flatten(cfg.to_dict()))
        tracking.log_tags(uri, run_id, {"bamray.sampled": json.dumps(params, sort_keys=True)})
        _log_config_artifact(uri, run_id, cfg)
    try:
        if relay:
            result = _pbt_segments(cfg, trial_id, params, ctx, run_id, init)
        else:
            result = _fit_reporting_to_tune(cfg, train_name, ctx, run_id, gate_epochs=ctx.get("gate_epochs") or ())
        ret = result.return_value or {}
        if ret.get("status") == "nan":
            raise NonFiniteTrialError(ret.get("reason", "non-finite loss"))
        _log_checkpoint_artifacts(uri, run_id, result.checkpoint, "final")
        best, best_score = _best_checkpoint(result)
        if best is not None:
            _log_checkpoint_artifacts(uri, run_id, best, "best_knn")
            tracking.log_metrics(uri, run_id, {"best_knn_top1": best_score}, step=int(ret.get("final_step", 0)))
        tracking.log_tags(uri, run_id, {TAG_TRIAL_STATUS: "completed"})
        tracking.finish_run(uri, run_id, "FINISHED")
    except Exception as err:
        # A trial the scheduler stopped (ASHA can stop one on its final report, when a rung falls on the last
        # epoch) surfaces here as the Train controller dying with the trial's placement group, and this
        # thread may still run after the sweep process recorded the trial's outcome: that outcome stands.
        if not _torn_down_by_tune(err):
            current = tracking.with_retry(tracking.client(uri).get_run, run_id)
            if current.data.tags.get(TAG_TRIAL_STATUS) not in ("stopped_early", "completed"):
                tracking.log_tags(uri, run_id, {TAG_TRIAL_STATUS: "failed"})
                tracking.finish_run(uri, run_id, "FAILED", f"{type(err).__name__}: {err}")
        raise


def _torn_down_by_tune(err: BaseException) -> bool:
    """The trial's actors were removed by Tune (scheduler stop, sweep end), not a failure of the trial."""
    from ray.exceptions import ActorDiedError

    return isinstance(err, ActorDiedError) and "placement group was removed" in str(err)


TAG_RAY_RUN_PREFIX = "bamray.pbt.train_run."


def _train_run_name(trial_id: str, init: Any) -> str:
    """``train-<trial>`` from scratch; a run started from a Tune checkpoint gets that checkpoint's hash:
    reusing a name would make Ray Train resume that run's own latest checkpoint instead."""
    return f"train-{trial_id}" + (f"-{hashlib.sha1(init.path.encode()).hexdigest()[:8]}" if init else "")


def _pbt_segments(cfg: ExperimentConfig, trial_id: str, params: dict[str, Any], ctx: dict[str, Any], run_id: str,
                  init: Any) -> Any:
    """A PBT trial: one Train run per stretch between perturbation points, each ending WITH the epoch
    PBT decides on. Training never runs past a decision, so an exploited trial has no abandoned epochs
    in its curves. If Tune lets the trial go on, the next stretch starts from the checkpoint just made;
    if it pauses it (synchronous PBT always does), the actor is stopped while reporting, and Tune restarts
    the driver later from whichever checkpoint PBT chose (:func:`trial_driver`)."""
    uri, interval = ctx["tracking_uri"], int(ctx["perturbation_interval"])
    while True:
        start = _checkpoint_epoch(init)
        stop = min(cfg.optim.epochs, (start // interval + 1) * interval)
        name = _train_run_name(trial_id, init)
        # MLflow params are immutable: the params each Train run used are a tag + one curve per param.
        tracking.log_tags(uri, run_id, {TAG_RAY_RUN_PREFIX + name: json.dumps(
            {"params": params, "from_epoch": start, "init_checkpoint": init.path if init else None}, sort_keys=True),
            tracking.TAG_RAY_RUN: name})
        numeric = {f"param.{k}": float(v) for k, v in params.items() if isinstance(v, (int, float))}
        if numeric:
            tracking.log_metrics(uri, run_id, numeric, step=start)
        result = _fit_reporting_to_tune(cfg, name, ctx, run_id, init=init, stop_after_epoch=stop,
                                        relay_checkpoints=True)
        if stop >= cfg.optim.epochs or (result.return_value or {}).get("status") != "finished":
            return result
        init = result.checkpoint


def _checkpoint_epoch(checkpoint: Any) -> int:
    """The epoch a Train checkpoint was written after (0 for none); read from its ``state.json``."""
    if checkpoint is None:
        return 0
    from orchestrator import checkpointing as ckpt

    with checkpoint.as_directory() as d:
        return int(ckpt.read_checkpoint_epoch(d))


def _relay_callback_cls():
    """Built lazily (Ray import). Runs in the Train controller: forwards each report's rank-0 metrics (with
    ``checkpoint_path``) and, for PBT, the checkpoint itself to the trial driver, which hands them to Tune.
    PBT clones Tune-level checkpoints; the other schedulers need the metrics only, and reporting the
    checkpoint to Tune would store it a second time in the trial's directory."""
    from ray.train import UserCallback

    class TuneReportRelay(UserCallback):
        def __init__(self, queue: Any, with_checkpoint: bool):
            self.queue, self.with_checkpoint = queue, with_checkpoint

        def after_report(self, run_context: Any, metrics: list, checkpoint: Any) -> None:
            item = dict(metrics[0])
            if checkpoint is not None:
                item["checkpoint_path"] = checkpoint.path
            self.queue.put((item, checkpoint if self.with_checkpoint else None))

    return TuneReportRelay


def _fit_reporting_to_tune(cfg: ExperimentConfig, train_name: str, ctx: dict[str, Any], run_id: str, *,
                           init: Any = None, stop_after_epoch: int | None = None, relay_checkpoints: bool = False,
                           gate_epochs: list[int] | tuple[int, ...] = ()) -> Any:
    """``trainer.fit()`` in a thread while this (the trial's) thread reports every relayed epoch to Tune:
    ``ray.tune.report`` must run in the trial's own thread, and it returns only once Tune asks for the
    next result, i.e. once the scheduler decided to go on, which must not stall training. Except at
    ``gate_epochs`` (ASHA's rungs): there the workers wait for that return (:mod:`orchestrator.epoch_gate`),
    so a trial the scheduler stops trains no further than the epoch it was judged on."""
    import threading

    from ray import tune
    from ray.util.queue import Queue

    from orchestrator.epoch_gate import EpochGate
    from orchestrator.reaper import watch_current_actor
    from orchestrator.train import build_trainer

    queue = Queue(actor_options={"num_cpus": 0})
    gate = EpochGate.remote() if gate_epochs else None
    trainer = build_trainer(cfg, run_name=train_name, storage_path=ctx["train_storage"], mlflow_run_id=run_id,
                            tracking_uri=ctx["tracking_uri"], callbacks=[_relay_callback_cls()(queue, relay_checkpoints)],
                            init_checkpoint=init, stop_after_epoch=stop_after_epoch,
                            pg_watch=watch_current_actor(ctx.get("reaper")),
                            epoch_gate=(gate, list(gate_epochs)) if gate is not None else None)
    box: dict[str, Any] = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - re-raised in the trial's thread below
            box["error"] = err
        finally:
            queue.put(None)

    thread = threading.Thread(target=fit, name="bamray-train-fit", daemon=True)
    thread.start()
    while (item := queue.get()) is not None:
        metrics, checkpoint = item
        tune.report(metrics, checkpoint=checkpoint)
        if gate is not None:
            gate.release.remote(int(metrics.get(TIME_ATTR) or 0))
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


# ================================================================================================ Tune callback
def _tune_callback_cls():
    """Built lazily: ``ray.tune.Callback`` must not be imported by ``bamray sweep --help``."""
    from ray import tune

    class SweepLineageCallback(tune.Callback):
        """Runs in the sweep's process: writes the MLflow status of trials that end without their driver
        being able to (scheduler stops) and fires the interrupt test hook. Plain data only (it is
        pickled into the experiment state and comes back on restore)."""

        def __init__(self, uri: str, experiment_id: str, parent_run_id: str, base: dict[str, Any]):
            self.uri, self.experiment_id, self.parent_run_id, self.base = uri, experiment_id, parent_run_id, base
            self.ended = 0

        def _finalise(self, trial: Any, errored: bool) -> None:
            status = "ERROR" if errored else "TERMINATED"
            outcome = trial_outcome(status, trial.last_result, _trial_epochs(trial.config, self.base))
            try:
                run = _child_runs(self.uri, self.experiment_id, self.parent_run_id).get(trial.trial_id)
                if run is not None:
                    _mark_child(self.uri, run, outcome, "trial errored; see the Tune trial's error.txt")
            except Exception as err:  # noqa: BLE001 - lineage must not kill the sweep; reconciled at the end
                print(f"bamray sweep: could not mark trial {trial.trial_id} in MLflow yet: {err}", flush=True)
            self.ended += 1
            limit = int(os.environ.get(INTERRUPT_ENV, "0") or 0)
            # Tune installs its SIGUSR1 handler only when fit() runs in the main thread; anywhere else the
            # signal's default action would kill the process, so the hook stays off there.
            handled = signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None)
            if limit and self.ended >= limit and handled:
                print(f"{INTERRUPT_ENV}={limit}: interrupting the sweep like Ctrl-C", flush=True)
                os.kill(os.getpid(), signal.SIGUSR1)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._finalise(trial, errored=False)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._finalise(trial, errored=True)

    return SweepLineageCallback


# ================================================================================================ Tune objects
def _pbt_mutations(space: SearchSpace) -> dict[str, Any]:
    """PBT's ``hyperparam_mutations``: continuous params resample from their domain, discrete ones from
    their values (PBT then moves them to a neighbouring value or resamples)."""
    out: dict[str, Any] = {}
    for key, p in space.params.items():
        out[key] = p.grid_values() if p.discrete else p.to_tune("random")
    return out


def _pbt_explore(space: SearchSpace):
    """PBT's ``custom_explore_fn``: keep perturbed values (x 0.8 / x 1.2) inside the space's range, so a
    trial never fails validation because of an exploration step."""
    def explore(config: dict[str, Any]) -> dict[str, Any]:
        for key, p in space.params.items():
            if key in config and not p.discrete:
                config[key] = float(min(max(config[key], p.low), p.high))
        return config
    return explore


def _scheduler(settings: SweepSettings, epochs: int, space: SearchSpace | None = None):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    _check_scheduler(settings.scheduler)
    if settings.scheduler == "fifo":
        return FIFOScheduler()
    if settings.scheduler == "pbt":
        assert space is not None
        # synch=True: the whole population is compared at the same epoch, so decisions do not depend on
        # which trial happened to report first (asynchronous PBT skips exploits whose donor has not been
        # checkpointed yet).
        return PopulationBasedTraining(time_attr=TIME_ATTR, perturbation_interval=settings.perturbation_interval,
                                       hyperparam_mutations=_pbt_mutations(space),
                                       quantile_fraction=settings.quantile_fraction,
                                       custom_explore_fn=_pbt_explore(space), synch=True)
    if settings.grace_period > epochs:
        raise ConfigError("--grace-period", f"got {settings.grace_period}; must be in [1, optim.epochs={epochs}]")
    return ASHAScheduler(time_attr=TIME_ATTR, max_t=epochs, grace_period=settings.grace_period,
                         reduction_factor=settings.reduction_factor, stop_last_trials=False)


def asha_rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """The epochs where :func:`_scheduler`'s ``ASHAScheduler`` (one bracket) judges a trial, before the
    last one. Its milestones are ``grace_period * reduction_factor**k``; a trial is judged at the first
    epoch that reaches one (``ceil``, for a fractional factor). The trial's workers wait there for the
    decision (:mod:`orchestrator.epoch_gate`)."""
    rungs, milestone = set(), float(grace_period)
    while milestone < max_t:
        rungs.add(math.ceil(milestone - 1e-9))
        milestone *= reduction_factor
    return sorted(r for r in rungs if r < max_t)


def _search_alg(settings: SweepSettings):
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


def _driver_context(base: dict[str, Any], space: SearchSpace, settings: SweepSettings, parent_run_id: str,
                    experiment_id: str, exp_path: str) -> dict[str, Any]:
    return {"base": base, "space": space.to_dict(), "name": settings.name, "tracking_uri": settings.tracking_uri,
            "experiment": settings.experiment, "experiment_id": experiment_id, "parent_run_id": parent_run_id,
            "train_storage": exp_path, "relay_checkpoints": settings.scheduler == "pbt",
            "gate_epochs": asha_rungs(settings.grace_period, settings.reduction_factor, int(base["optim"]["epochs"]))
            if settings.scheduler == "asha" else [],
            "perturbation_interval": settings.perturbation_interval, "reaper": _reaper_name(settings.name)}


def _reaper_name(sweep: str) -> str:
    return f"bamray-pg-reaper-{sweep}"


def _trial_dirname(trial: Any) -> str:
    """Short trial directories (the default embeds every param value in the name)."""
    return f"trial_{trial.trial_id}"


def _trainable(ctx: dict[str, Any], settings: SweepSettings):
    from ray import tune

    return tune.with_resources(tune.with_parameters(trial_driver, ctx=ctx), {"cpu": settings.driver_cpus})


def _connect_ray(address: str | None, cfg: ExperimentConfig, settings: SweepSettings) -> bool:
    """Reuse an initialised Ray; else ``address`` / RAY_ADDRESS (a cluster or a submitted job); else a local
    Ray with enough logical CPUs for ``max_concurrent`` trials plus 2 for Ray Data. True = we started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return True
    per_trial = settings.driver_cpus + max(cfg.train.workers, 1) * cfg.train.cpus_per_worker
    start_local_ray(max(4, math.ceil(settings.max_concurrent * per_trial) + 2))
    return True


# ================================================================================================ results
def _results(exp_path: str, base: dict[str, Any], space: SearchSpace, children: dict[str, Any]) -> list[dict]:
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(exp_path, default_metric=METRIC, default_mode=MODE)
    rows = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        params, _ = _trial_overrides({k: trial.config[k] for k in space.params if k in trial.config}, base, space)
        last = trial.last_result or {}
        outcome = trial_outcome(trial.status, last, _trial_epochs(trial.config, base))
        run = children.get(trial.trial_id)
        knn = last.get(METRIC)
        rows.append({"trial_id": trial.trial_id, "status": outcome, "epochs": int(last.get(TIME_ATTR) or 0),
                     "knn_top1": float(knn) if knn is not None else None, "params": params,
                     "mlflow_run_id": run.info.run_id if run is not None else None,
                     "checkpoint_path": last.get("checkpoint_path")})
    return rows


def _has_artifact(uri: str, run_id: str, path: str) -> bool:
    listed = tracking.with_retry(tracking.client(uri).list_artifacts, run_id)
    return any(a.path == path for a in listed)


def _log_final_artifacts(uri: str, run_id: str, checkpoint_path: str) -> None:
    from ray.train import Checkpoint

    from orchestrator.train import _log_checkpoint_artifacts

    try:
        _log_checkpoint_artifacts(uri, run_id, Checkpoint(checkpoint_path), "final")
    except Exception as err:  # noqa: BLE001 - a missing export must not fail the sweep's summary
        print(f"bamray sweep: could not log the final backbone of run {run_id}: {err}", flush=True)


def _best(rows: list[dict]) -> dict | None:
    """Best final k-NN among trials that ran their whole budget (a stopped trial's early score is not
    comparable), else among all trials with a score."""
    scored = [r for r in rows if r["knn_top1"] is not None]
    full = [r for r in scored if r["status"] == "completed"]
    pool = full or scored
    return max(pool, key=lambda r: r["knn_top1"]) if pool else None


def results_csv(rows: list[dict], keys: list[str]) -> str:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["trial_id", "status", "epochs", "knn_top1", *keys, "mlflow_run_id"])
    for r in rows:
        w.writerow([r["trial_id"], r["status"], r["epochs"], "" if r["knn_top1"] is None else f"{r['knn_top1']:.4f}",
                    *[r["params"].get(k, "") for k in keys], r["mlflow_run_id"] or ""])
    return out.getvalue()


def results_markdown(rows: list[dict], keys: list[str]) -> str:
    head = ["trial", "status", "epochs", "knn_top1 (%)", *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: -(r["knn_top1"] if r["knn_top1"] is not None else -1)):
        knn = "-" if r["knn_top1"] is None else f"{r['knn_top1']:.2f}"
        vals = [_fmt(r["params"].get(k)) for k in keys]
        lines.append("| " + " | ".join([r["trial_id"], r["status"], str(r["epochs"]), knn, *vals]) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def plot_knn_vs_params(rows: list[dict], space: SearchSpace, path: str) -> None:
    """One panel per searched parameter: final k-NN top-1 of each trial (marker = outcome). matplotlib is
    not a declared dependency: without it a plain PIL scatter is drawn instead."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_with_pil(rows, space, path)
        return

    keys = list(space.params)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    styles = {"completed": ("o", "tab:blue"), "stopped_early": ("x", "tab:orange"), "failed": ("v", "tab:red"),
              "unfinished": (".", "tab:gray")}
    for ax, key in zip(axes[0], keys):
        p = space.params[key]
        categorical = p.type in ("choice", "grid") and not all(isinstance(v, (int, float)) for v in p.values)
        labels = [str(v) for v in p.values] if categorical else []
        for outcome, (marker, color) in styles.items():
            pts = [(r["params"].get(key), r["knn_top1"]) for r in rows
                   if r["status"] == outcome and r["knn_top1"] is not None and key in r["params"]]
            if not pts:
                continue
            xs = [labels.index(str(x)) if categorical else x for x, _ in pts]
            ax.scatter(xs, [y for _, y in pts], marker=marker, color=color, label=outcome)
        if categorical:
            ax.set_xticks(range(len(labels)), labels)
        elif p.type in ("choice", "grid"):
            ax.set_xticks(sorted(p.values))
        elif p.type == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("k-NN top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"sweep over {space.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_with_pil(rows: list[dict], space: SearchSpace, path: str) -> None:
    """Fallback plot: one 320x240 panel per parameter, x = value rank (log for loguniform), y = k-NN."""
    from PIL import Image, ImageDraw

    keys = list(space.params)
    w, h, pad = 320, 240, 30
    img = Image.new("RGB", (w * len(keys), h), "white")
    draw = ImageDraw.Draw(img)
    colors = {"completed": (31, 119, 180), "stopped_early": (255, 127, 14), "failed": (214, 39, 40),
              "unfinished": (127, 127, 127)}
    for i, key in enumerate(keys):
        x0 = i * w
        draw.rectangle([x0 + pad, pad // 2, x0 + w - 10, h - pad], outline="black")
        draw.text((x0 + pad, h - pad + 8), key, fill="black")
        pts = [(r["params"].get(key), r["knn_top1"], r["status"]) for r in rows
               if r["knn_top1"] is not None and key in r["params"]]
        if not pts:
            continue
        p = space.params[key]
        values = sorted({str(v) for v, _, _ in pts}) if p.type in ("choice", "grid") else None

        def xpos(v: Any, p=p, values=values, pts=pts) -> float:
            if values is not None:
                return (values.index(str(v)) + 0.5) / len(values)
            lo, hi = (p.low, p.high)
            if p.type == "loguniform":
                return (math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo))
            return (v - lo) / ((hi - lo) or 1)

        for v, y, status in pts:
            cx = x0 + pad + xpos(v) * (w - pad - 10)
            cy = h - pad - (y / 100.0) * (h - 1.5 * pad)
            draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colors.get(status, (0, 0, 0)))
    img.save(path)


def _finish_parent(uri: str, parent: str, rows: list[dict], space: SearchSpace, interrupted: bool) -> dict | None:
    keys = list(space.params)
    best = _best(rows)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "results.csv").write_text(results_csv(rows, keys))
        Path(tmp, "results.md").write_text(results_markdown(rows, keys))
        if any(r["knn_top1"] is not None for r in rows):
            plot_knn_vs_params(rows, space, os.path.join(tmp, "knn_vs_params.png"))
        tracking.log_artifacts(uri, parent, tmp)
    counts = {o: sum(r["status"] == o for r in rows) for o in ("completed", "stopped_early", "failed", "unfinished")}
    summary = {f"trials_{k}": v for k, v in counts.items()}
    summary["total_trial_epochs"] = sum(r["epochs"] for r in rows)
    if best is not None:
        summary["best_knn_top1"] = best["knn_top1"]
    tracking.log_metrics(uri, parent, summary, step=0)
    if interrupted:
        tracking.log_tags(uri, parent, {"bamray.sweep_status": "interrupted"})
        tracking.finish_run(uri, parent, "KILLED")
        return best
    if best is not None:
        tracking.log_params(uri, parent, {f"best.{k}": v for k, v in best["params"].items()})
        tracking.log_tags(uri, parent, {"best_trial_id": best["trial_id"], "best_run_id": best["mlflow_run_id"] or "",
                                        "bamray.sweep_status": "finished"})
        tracking.finish_run(uri, parent, "FINISHED")
    else:
        tracking.finish_run(uri, parent, "FAILED", "no trial reported knn_top1")
    return best


# ================================================================================================ entry point
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
) -> dict[str, Any]:
    """Run (or, with ``resume=True``, continue) a sweep; returns

    ``{"name", "experiment_path", "parent_run_id", "tracking_uri", "best_config" (searched params of the best
    trial), "best_metric" (its final knn_top1), "best_trial_id", "trials": [{"trial_id", "params",
    "knn_top1", "epochs", "status", "mlflow_run_id"}], "total_trial_epochs", "interrupted"}``.

    ``gpus_per_trial`` is split evenly over ``workers_per_trial`` workers. Config and space errors raise
    ``ConfigError`` before Ray or MLflow is touched. On resume ``base_cfg`` / ``space`` / the search
    settings come from the stored sweep (arguments other than ``name``/``storage_path`` are ignored).
    """
    storage = _absolute(storage_path or (base_cfg.train.storage_path if base_cfg else ".bamray/ray_results"))
    if resume:
        if not name:
            raise ConfigError("--resume", "needs the sweep name")
        return _resume(storage, name, tracking_uri, resume_errored, address)
    if base_cfg is None or space is None:
        raise ConfigError("--config", "a new sweep needs a base config and a space")
    if search not in SEARCHES:
        raise ConfigError("--search", f"got {search!r}; allowed: {list(SEARCHES)}")
    _check_scheduler(scheduler)
    for field, value, low in (("--trials", trials, 1), ("--max-concurrent", max_concurrent, 1),
                              ("--grace-period", grace_period, 1)):
        if value < low:
            raise ConfigError(field, f"got {value}; must be >= {low}")
    if reduction_factor <= 1:
        raise ConfigError("--reduction-factor", f"got {reduction_factor}; must be > 1")

    overrides: dict[str, Any] = {}
    if workers_per_trial is not None:
        overrides["train.workers"] = workers_per_trial
    if gpus_per_trial is not None:
        workers = workers_per_trial if workers_per_trial is not None else base_cfg.train.workers
        overrides["train.gpus_per_worker"] = gpus_per_trial / max(workers, 1)
    cfg = config_from_dict(apply_overrides(base_cfg.to_dict(), overrides)) if overrides else base_cfg
    space = validate_space(space, cfg) if isinstance(space, SearchSpace) else load_space(space, cfg)
    _check_trial_workers(cfg, space, workers_per_trial is not None)
    _check_no_time_budget(cfg, space)
    if scheduler == "pbt":
        check_pbt(space, cfg, search, perturbation_interval, quantile_fraction)

    from orchestrator.train import prepare_data, steps_per_epoch

    cfg, meta = prepare_data(cfg)  # once, here, not racing in every trial
    steps_per_epoch(cfg, meta)
    name = name or f"{cfg.name}-{space.name}"
    exp_path = _join(storage, name)
    from ray.tune import Tuner

    if Tuner.can_restore(exp_path) or _read_text(_join(exp_path, META_FILE)) is not None:
        raise ConfigError("--name", f"a sweep named {name!r} already exists in {storage}; continue it with "
                                    f"--resume {name}, or pick another --name")
    uri = tracking.resolve_tracking_uri(tracking_uri or cfg.tracking.tracking_uri)
    settings = SweepSettings(name=name, trials=trials, scheduler=scheduler, search=search,
                             max_concurrent=max_concurrent, grace_period=grace_period,
                             reduction_factor=reduction_factor, perturbation_interval=perturbation_interval,
                             quantile_fraction=quantile_fraction, driver_cpus=driver_cpus, seed=seed,
                             storage_path=storage, tracking_uri=uri, experiment=cfg.tracking.experiment)
    base = cfg.to_dict()
    experiment_id = tracking.ensure_experiment(uri, settings.experiment)
    parent = tracking.create_run(uri, settings.experiment, name, tracking.run_tags(cfg.method_name, {
        TAG_ROLE: "sweep", TAG_SWEEP: name, tracking.TAG_STORAGE: exp_path}))
    tracking.log_params(uri, parent, {
        "space": space.name, "scheduler": scheduler, "search": search, "trials": trials,
        "num_samples": num_samples(space, trials, search), "max_concurrent": max_concurrent,
        "workers_per_trial": cfg.train.workers, "gpus_per_worker": cfg.train.gpus_per_worker,
        "grace_period": grace_period, "reduction_factor": reduction_factor, "seed": seed, "metric": METRIC,
        **({"perturbation_interval": perturbation_interval, "quantile_fraction": quantile_fraction}
           if scheduler == "pbt" else {}),
        "base_config": cfg.name, "epochs": cfg.optim.epochs})
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "space.yaml").write_text(yaml.safe_dump(space.to_dict(), sort_keys=False))
        Path(tmp, "base_config.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
        tracking.log_artifacts(uri, parent, tmp)
    meta_doc = {"format": 1, "settings": dataclasses.asdict(settings), "base": base, "space": space.to_dict(),
                "parent_run_id": parent, "experiment_id": experiment_id}
    _write_text(_join(exp_path, META_FILE), json.dumps(meta_doc, indent=1, sort_keys=True))
    print(f"sweep {name}: {exp_path}; MLflow parent run {parent} ({uri})", flush=True)
    return _fit(meta_doc, exp_path, address, restore=None)


def _resume(storage: str, name: str, tracking_uri: str | None, resume_errored: bool,
            address: str | None) -> dict[str, Any]:
    exp_path = _join(storage, name)
    text = _read_text(_join(exp_path, META_FILE))
    if text is None:
        known = sorted(p.parent.name for p in Path(storage).glob(f"*/{META_FILE}")) if not is_uri(storage) else []
        raise ConfigError("--resume", f"no sweep named {name!r} in {storage}; known sweeps: {known}")
    meta_doc = json.loads(text)
    if tracking_uri:
        meta_doc["settings"]["tracking_uri"] = tracking.resolve_tracking_uri(tracking_uri)
    uri = meta_doc["settings"]["tracking_uri"]
    tracking.reopen_run(uri, meta_doc["parent_run_id"])
    tracking.log_tags(uri, meta_doc["parent_run_id"], {"bamray.sweep_status": "resumed"})
    print(f"resuming sweep {name} from {exp_path}", flush=True)
    return _fit(meta_doc, exp_path, address, restore={"resume_errored": resume_errored})


def _fit(meta_doc: dict[str, Any], exp_path: str, address: str | None, restore: dict | None) -> dict[str, Any]:
    from ray import tune

    from orchestrator.reaper import start_reaper

    settings = SweepSettings(**meta_doc["settings"])
    base, parent, experiment_id = meta_doc["base"], meta_doc["parent_run_id"], meta_doc["experiment_id"]
    space = space_from_dict(meta_doc["space"])
    cfg = config_from_dict(base)
    uri = settings.tracking_uri
    ctx = _driver_context(base, space, settings, parent, experiment_id, exp_path)
    started = _connect_ray(address, cfg, settings)
    reaper = start_reaper(ctx["reaper"])
    try:
        trainable = _trainable(ctx, settings)
        if restore is not None:
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=restore["resume_errored"])
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=space.to_tune(settings.search),
                tune_config=tune.TuneConfig(
                    metric=METRIC, mode=MODE, scheduler=_scheduler(settings, cfg.optim.epochs, space),
                    search_alg=_search_alg(settings), num_samples=num_samples(space, settings.trials, settings.search),
                    # random/grid: the limit lives in the BasicVariantGenerator (see _search_alg);
                    # optuna: Tune wraps the Searcher in a ConcurrencyLimiter.
                    max_concurrent_trials=settings.max_concurrent if settings.search == "optuna" else None,
                    trial_dirname_creator=_trial_dirname),
                run_config=tune.RunConfig(
                    name=settings.name, storage_path=settings.storage_path,
                    failure_config=tune.FailureConfig(max_failures=0),
                    # Tune-level checkpoints exist only under PBT (copies of Train checkpoints). Ray warns that
                    # <= 2 can delete a donor's checkpoint before a slower trial has cloned it.
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=4),
                    callbacks=[_tune_callback_cls()(uri, experiment_id, parent, base)]),
            )
        if settings.scheduler == "pbt" and settings.seed is not None:
            import random

            random.seed(settings.seed)  # Tune's PBT draws its exploit/explore choices from `random`
        t0 = time.perf_counter()
        tuner.fit()
        wall = time.perf_counter() - t0
    except BaseException as err:
        tracking.log_tags(uri, parent, {"bamray.sweep_status": "crashed"})
        tracking.finish_run(uri, parent, "FAILED", f"{type(err).__name__}: {err}")
        raise
    finally:
        import ray

        try:
            ray.get(reaper.settle.remote(), timeout=60)  # the groups of trials Tune killed on its way out
            ray.kill(reaper)
        except Exception as err:  # noqa: BLE001 - cleanup must not hide why the sweep ended
            print(f"sweep {settings.name}: placement-group reaper: {type(err).__name__}: {err}", flush=True)
        if started:
            ray.shutdown()

    children = _child_runs(uri, experiment_id, parent)
    rows = _results(exp_path, base, space, children)
    for r in rows:  # statuses the callback could not write (actor killed, store busy, restored trials)
        run = children.get(r["trial_id"])
        if run is None:
            continue
        if r["status"] == "completed" and r["checkpoint_path"] and not _has_artifact(uri, run.info.run_id, "final"):
            # ASHA may stop a trial on its LAST report when a rung falls on the final epoch: it trained its
            # whole budget but its driver was torn down before logging the exported backbone.
            _log_final_artifacts(uri, run.info.run_id, r["checkpoint_path"])
        if r["status"] != "unfinished":
            _mark_child(uri, tracking.client(uri).get_run(run.info.run_id), r["status"])
        else:  # interrupted mid-run: KILLED until `--resume` re-opens it
            tracking.log_tags(uri, run.info.run_id, {TAG_TRIAL_STATUS: "interrupted"})
            if run.info.status != "KILLED":
                tracking.finish_run(uri, run.info.run_id, "KILLED")
    # A search algorithm that respects max_concurrent creates trials lazily: an interrupted sweep may have
    # fewer trials than planned, all of them finished (the rest exist only in the searcher's saved state).
    interrupted = any(r["status"] == "unfinished" for r in rows) or len(rows) < expected_trials(space, settings)
    best = _finish_parent(uri, parent, rows, space, interrupted)
    tracking.log_metrics(uri, parent, {"sweep_wall_time_s": wall}, step=0)
    out = {
        "name": settings.name, "experiment_path": exp_path, "parent_run_id": parent, "tracking_uri": uri,
        "best_config": dict(best["params"]) if best else None, "best_metric": best["knn_top1"] if best else None,
        "best_trial_id": best["trial_id"] if best else None, "trials": rows,
        "total_trial_epochs": sum(r["epochs"] for r in rows), "interrupted": interrupted, "wall_time_s": wall,
    }
    _print_summary(out, space)
    return out


def _print_summary(out: dict[str, Any], space: SearchSpace) -> None:
    print("\n" + results_markdown(out["trials"], list(space.params)))
    if out["interrupted"]:
        print(f"sweep {out['name']} interrupted; continue it with `bamray sweep --resume {out['name']}`")
    elif out["best_config"] is not None:
        print(f"best knn_top1 {out['best_metric']:.2f} % with {out['best_config']} (trial {out['best_trial_id']})")
    print(f"MLflow parent run {out['parent_run_id']} ({out['tracking_uri']}); Tune results in {out['experiment_path']}")


# ================================================================================================ CLI
def cmd_sweep(args: argparse.Namespace) -> int:
    """``bamray sweep``: 0 = finished with a best trial, 1 = interrupted or no trial produced a score."""
    if args.resume:
        out = run_sweep(None, None, storage_path=args.storage_path, name=args.resume, tracking_uri=args.tracking_uri,
                        resume=True, resume_errored=args.resume_errored, address=args.address)
    else:
        if not args.config or not args.space:
            raise ConfigError("--config" if not args.config else "--space", "required for a new sweep")
        overrides = list(args.set or [])
        if args.tracking_uri:
            overrides.append(f"tracking.tracking_uri={args.tracking_uri}")
        cfg = load_config(args.config, overrides)
        out = run_sweep(cfg, args.space, trials=args.trials, scheduler=args.scheduler, search=args.search,
                        max_concurrent=args.max_concurrent, workers_per_trial=args.workers_per_trial,
                        gpus_per_trial=args.gpus_per_trial, storage_path=args.storage_path, name=args.name,
                        tracking_uri=args.tracking_uri, grace_period=args.grace_period,
                        reduction_factor=args.reduction_factor, perturbation_interval=args.perturbation_interval,
                        quantile_fraction=args.quantile_fraction, seed=args.seed, address=args.address)
    return 0 if (out["best_config"] is not None and not out["interrupted"]) else 1


def add_sweep_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bamray sweep`` on the CLI's subparsers."""
    s = subparsers.add_parser(
        "sweep", help="hyper-parameter sweep with Ray Tune (one Ray Train run per trial), tracked in MLflow",
        description="Ray Tune sweep: each trial fits a Ray Train run of the base config plus sampled params; "
                    "the sweep is a parent MLflow run, every trial a child run. Spaces: search_spaces/*.yaml "
                    "names or a YAML path.")
    s.add_argument("--config", help="base config (shipped name or YAML path)")
    s.add_argument("--space", help="search space: shipped name (bam_sinkhorn, dino, byol, simclr, mae) or YAML path")
    s.add_argument("--trials", type=int, default=8, help="trials (grid search: repeats of the grid to reach it)")
    s.add_argument("--scheduler", choices=SCHEDULERS, default="asha",
                   help="asha = early stopping on knn_top1 per epoch; pbt = population based training "
                        "(synchronous; bottom trials clone top trials' checkpoints, params perturbed); fifo = none")
    s.add_argument("--search", choices=SEARCHES, default="random",
                   help="random sampling, optuna TPE, or grid over the discrete params")
    s.add_argument("--max-concurrent", type=int, default=2, help="trials running at once")
    s.add_argument("--workers-per-trial", type=int, help="Ray Train workers per trial (train.workers)")
    s.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, split over its workers")
    s.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    s.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA: keep the top 1/rf at each rung")
    s.add_argument("--perturbation-interval", type=int, default=1,
                   help="PBT: epochs between exploit/explore steps (a multiple of train.checkpoint_freq)")
    s.add_argument("--quantile-fraction", type=float, default=0.25,
                   help="PBT: share of trials that clone a top trial (and of top trials they clone from)")
    s.add_argument("--seed", type=int,
                   help="seed of the search algorithm and of PBT's choices (reproducible sampled params)")
    s.add_argument("--storage-path", help="Tune/Train storage: local path or s3:// / gs:// URI "
                                          "(default: train.storage_path of the config)")
    s.add_argument("--name", help="sweep name (default: <config name>-<space name>); must be new")
    s.add_argument("--resume", metavar="NAME", help="continue an interrupted sweep; finished trials are not rerun")
    s.add_argument("--resume-errored", action="store_true", help="with --resume: also retry errored trials")
    s.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else .bamray/mlflow.db)")
    s.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a base-config field")
    s.set_defaults(func=cmd_sweep)
    return s
