"""Stopping collapsed trials, and which metrics a sweep may optimise.

A collapsed encoder maps every image to (nearly) the same vector: the per-dimension std of its
L2-normalised embeddings, scaled by sqrt(d) (``std_norm``: ~1 for isotropic features, 0 for a single
point), falls towards 0, and no later epoch brings it back. The trial's driver watches its own reports
(:class:`CollapseWatch`); when the watched signal stays below the threshold for ``patience`` evaluations
in a row it tags the trial's MLflow run ``stopped: collapse`` with the figures, then marks the report, and
:func:`collapse_stopper` (a Tune ``Stopper``) stops the trial on it. The tag is written before Tune acts,
so the reason survives the trial's teardown.

Tune stops a trial asynchronously: its Train workers do not wait for the verdict, and on short epochs a
collapsed trial trained (and logged to MLflow) another epoch before it was killed. So the workers hold at
the epochs where the watch can fire (:func:`decision_epochs`, through the trial's epoch gate,
:mod:`orchestrator.epoch_gate`): a stopped trial trains no further than the epoch it was judged on, as with
ASHA's rungs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from trainers.options import ConfigError

#: the report flag the trial driver sets and the stopper reads
STOP_FLAG = "collapse_stop"
#: the reason tag on the trial's MLflow run
TAG_STOPPED, TAG_STOP_REASON = "stopped", "bamray.stop_reason"
#: label-free signals of the eval backbone (``*_proj``: of its projection head) logged every evaluation
SIGNALS = ("rankme", "std", "std_norm", "align", "uniform")
PAIR_SIGNALS = ("align", "uniform")  # need two views per image (data.global_crops >= 2)


@dataclasses.dataclass
class CollapseWatch:
    """Counts evaluations in a row whose ``metric`` is below ``threshold``; epochs without the metric
    (no evaluation) neither extend nor break the streak. An epoch reported again (a worker group restarted
    from an earlier checkpoint trains it again) replaces its first report and forgets the later ones, so a
    repeat never counts twice."""

    metric: str = "std_norm"
    threshold: float = 0.05
    patience: int = 2
    low: dict[int, bool] = dataclasses.field(default_factory=dict)  #: epoch -> below the threshold

    @property
    def streak(self) -> int:
        """Low reports in a row, back from the latest epoch."""
        streak = 0
        for epoch in sorted(self.low, reverse=True):
            if not self.low[epoch]:
                break
            streak += 1
        return streak

    def see(self, metrics: dict[str, Any]) -> str | None:
        """The stop reason once the streak reaches ``patience``, else None."""
        value = metrics.get(self.metric)
        if value is None or self.threshold <= 0:
            return None
        epoch = int(metrics.get("epoch") or max(self.low, default=0) + 1)
        self.low = {e: v for e, v in self.low.items() if e < epoch}
        self.low[epoch] = float(value) < self.threshold
        if self.streak < self.patience:
            return None
        return (
            f"collapse: {self.metric} {float(value):.4g} < {self.threshold:g} for {self.streak} "
            f"evaluations in a row (epoch {metrics.get('epoch')})"
        )


def decision_epochs(cfg: Any, collapse: tuple[str, float, int] | None) -> set[int]:
    """1-based epochs after which a trial's workers wait because the collapse watch ``collapse`` =
    ``(metric, threshold, patience)`` may stop the trial there: the epochs that report the metric
    (evaluation epochs for an evaluation metric, else every epoch) from the ``patience``-th on, not the last
    (nothing trains after it). None when the watch is off or the runs never log the metric. A time budget
    that shortens the run only drops some of these epochs (the workers hold at reached ones only)."""
    from orchestrator.training.plan import knn_epochs

    if collapse is None or collapse[1] <= 0:
        return set()
    metric, patience = collapse[0], max(collapse[2], 1)
    if metric in evaluation_metrics(cfg, labelled=True):
        reporting = sorted(knn_epochs(cfg))
    elif metric in logged_metrics(cfg, labelled=True):
        reporting = list(range(1, cfg.optim.epochs + 1))
    else:
        return set()
    return set(reporting[patience - 1 :]) - {cfg.optim.epochs}


def collapse_stopper() -> Any:
    """A Tune ``Stopper`` that stops the trials whose driver flagged a collapse (class built here: Ray import)."""
    from ray.tune import Stopper

    class CollapseStopper(Stopper):
        def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
            return bool(result.get(STOP_FLAG))

        def stop_all(self) -> bool:
            return False

    return CollapseStopper()


def logged_metrics(cfg: Any, labelled: bool) -> list[str]:
    """Every per-epoch metric a run of ``cfg`` reports to Tune: the loss, the k-NN when a labelled set is
    there, the label-free signals (``*_proj`` when the method has a projection head), the method's own
    epoch means."""
    return ["loss", *evaluation_metrics(cfg, labelled), *_method_epoch_logs(cfg)]


def evaluation_metrics(cfg: Any, labelled: bool) -> list[str]:
    """The metrics of evaluation epochs only (every ``eval.knn_freq`` epochs and the last one)."""
    from trainers.methods import get_method

    names = ["knn_top1", "knn_top5"] if labelled else []
    if cfg.eval.signal_samples > 0:
        kinds = [""] + (["_proj"] if get_method(cfg.method_name).has_projection_head else [])
        pair = cfg.data.global_crops >= 2
        names += [f"{s}{k}" for k in kinds for s in SIGNALS if pair or s not in PAIR_SIGNALS]
    return names


def _method_epoch_logs(cfg: Any) -> list[str]:
    from trainers.methods import get_method

    logs = get_method(cfg.method_name).epoch_logs
    return [k for k in logs if cfg.data.local_crops > 0 or not k.endswith("_local")]


def check_metric(metric: str, mode: str, cfg: Any, labelled: bool, field: str = "--metric") -> None:
    """Refuse, before launch, a metric the trials would never report (a Tune sweep would otherwise fail
    every trial at its first report, or run it to its end and find no result)."""
    if mode not in ("max", "min"):
        raise ConfigError("--mode", f"got {mode!r}; allowed: ['max', 'min']")
    known = logged_metrics(cfg, labelled)
    if metric not in known:
        no_labels = not labelled and metric.startswith("knn")
        why = " (the data set has no labels: set eval.dataset)" if no_labels else ""
        raise ConfigError(field, f"got {metric!r}{why}; runs of this config log: {known}")
    if field == "--metric" and cfg.eval.knn_freq != 1 and metric in evaluation_metrics(cfg, labelled):
        # Tune needs the metric in every report; a stop watch (--collapse-metric) just waits for it
        raise ConfigError(
            "eval.knn_freq",
            f"got {cfg.eval.knn_freq}; --metric {metric} is measured on evaluation epochs only, and Ray "
            "Tune needs it in every epoch's report: set eval.knn_freq=1",
        )
