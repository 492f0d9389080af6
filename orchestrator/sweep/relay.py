"""The Train -> Tune relay: a trial driver fits its Ray Train run while reporting every epoch to Tune.

Ray's own ``ray.tune.integration.ray_train.TuneReportCallback`` reports metrics from the Train controller;
ours (:func:`relay_callback`) also carries the checkpoint objects PBT clones, and the trial driver opens
the epoch gate (:mod:`orchestrator.epoch_gate`) once Tune has decided on a rung."""

from __future__ import annotations

import threading
from typing import Any

from orchestrator import tracking
from orchestrator.config import ExperimentConfig
from orchestrator.sweep.collapse import (
    STOP_FLAG,
    TAG_STOP_REASON,
    TAG_STOPPED,
    CollapseWatch,
    decision_epochs,
)
from orchestrator.sweep.plan import TrialPlan
from orchestrator.sweep.settings import TIME_ATTR


def relay_callback(queue: Any, with_checkpoint: bool) -> Any:
    """A ``TuneReportRelay``, its class built here (Ray import). It runs in the Train controller and
    forwards each report's rank-0 metrics (with ``checkpoint_path``) and, for PBT, the checkpoint itself to
    the trial driver, which hands them to Tune. PBT clones Tune-level checkpoints; the other schedulers
    need the metrics only, and reporting the checkpoint to Tune would store it a second time in the trial's
    directory."""
    from ray.train import UserCallback

    class TuneReportRelay(UserCallback):
        def __init__(self, queue: Any, with_checkpoint: bool):
            self.queue, self.with_checkpoint = queue, with_checkpoint

        def after_report(self, run_context: Any, metrics: list, checkpoint: Any) -> None:
            item = dict(metrics[0])
            if item.get("mid_epoch"):  # a checkpoint inside an epoch: for resuming, not a result to judge
                return
            if checkpoint is not None:
                item["checkpoint_path"] = checkpoint.path
            self.queue.put((item, checkpoint if self.with_checkpoint else None))

    return TuneReportRelay(queue, with_checkpoint)


def fit_reporting_to_tune(
    cfg: ExperimentConfig,
    train_name: str,
    plan: TrialPlan,
    run_id: str,
    *,
    init: Any = None,
    stop_after_epoch: int | None = None,
) -> Any:
    """``trainer.fit()`` in a thread while this (the trial's) thread reports every relayed epoch to Tune:
    ``ray.tune.report`` must run in the trial's own thread, and it returns only once Tune asks for the
    next result, i.e. once the scheduler decided to go on, which must not stall training. Except at the
    plan's ``gate_epochs`` (ASHA's rungs) and the epochs where the collapse watch may stop the trial: there
    the workers wait (:mod:`orchestrator.epoch_gate`), so a trial the scheduler or the watch stops trains
    no further than the epoch it was judged on. At a rung they wait for that return; at a watch's epoch
    only for this thread to see the report, and for Tune only when the watch fired (the stop is then
    certain, the wait ends with the trial), so a healthy trial pays no Tune round trip there."""
    from ray import tune
    from ray.exceptions import RayActorError
    from ray.util.queue import Queue

    from data.run_actors import on_this_node
    from orchestrator.epoch_gate import EpochGate, GatedEpochs
    from orchestrator.reaper import watch_current_actor
    from orchestrator.training.driver import build_trainer

    queue = Queue(actor_options={"num_cpus": 0})
    gated = frozenset(plan.gate_epochs) | decision_epochs(cfg, plan.collapse)
    gate = EpochGate.options(scheduling_strategy=on_this_node()).remote() if gated else None
    trainer = build_trainer(
        cfg,
        run_name=train_name,
        storage_path=plan.train_storage,
        mlflow_run_id=run_id,
        tracking_uri=plan.tracking_uri,
        callbacks=[relay_callback(queue, plan.relays_checkpoints)],
        init_checkpoint=init,
        stop_after_epoch=stop_after_epoch,
        pg_watch=watch_current_actor(plan.reaper_name),
        epoch_gate=GatedEpochs(gate, gated) if gate is not None else None,
        label=train_name.removeprefix("train-"),
    )
    box: dict[str, Any] = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - re-raised in the trial's thread below
            box["error"] = err
        finally:
            try:
                queue.put(None)
            except RayActorError:  # the queue went with a trial Tune stopped: no one waits on it
                pass

    thread = threading.Thread(target=fit, name="bamray-train-fit", daemon=True)
    thread.start()
    watch = CollapseWatch(*plan.collapse) if plan.collapse else None
    while (item := queue.get()) is not None:
        metrics, checkpoint = item
        reason = watch.see(metrics) if watch is not None else None
        if reason is not None:  # tagged before Tune acts on it: the reason survives the teardown
            tracking.log_tags(plan.tracking_uri, run_id, {TAG_STOPPED: "collapse", TAG_STOP_REASON: reason})
            print(f"[bamray] stopping trial: {reason}", flush=True)
            metrics = {**metrics, STOP_FLAG: 1.0}
        epoch = int(metrics.get(TIME_ATTR) or 0)
        if gate is not None and reason is None and epoch not in plan.gate_epochs:
            gate.release.remote(epoch)  # the watch held them here and did not fire: no need to wait for Tune
        tune.report(metrics, checkpoint=checkpoint)
        if gate is not None:
            gate.release.remote(epoch)
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
