"""The sweep's MLflow lineage: one PARENT run per sweep, one CHILD run per trial, and their statuses.

Statuses: FINISHED for trials that ran every epoch; KILLED + ``bamray.trial_status=stopped_early`` for
trials the scheduler stopped (they did nothing wrong, so not FAILED); FAILED for errored trials. A trial
stopped by the scheduler loses its actor abruptly, so its status is written by the sweep's own process
(:class:`SweepLineageCallback`, built by :func:`lineage_callback`) and reconciled once more at the end
(:mod:`orchestrator.sweep.report`)."""

from __future__ import annotations

from typing import Any

from orchestrator import fault_injection, tracking
from orchestrator.sweep.plan import trial_epochs
from orchestrator.sweep.settings import TIME_ATTR

TAG_ROLE, TAG_SWEEP, TAG_TRIAL_ID, TAG_TRIAL_STATUS = (
    "bamray.role",
    "bamray.sweep",
    "bamray.trial_id",
    "bamray.trial_status",
)
TAG_PARENT = "mlflow.parentRunId"
TAG_SWEEP_STATUS = "bamray.sweep_status"
#: One tag per Ray Train run of a PBT trial (its params and start), MLflow params being immutable.
TAG_RAY_RUN_PREFIX = "bamray.pbt.train_run."
OUTCOMES = ("completed", "stopped_early", "failed", "unfinished")
_MLFLOW_STATUS = {
    "completed": "FINISHED",
    "stopped_early": "KILLED",
    "failed": "FAILED",
    "unfinished": "KILLED",
}


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


def child_runs(uri: str, experiment_id: str, parent_run_id: str) -> dict[str, Any]:
    """trial id -> MLflow run of every child of the sweep's parent run."""
    c = tracking.client(uri)
    runs = tracking.with_retry(
        c.search_runs,
        [experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'",
        max_results=5000,
    )
    return {r.data.tags.get(TAG_TRIAL_ID): r for r in runs if r.data.tags.get(TAG_TRIAL_ID)}


def mark_child(uri: str, run: Any, outcome: str, reason: str | None = None) -> None:
    """Write the child's final status and ``bamray.trial_status`` unless it already says so."""
    status = _MLFLOW_STATUS[outcome]
    if run.data.tags.get(TAG_TRIAL_STATUS) != outcome:
        tracking.log_tags(uri, run.info.run_id, {TAG_TRIAL_STATUS: outcome})
    if run.info.status != status:
        tracking.finish_run(uri, run.info.run_id, status, reason if outcome == "failed" else None)


def mark_interrupted(uri: str, run: Any) -> None:
    """A child whose trial was cut off mid-run: KILLED until ``--resume`` re-opens it."""
    tracking.log_tags(uri, run.info.run_id, {TAG_TRIAL_STATUS: "interrupted"})
    if run.info.status != "KILLED":
        tracking.finish_run(uri, run.info.run_id, "KILLED")


def lineage_callback(uri: str, experiment_id: str, parent_run_id: str, base_epochs: int) -> Any:
    """A :class:`SweepLineageCallback`, its class built here because ``ray.tune.Callback`` must not be
    imported by ``bamray sweep --help``."""
    from ray import tune

    class SweepLineageCallback(tune.Callback):
        """Runs in the sweep's process: writes the MLflow status of trials that end without their driver
        being able to (scheduler stops). Plain data only (it is pickled into the experiment state and
        comes back on restore)."""

        def __init__(self, uri: str, experiment_id: str, parent_run_id: str, base_epochs: int):
            self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
            self.base_epochs = base_epochs
            self.ended = 0

        def _finalise(self, trial: Any, errored: bool) -> None:
            status = "ERROR" if errored else "TERMINATED"
            outcome = trial_outcome(status, trial.last_result, trial_epochs(trial.config, self.base_epochs))
            try:
                run = child_runs(self.uri, self.experiment_id, self.parent_run_id).get(trial.trial_id)
                if run is not None:
                    mark_child(self.uri, run, outcome, "trial errored; see the Tune trial's error.txt")
            except Exception as err:  # noqa: BLE001 - lineage must not kill the sweep; reconciled at the end
                print(f"bamray sweep: could not mark trial {trial.trial_id} in MLflow yet: {err}", flush=True)
            self.ended += 1
            fault_injection.interrupt_sweep_after(self.ended)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._finalise(trial, errored=False)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._finalise(trial, errored=True)

    return SweepLineageCallback(uri, experiment_id, parent_run_id, base_epochs)
