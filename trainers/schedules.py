"""Per-iteration schedules precomputed as arrays (DINO style): lr, weight decay, momentum, temperatures."""

from __future__ import annotations

import numpy as np


def cosine_schedule(
    base_value: float,
    final_value: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """Linear warm-up from ``start_warmup_value`` to ``base_value``, then cosine to ``final_value``.

    Returns one value per iteration (``epochs * steps_per_epoch``)."""
    total = max(1, epochs * steps_per_epoch)
    warmup_iters = min(int(round(warmup_epochs * steps_per_epoch)), total)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters, endpoint=False)
    iters = np.arange(total - warmup_iters)
    denom = max(len(iters), 1)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / denom))
    out = np.concatenate((warmup, cosine))
    assert len(out) == total
    return out


def value_at(schedule: np.ndarray, step: int) -> float:
    """Schedule value at ``step`` (clamped to the last value, so extra steps never index past the end)."""
    return float(schedule[min(max(step, 0), len(schedule) - 1)])
