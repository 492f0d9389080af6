"""DINO loss (Caron et al., 2021): cross-entropy between a centred, sharpened teacher and the student.

- Teacher outputs (global crops only) are centred by an EMA ``center`` of their batch mean and
  sharpened with a low temperature; centring alone would flatten the targets (uniform collapse) and
  sharpening alone would let one prototype win (one-hot collapse): the pair balances the two.
- Every student crop is compared with every teacher global crop except the same view.
- The centre is updated after the loss from the teacher batch mean, all-reduced over workers so it is
  the mean of the *global* batch (as the official code does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainers import distributed as D


class DINOLoss(nn.Module):
    """Multi-crop DINO cross-entropy with a centring buffer.

    Args:
        out_dim: number of prototypes ``K`` (head output size).
        num_global_crops: leading crops the teacher sees.
        student_temp: student softmax temperature (0.1).
        center_momentum: EMA momentum of the centre (0.9).
    """

    center: torch.Tensor

    def __init__(
        self, out_dim: int, num_global_crops: int = 2, student_temp: float = 0.1, center_momentum: float = 0.9
    ):
        super().__init__()
        if num_global_crops < 1 or student_temp <= 0 or not 0.0 <= center_momentum <= 1.0:
            raise ValueError("need num_global_crops >= 1, student_temp > 0, 0 <= center_momentum <= 1")
        self.num_global_crops = num_global_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def targets(self, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Centred, sharpened teacher probabilities ``softmax((t - c) / teacher_temp)`` (no gradient)."""
        return F.softmax((teacher_out.detach().float() - self.center) / teacher_temp, dim=-1)

    def forward(
        self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        """``student_out``: ``(V*B, K)`` crop-major, global crops first; ``teacher_out``: ``(G*B, K)``.

        Returns the mean over (teacher crop g, student crop v != g) of
        ``mean_i(-sum_k P_g[i, k] log Q_v[i, k])``; updates the centre when in training mode."""
        g = self.num_global_crops
        if teacher_out.shape[0] % g:
            raise ValueError(
                f"teacher_out has {teacher_out.shape[0]} rows, not a multiple of {g} global crops"
            )
        b = teacher_out.shape[0] // g
        if student_out.shape[0] % b:
            raise ValueError(f"student_out has {student_out.shape[0]} rows, not a multiple of the batch {b}")
        num_views = student_out.shape[0] // b
        targets = self.targets(teacher_out, teacher_temp).chunk(g)
        log_q = F.log_softmax(student_out.float() / self.student_temp, dim=-1).chunk(num_views)
        terms = [
            -(targets[t] * log_q[v]).sum(dim=-1).mean() for t in range(g) for v in range(num_views) if v != t
        ]
        if not terms:
            raise ValueError("DINO needs at least 2 crops (one teacher view and one other student view)")
        loss = torch.stack(terms).mean()
        if self.training:
            self.update_center(teacher_out)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """``c = m * c + (1 - m) * mean(teacher_out)`` with the mean over the global batch."""
        batch_sum = D.all_reduce_sum(teacher_out.detach().float().sum(dim=0, keepdim=True))
        batch_mean = batch_sum / (teacher_out.shape[0] * D.world_size())
        self.center.mul_(self.center_momentum).add_(batch_mean, alpha=1.0 - self.center_momentum)
