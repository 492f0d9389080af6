"""The one class-balanced row selector: the k-NN bank and the validation subset of every path (the Ray
stream, the torch twin, the bench), so "the same bank" is one set of rows.

numpy only, so that the driver (:mod:`data.eval_rows`) can choose the rows without importing torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def class_balanced_indices(labels: Any, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted positions of a class-balanced random ``fraction`` of ``labels`` (any array-like of
    non-negative integers; they seed the generator).

    Each class keeps ``max(1, round(fraction * count))`` of its members, drawn without replacement by
    ``numpy.random.default_rng([seed, class])``: one generator per class, so a class's draw does not
    depend on which other classes are present, and the bank is the same on every rank and evaluation.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction: got {fraction}; must be in (0, 1]")
    y = np.asarray(labels).reshape(-1)
    if fraction == 1.0:
        return np.arange(y.size, dtype=np.int64)
    chosen = [np.zeros(0, dtype=np.int64)]
    for cls in np.unique(y):
        members = np.flatnonzero(y == cls)
        k = max(1, int(round(fraction * len(members))))
        rng = np.random.default_rng([int(seed), int(cls)])
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)
