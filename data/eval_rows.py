"""Which rows the k-NN bank and the validation subset hold: one selector for every path (the Ray stream,
the torch twin, the bench), so "the same bank" is one set of rows.

numpy and pyarrow only: the driver chooses the rows while it builds the run's datasets, and importing
torch and torchvision there (through :mod:`data.torch_dataset`) cost about 4 s of its start-up.
"""

from __future__ import annotations

import numpy as np

from data.shards import read_split_table
from trainers.evaluation.balanced import class_balanced_indices


def select_eval_indices(
    path: str, split: str, fraction: float, seed: int, limit: int = 0
) -> np.ndarray | None:
    """``index`` values of a deterministic, class-balanced ``fraction`` of ``split`` (``None`` = all rows).

    Rows with ``index < limit`` (when ``limit > 0``) are eligible; the choice among them is
    :func:`trainers.evaluation.balanced.class_balanced_indices`; returned sorted.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction: got {fraction}; must be in (0, 1]")
    if fraction >= 1.0 and limit <= 0:
        return None
    table = read_split_table(path, split, columns=["label", "index"])
    labels = table.column("label").to_numpy()
    indices = table.column("index").to_numpy()
    if limit > 0:
        keep = indices < limit
        labels, indices = labels[keep], indices[keep]
    return np.sort(indices[class_balanced_indices(labels, fraction, seed)])
