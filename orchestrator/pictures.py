"""Pictures logged beside a run's metrics: what the augmentation actually fed the network.

A grid of the first batch's crops (``crops/first_batch.png`` of every run) shows at a glance whether crop
scales, flips and colour jitter look as intended, which no loss curve tells.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def crop_grid(batch: Mapping[str, Any], max_images: int = 8, pad: int = 2):
    """A PIL image: one row per image of the batch, its global crops then its local crops (upscaled
    to the global size, nearest neighbour), so the augmentations can be eyeballed in the MLflow UI."""
    from PIL import Image

    g = np.asarray(batch["global"])[:max_images]  # (N, G, C, H, W) uint8
    local = batch.get("local")
    loc = np.asarray(local)[:max_images] if local is not None and np.asarray(local).shape[1] > 0 else None
    n, num_g, c, h, w = g.shape
    tiles_per_row = num_g + (loc.shape[1] if loc is not None else 0)
    canvas = np.full((n * (h + pad) + pad, tiles_per_row * (w + pad) + pad, 3), 255, dtype=np.uint8)

    def put(tile: np.ndarray, r: int, col: int) -> None:
        t = np.transpose(tile, (1, 2, 0))
        t = np.repeat(t, 3, axis=2) if t.shape[2] == 1 else t[..., :3]
        if t.shape[0] != h or t.shape[1] != w:
            t = np.asarray(Image.fromarray(t).resize((w, h), Image.NEAREST))
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y : y + h, x : x + w] = t

    for i in range(n):
        for v in range(num_g):
            put(g[i, v], i, v)
        if loc is not None:
            for v in range(loc.shape[1]):
                put(loc[i, v], i, num_g + v)
    img = Image.fromarray(canvas)
    scale = max(1, 256 // max(canvas.shape[0], 1))
    return img.resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST) if scale > 1 else img
