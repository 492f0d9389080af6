"""Where a training run's metrics appear in the MLflow UI, decided in one place.

Code and Ray Tune use flat names (``knn_top1``, ``loss``: what a sweep's ``--metric`` names); MLflow
gets them grouped. MLflow's run page (3.x) sections a run's charts by the part of the name before the
first ``/``, sections in alphabetical order, and the ungrouped names last under "Model metrics". So:

- ``eval/``: what a researcher looks at first: k-NN (beside raw pixels), the best k-NN, the linear probe;
- ``train/``: the objective and the optimiser: loss, lr, weight decay, momentum, gradient norm, speed;
- ``train_signals/``: label-free signals on the features (RankMe, std, alignment / uniformity) and the
  method's own diagnostics (BAM's entropies), the collapse early-warnings;
- everything else (timings, data waits, ``epoch``) stays flat, at the bottom; MLflow's own system
  metrics keep their ``system/`` tab.

Every writer goes through :func:`mlflow_key` (the worker's :class:`~orchestrator.tracking.MetricLogger`
and :func:`~orchestrator.tracking.log_metrics`), and every reader asks it for the name it stored.
"""

from __future__ import annotations

#: Ray Train ranks checkpoints by this metric of every report (k-NN top-1 when evaluated, -1 otherwise):
#: the latest checkpoint is always kept for resume, the best one for the "best_knn" artifact. Here, not with
#: the checkpoint code (torch), because the driver names it to Ray Train without importing torch.
SCORE_KEY = "checkpoint_score"

EVAL = ("knn_top1", "knn_top5", "knn_pixels_top1", "best_knn_top1", "linear_top1", "linear_val_top1")
TRAIN = (
    "loss",
    "epoch_loss",
    "lr",
    "weight_decay",
    "teacher_momentum",
    "grad_norm",
    "images_per_sec",
    "epoch_images_per_sec",
)
SIGNALS = tuple(
    f"{name}{suffix}"
    for name in ("rankme", "std", "std_norm", "align", "uniform")
    for suffix in ("", "_proj")
)
#: the methods' own per-step diagnostics and their epoch means (``epoch_`` + name)
METHOD_PREFIXES = ("bam_", "epoch_bam_")

_GROUP = (
    {name: "eval" for name in EVAL}
    | {name: "train" for name in TRAIN}
    | {name: "train_signals" for name in SIGNALS}
)


def mlflow_key(name: str) -> str:
    """The name a metric has in MLflow: ``knn_top1`` -> ``eval/knn_top1``; already grouped or unknown
    names are kept as they are."""
    if "/" in name:
        return name
    group = _GROUP.get(name) or ("train_signals" if name.startswith(METHOD_PREFIXES) else None)
    return f"{group}/{name}" if group else name
