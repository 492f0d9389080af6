"""The training workers' lines on the driver's console."""

from __future__ import annotations

import sys
from typing import Any

from trainers.loop import EpochStats


def say(line: str) -> None:
    """One line to the driver's console. Ray Train patches ``print`` in its workers to go through its
    logger and, when a library has wrapped ``sys.stdout`` (one here has), to the stream as well, so the
    driver showed every line twice; printing to the process's own stdout goes around both."""
    print(line, file=sys.__stdout__, flush=True)


def epoch_line(epoch: int, epochs: int, stats: EpochStats, mean_loss: float, metrics: dict[str, Any]) -> str:
    """Rank 0's one summary line of an epoch (steps, time, first-batch wait, loss, k-NN when evaluated)."""
    knn = (
        f", knn top-1 {metrics['knn_top1']:.2f} % ({metrics['knn_time_s']:.1f} s)"
        if "knn_top1" in metrics
        else ""
    )
    return (
        f"[bamray] epoch {epoch + 1}/{epochs}: {stats.steps} steps in {stats.seconds:.1f} s "
        f"(first batch after {stats.first_batch_s:.1f} s), loss {mean_loss:.4f}{knn}"
    )
