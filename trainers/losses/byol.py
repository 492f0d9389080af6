"""BYOL loss (Grill et al., 2020, Algorithm 1): normalised MSE between online predictions and targets.

For unit vectors ``||p - z||^2 = 2 - 2 cos(p, z)``, so the per-sample loss lies in ``[0, 4]``: 0 for
aligned, 2 for orthogonal, 4 for opposite vectors. Normalising both sides makes the loss blind to the
scale of the projections, which is what lets the predictor + EMA target avoid collapse without negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``2 - 2 cos(prediction_i, target_i)``; ``target`` is detached.

    Computed in float32: under bf16 autocast the cosine of near-aligned vectors loses its last bits,
    which is exactly the regime BYOL converges to.
    """
    p = F.normalize(prediction.float(), dim=-1)
    z = F.normalize(target.detach().float(), dim=-1)
    return (2.0 - 2.0 * (p * z).sum(dim=-1)).mean()


def symmetric_byol_loss(
    prediction_1: torch.Tensor,
    prediction_2: torch.Tensor,
    target_1: torch.Tensor,
    target_2: torch.Tensor,
) -> torch.Tensor:
    """``L + L~`` of the paper: view 1's prediction regresses view 2's target and vice versa.

    ``prediction_v`` = online predictor output for view ``v``, ``target_v`` = target projection of view
    ``v``. Algorithm 1 writes ``-2 (cos + cos)``; this is the same up to the constant 4, so the gradient
    is identical and the value reads as a distance (0 = perfect).
    """
    return byol_loss(prediction_1, target_2) + byol_loss(prediction_2, target_1)
