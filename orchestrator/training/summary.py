"""The end-of-run summary ``bamray train`` prints: what the run learned, epoch by epoch, against the raw
pixels of the same bank; where the time went; where the run lives.

Built from the run's MLflow history (what the UI will show) and the workers' result, by a pure function
(:func:`summary_lines`) that the tests check line by line.
"""

from __future__ import annotations

from typing import Any


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def wall_split(
    total_s: float, worker: dict[str, Any], launched_unix: float, linear_s: float = 0.0
) -> dict[str, float]:
    """Launch to first step (``start-up``), training steps, evaluation (k-NN, signals, linear probe), and the
    rest (checkpoints, shutting down) of a run that took ``total_s`` since ``launched_unix``."""
    first = worker.get("first_step_unix")
    startup = max(0.0, float(first) - launched_unix) if first else 0.0
    train = float(worker.get("train_time_s") or 0.0) - (
        float(worker.get("first_step_s") or 0.0) if first else 0.0
    )
    evaluation = float(worker.get("eval_time_s") or 0.0) + linear_s
    return {
        "start-up": startup,
        "training": train,
        "evaluation": evaluation,
        "other": max(0.0, total_s - startup - train - evaluation),
        "total": total_s,
    }


#: The run tag the MLflow UI shows as the run's description.
DESCRIPTION_TAG = "mlflow.note.content"


def run_description(
    what: str, knn_top1: float | None = None, pixels_top1: float | None = None, epochs: int | None = None
) -> str:
    """One line for the run page: what was trained on what, and (once known) the k-NN against raw pixels."""
    line = what
    if knn_top1 is not None:
        line += f". k-NN top-1 {knn_top1:.2f} %" + (f" after {epochs} epochs" if epochs else "")
        if pixels_top1 is not None:
            line += f", raw pixels {pixels_top1:.2f} % on the same bank ({knn_top1 - pixels_top1:+.2f})"
    return line


def log_description(uri: str, run_id: str, what: str, result: Any = None) -> None:
    """Set the run's description: ``what``, and when a fitted Ray Train ``result`` reports a k-NN, the k-NN
    against raw pixels (from its metrics and the workers' return value)."""
    from orchestrator import tracking

    line = what
    if result is not None:
        ret, metrics = result.return_value or {}, result.metrics or {}
        if metrics.get("knn_top1") is not None:
            line = run_description(what, metrics["knn_top1"], ret.get("knn_pixels_top1"), ret.get("epochs"))
    tracking.log_tags(uri, run_id, {DESCRIPTION_TAG: line})


def what_line(cfg: Any, epochs: int | None = None) -> str:
    """``bam on fashion-mnist, resnet18, 2 epochs, 2 workers x batch 64``."""
    import os

    data = cfg.data.dataset or os.path.basename(cfg.data.path.rstrip("/"))
    epochs = epochs or cfg.optim.epochs
    return (
        f"{cfg.method_name} on {data}, {cfg.model.backbone}, {_count(epochs, 'epoch')}, "
        f"{_count(cfg.train.workers, 'worker')} x batch {cfg.optim.batch_size}"
    )


def _count(n: int, noun: str) -> str:
    """``1 worker``, ``2 workers``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def summary_lines(
    *,
    run_id: str,
    status: str,
    reason: str | None,
    what: str,
    history: dict[str, dict[int, float]],
    pixels_top1: float | None,
    linear_top1: float | None,
    split: dict[str, float] | None,
    ui: str,
    run_url: str,
    checkpoints: str | None,
    log_path: str | None,
) -> list[str]:
    """The summary: a header, a table of the evaluated epochs (loss, k-NN top-1, raw pixels, the difference),
    the linear probe, the wall-time split, and where everything is. ``history``: metric -> {epoch: value}
    for ``epoch_loss`` and ``knn_top1``."""
    lines = [f"Run {run_id}: {status}" + (f" ({reason})" if reason else ""), f"  {what}"]
    losses, knn = history.get("epoch_loss", {}), history.get("knn_top1", {})
    epochs = sorted(set(losses) | set(knn))
    if epochs:
        lines.append("  epoch   loss      k-NN top-1   raw pixels   vs pixels")
        for e in epochs:
            loss = f"{losses[e]:.4f}" if e in losses else "-"
            k = f"{knn[e]:6.2f} %" if e in knn else "       -"
            p = f"{pixels_top1:6.2f} %" if pixels_top1 is not None and e in knn else "       -"
            d = f"{knn[e] - pixels_top1:+.2f}" if pixels_top1 is not None and e in knn else ""
            lines.append(f"  {e:>5}   {loss:<8}  {k:>10}   {p:>10}   {d}".rstrip())
    if linear_top1 is not None:
        lines.append(f"  linear probe top-1 {linear_top1:.2f} %")
    if split:
        parts = ", ".join(
            f"{_minutes(split[k])} {k}" for k in ("start-up", "training", "evaluation", "other")
        )
        lines.append(f"  wall time {_minutes(split['total'])}: {parts}")
    lines.append(f"  see it: `{ui}`, then {run_url}")
    if checkpoints:
        lines.append(f"  checkpoints: {checkpoints}")
    if log_path:
        lines.append(f"  full log: {log_path} (and the run's artifact logs/console.log)")
    if status == "FAILED":
        lines.append(f"  continue from the last checkpoint with `bamray train --resume {run_id}`")
    return lines


def epoch_history(uri: str, run_id: str) -> dict[str, dict[int, float]]:
    """``epoch_loss`` and ``knn_top1`` of the run by epoch (1-based), read back from MLflow: each is logged
    once per epoch, at that epoch's last step; ``epoch`` is logged at every step, so its value at the same
    step numbers the epoch."""
    from orchestrator import tracking
    from orchestrator.metric_names import mlflow_key

    client = tracking.client(uri)
    by_step = {int(m.step): int(round(m.value)) for m in client.get_metric_history(run_id, "epoch")}
    out: dict[str, dict[int, float]] = {}
    for key in ("epoch_loss", "knn_top1"):
        for m in client.get_metric_history(run_id, mlflow_key(key)):
            epoch = by_step.get(int(m.step))
            if epoch is not None:
                out.setdefault(key, {})[epoch] = float(m.value)
    return out
