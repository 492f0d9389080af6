"""One Tune trial: the driver function that turns a sampled config into a Ray Train run.

Why a driver function and not ``Tuner(TorchTrainer)``: Train V2 (Ray >= 2.51) no longer runs as a Tune
trainable. Each trial runs :func:`trial_driver` (a fraction of a CPU), which builds the experiment config
from the plan's base config plus the sampled params, opens a CHILD MLflow run of the sweep's run, and fits
one Ray Train run named ``train-<trial_id>`` through :func:`orchestrator.sweep.relay.fit_reporting_to_tune`.
On resume the same deterministic name makes Ray Train continue from its last checkpoint, and the child
run is found by tag and re-opened.

PBT: the driver relays every Train checkpoint to Tune; a restarted driver (``ray.tune.get_checkpoint()``
set) starts a NEW Train run named ``train-<trial_id>-<hash of that checkpoint>`` whose workers load it
(``init_checkpoint``), one run per stretch between perturbation points (:func:`pbt_segments`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from orchestrator import provenance, tracking
from orchestrator.config import ExperimentConfig, config_from_dict
from orchestrator.console import say
from orchestrator.sweep.lineage import (
    TAG_PARENT,
    TAG_RAY_RUN_PREFIX,
    TAG_ROLE,
    TAG_SWEEP,
    TAG_TRIAL_ID,
    TAG_TRIAL_STATUS,
    child_runs,
)
from orchestrator.sweep.plan import TrialPlan, trial_params
from orchestrator.sweep.relay import fit_reporting_to_tune
from orchestrator.training.summary import log_description, what_line


class NonFiniteTrialError(RuntimeError):
    """The trial's loss went NaN/Inf: the Tune trial errors (FAILED), it was not stopped by the scheduler."""


def trial_driver(config: dict[str, Any], plan: TrialPlan) -> None:
    """One Tune trial: child MLflow run + one Ray Train run (``train-<trial_id>``) fitted to the end (PBT: one
    Train run per stretch between perturbation points, see :func:`pbt_segments`).

    Runs inside the trial's actor (cwd = the trial directory, hence absolute paths everywhere)."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    params, merged = trial_params(config, plan.base.to_dict(), plan.space)
    cfg = config_from_dict(merged)  # a bad combination errors this trial with the field named
    init = tune.get_checkpoint() if plan.relays_checkpoints else None
    train_name = train_run_name(trial_id, init)
    run_id = _open_child_run(plan, trial_id, cfg, params, train_name)
    say(f"{_what(cfg, plan, trial_id, params).split(':')[0]}: started, MLflow run {run_id}")
    try:
        if plan.relays_checkpoints:
            result = pbt_segments(cfg, trial_id, params, plan, run_id, init)
        else:
            result = fit_reporting_to_tune(cfg, train_name, plan, run_id)
        _record_completed(plan.tracking_uri, run_id, result, _what(cfg, plan, trial_id, params))
    except Exception as err:
        # A trial the scheduler stopped (ASHA can stop one on its final report, when a rung falls on the last
        # epoch) surfaces here as the Train controller dying with the trial's placement group, and this
        # thread may still run after the sweep process recorded the trial's outcome: that outcome stands.
        if not _torn_down_by_tune(err):
            _record_failed(plan.tracking_uri, run_id, err)
        raise


def _open_child_run(
    plan: TrialPlan, trial_id: str, cfg: ExperimentConfig, params: dict[str, Any], train_name: str
) -> str:
    """The trial's child run: re-opened when a resumed trial already has one, else created with its params."""
    uri = plan.tracking_uri
    existing = child_runs(uri, plan.experiment_id, plan.parent_run_id).get(trial_id)
    if existing is not None:
        return tracking.reopen_run(uri, existing.info.run_id).info.run_id
    tags = provenance.run_tags(
        cfg.method_name,
        {
            TAG_PARENT: plan.parent_run_id,
            TAG_ROLE: "trial",
            TAG_SWEEP: plan.sweep_name,
            TAG_TRIAL_ID: trial_id,
            tracking.TAG_RAY_RUN: train_name,
            tracking.TAG_STORAGE: plan.train_storage,
        },
    )
    run_id = tracking.create_run(uri, plan.experiment, f"{plan.sweep_name}-{trial_id}", tags)
    tracking.log_params(uri, run_id, cfg.run_params())
    tracking.log_tags(uri, run_id, {"bamray.sampled": json.dumps(params, sort_keys=True)})
    tracking.log_config_artifact(uri, run_id, cfg)
    log_description(uri, run_id, _what(cfg, plan, trial_id, params))
    return run_id


def _what(cfg: ExperimentConfig, plan: TrialPlan, trial_id: str, params: dict[str, Any]) -> str:
    sampled = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return f"trial {trial_id} of sweep {plan.sweep_name} ({sampled}): {what_line(cfg)}"


def _record_completed(uri: str, run_id: str, result: Any, what: str) -> None:
    """Final and best backbones, ``best_knn_top1``, the description with its k-NN, status FINISHED; a NaN
    run raises instead."""
    ret = result.return_value or {}
    if ret.get("status") == "nan":
        raise NonFiniteTrialError(ret.get("reason", "non-finite loss"))
    tracking.log_checkpoint_artifacts(uri, run_id, result.checkpoint, "final")
    best, best_score = tracking.best_checkpoint(result)
    if best is not None:
        tracking.log_checkpoint_artifacts(uri, run_id, best, "best_knn")
        tracking.log_metrics(uri, run_id, {"best_knn_top1": best_score}, step=int(ret.get("final_step", 0)))
    log_description(uri, run_id, what, result)
    knn = (result.metrics or {}).get("knn_top1")
    say(f"{what.split(':')[0]}: completed" + (f", k-NN top-1 {knn:.2f} %" if knn is not None else ""))
    tracking.log_tags(uri, run_id, {TAG_TRIAL_STATUS: "completed"})
    tracking.finish_run(uri, run_id, "FINISHED")


def _record_failed(uri: str, run_id: str, err: BaseException) -> None:
    """FAILED, unless the sweep's process already recorded the trial as stopped early or completed."""
    current = tracking.with_retry(tracking.client(uri).get_run, run_id)
    if current.data.tags.get(TAG_TRIAL_STATUS) not in ("stopped_early", "completed"):
        tracking.log_tags(uri, run_id, {TAG_TRIAL_STATUS: "failed"})
        tracking.finish_run(uri, run_id, "FAILED", f"{type(err).__name__}: {err}")


def _torn_down_by_tune(err: BaseException) -> bool:
    """The trial's actors were removed by Tune (scheduler stop, sweep end), not a failure of the trial."""
    from ray.exceptions import ActorDiedError

    return isinstance(err, ActorDiedError) and "placement group was removed" in str(err)


def train_run_name(trial_id: str, init: Any) -> str:
    """``train-<trial>`` from scratch; a run started from a Tune checkpoint gets that checkpoint's hash:
    reusing a name would make Ray Train resume that run's own latest checkpoint instead."""
    return f"train-{trial_id}" + (f"-{hashlib.sha1(init.path.encode()).hexdigest()[:8]}" if init else "")


def pbt_segments(
    cfg: ExperimentConfig, trial_id: str, params: dict[str, Any], plan: TrialPlan, run_id: str, init: Any
) -> Any:
    """A PBT trial: one Train run per stretch between perturbation points, each ending WITH the epoch
    PBT decides on. Training never runs past a decision, so an exploited trial has no abandoned epochs
    in its curves. If Tune lets the trial go on, the next stretch starts from the checkpoint just made;
    if it pauses it (synchronous PBT always does), the actor is stopped while reporting, and Tune restarts
    the driver later from whichever checkpoint PBT chose (:func:`trial_driver`)."""
    uri, interval = plan.tracking_uri, int(plan.pbt_interval or 1)
    while True:
        start = _checkpoint_epoch(init)
        stop = min(cfg.optim.epochs, (start // interval + 1) * interval)
        name = train_run_name(trial_id, init)
        # MLflow params are immutable: the params each Train run used are a tag + one curve per param.
        tracking.log_tags(
            uri,
            run_id,
            {
                TAG_RAY_RUN_PREFIX + name: json.dumps(
                    {"params": params, "from_epoch": start, "init_checkpoint": init.path if init else None},
                    sort_keys=True,
                ),
                tracking.TAG_RAY_RUN: name,
            },
        )
        numeric = {f"param.{k}": float(v) for k, v in params.items() if isinstance(v, (int, float))}
        if numeric:
            tracking.log_metrics(uri, run_id, numeric, step=start)
        result = fit_reporting_to_tune(cfg, name, plan, run_id, init=init, stop_after_epoch=stop)
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
