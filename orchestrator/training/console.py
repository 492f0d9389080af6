"""What rank 0 tells the driver's console during training: progress updates and one line per epoch, which
the driver's :mod:`orchestrator.console` shows (and keeps Ray's own chatter from). Lines travel with
:func:`orchestrator.console.say` / :func:`~orchestrator.console.to_driver`."""

from __future__ import annotations

import time
from typing import Any

from orchestrator.console import progress_line, to_driver
from trainers.loop import EpochStats


class ProgressEmitter:
    """Rank 0's progress updates, at most one per ``interval_s`` (0: none). The driver draws them as a bar on
    a terminal (``interval_s`` 1) or prints one line per update otherwise (``interval_s`` = its interval),
    so the workers never send more than the driver shows. Rates and ETAs are taken from the end of the
    epoch's first step on: the first batch waits for the data pipeline to start, which says nothing about
    the steps after it."""

    def __init__(self, interval_s: float, epochs: int, steps: int, global_batch: int) -> None:
        self.interval_s, self.epochs, self.steps, self.global_batch = interval_s, epochs, steps, global_batch
        self._last = time.monotonic()
        self._first: tuple[int, float] | None = None  # (step, time) at the end of the epoch's first step

    def step(self, epoch: int, step: int, logs: dict[str, float]) -> bool:
        """After ``step`` (1-based within ``epoch``, 0-based): an update if one is due. Returns whether it
        printed."""
        now = time.monotonic()
        if self._first is None or step <= self._first[0]:  # a new epoch (or a resumed one)
            self._first = (step, now)
            return False
        if self.interval_s <= 0 or now - self._last < self.interval_s or step >= self.steps:
            return False
        self._last = now
        per_step = (now - self._first[1]) / (step - self._first[0])
        eta = (self.steps - step) * per_step
        to_driver(
            progress_line(
                {
                    "epoch": epoch + 1,
                    "epochs": self.epochs,
                    "step": step,
                    "steps": self.steps,
                    "images_per_sec": round(self.global_batch / max(per_step, 1e-9), 1),
                    "loss": round(float(logs.get("loss", float("nan"))), 5),
                    "eta_s": round(eta, 1),
                    "run_eta_s": round(eta + (self.epochs - epoch - 1) * self.steps * per_step, 1),
                }
            )
        )
        return True

    def end_epoch(self) -> None:
        self._first = None


def epoch_line(
    epoch: int, epochs: int, stats: EpochStats, mean_loss: float, metrics: dict[str, Any], label: str = ""
) -> str:
    """Rank 0's one summary line of an epoch (steps, time, first-batch wait, loss, k-NN when evaluated)."""
    knn = (
        f", knn top-1 {metrics['knn_top1']:.2f} % ({metrics['knn_time_s']:.1f} s)"
        if "knn_top1" in metrics
        else ""
    )
    return (
        f"{label + ': ' if label else ''}epoch {epoch + 1}/{epochs}: {stats.steps} steps in {stats.seconds:.1f} s "
        f"(first batch after {stats.first_batch_s:.1f} s), loss {mean_loss:.4f}{knn}"
    )
