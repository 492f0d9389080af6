"""NT-Xent (normalised temperature-scaled cross-entropy), the SimCLR loss (Chen et al., 2020).

Each of the ``2N`` views is a query; its positive is the other view of the same image, its negatives
are the other ``2N - 2`` views (of all workers when gathered). Self-similarity is excluded, not merely
down-weighted, as in the paper. With ``gather_distributed`` every worker scores its local queries
against the whole global batch, and the all-gather keeps its autograd graph, so one worker with batch
``2B`` and two workers with batch ``B`` give the same loss and gradients (lightly's check).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainers import distributed as D


def nt_xent_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.2,
    gather_distributed: bool = False,
) -> torch.Tensor:
    """NT-Xent of two views ``z1``, ``z2`` (``(B, D)`` each, any scale; row ``i`` of both = image ``i``).

    Returns the mean over the ``2B`` local queries of
    ``-log(exp(s_pos / T) / sum_{k != self} exp(s_k / T))`` with cosine similarities ``s``.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be (B, D); got {tuple(z1.shape)} and {tuple(z2.shape)}")
    b = z1.shape[0]
    q1 = F.normalize(z1.float(), dim=-1)
    q2 = F.normalize(z2.float(), dim=-1)
    if gather_distributed and D.is_dist():
        k1, k2 = torch.cat(D.all_gather_grad(q1)), torch.cat(D.all_gather_grad(q2))
        rank = D.rank()
    else:
        k1, k2, rank = q1, q2, 0
    n_global = k1.shape[0]
    queries = torch.cat([q1, q2])  # (2B, D)
    keys = torch.cat([k1, k2])  # (2WB, D): view-major over the global batch
    # fp32 even under bf16/fp16 autocast: the logits are divided by a small temperature, and their
    # dtype must match the -inf written into the self-similarity entries.
    with torch.autocast(z1.device.type, enabled=False):
        logits = queries @ keys.t() / temperature
    own = torch.arange(b, device=z1.device) + rank * b  # this worker's images among the global keys
    self_cols = torch.cat([own, own + n_global])
    pos_cols = torch.cat([own + n_global, own])
    rows = torch.arange(2 * b, device=z1.device)
    logits = logits.index_put((rows, self_cols), torch.tensor(float("-inf"), device=z1.device))
    return F.cross_entropy(logits, pos_cols)


class NTXentLoss(nn.Module):
    """Module form of :func:`nt_xent_loss` (holds the temperature and the gather flag)."""

    def __init__(self, temperature: float = 0.2, gather_distributed: bool = True):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return nt_xent_loss(z1, z2, self.temperature, self.gather_distributed)
