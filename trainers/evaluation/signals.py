"""Label-free quality signals of an embedding matrix: cheap to log every epoch, no labels, no probe.

Why: k-NN and the linear probe need labels and minutes; these read an ``(N, d)`` batch of embeddings
in milliseconds and flag the failure modes of self-supervised training (complete collapse, dimensional
collapse, views that stopped agreeing) while a run is still cheap to stop. None of them measures
downstream accuracy: each can look healthy on useless embeddings (see "Misleads when" per function),
so read them together and against k-NN, never alone.

All functions take embeddings in any float dtype (bf16 included) and compute in float32 or float64.
Pure PyTorch, no Ray, no distributed communication: they see the rows they are given.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["alignment", "embedding_std", "rankme", "signals", "uniformity"]


def _check_2d(z: torch.Tensor, name: str = "z") -> None:
    if z.ndim != 2 or z.shape[0] < 1 or z.shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty (N, d) matrix, got shape {tuple(z.shape)}")


@torch.no_grad()
def rankme(z: torch.Tensor, eps: float = 1e-7) -> float:
    """Effective rank of ``z`` (Garrido et al. 2023, "RankMe", ICML): ``exp`` of the Shannon entropy of
    the normalised singular values.

    ``s`` = singular values of the ``(N, d)`` matrix (no centring, as the paper), ``p_k = s_k / sum(s)
    + eps``, ``rankme = exp(-sum_k p_k log p_k)``. Lies between 1 (rank one) and ``min(N, d)`` (all
    singular values equal), up to the ``eps`` that keeps ``log`` finite. Float64: the SVD of a nearly collapsed matrix is ill-conditioned in float32.

    Misleads when: ``N`` is small (bounded by ``min(N, d)``, so compare values at one ``N``); the
    embeddings share a large mean (no centring: the mean is one big singular value and lowers the
    rank although the spread may be rich); the spread is noise (random, untrained features have
    near-full rank). High rank is necessary for good features, not sufficient.
    """
    _check_2d(z)
    s = torch.linalg.svdvals(z.detach().double())
    total = s.sum()
    if total <= 0:  # the zero matrix: no direction at all; treat as rank one, the minimum
        return 1.0
    p = s / total + eps
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> float:
    """SimSiam's collapse check (Chen & He 2021, Sec. 4.1): rows L2-normalised, the standard deviation
    of every dimension over the ``N`` rows, averaged over the ``d`` dimensions.

    Population std (``unbiased=False``, divide by ``N``): exact 0 when every row is the same direction
    and defined for ``N = 1``. About ``1/sqrt(d)`` for isotropic embeddings (each coordinate of a random
    unit vector has variance ``1/d``), so ``std * sqrt(d)`` is ~1 healthy and 0 collapsed.

    Misleads when: the collapse is dimensional rather than complete -- embeddings spread isotropically
    over ``k`` of ``d`` dimensions read ``sqrt(k/d)`` after the ``sqrt(d)`` scaling, which is still far
    from 0 for a badly collapsed ``k``; use :func:`rankme` for that. It is also blind to *which*
    directions vary (noise scores as well as semantics).
    """
    _check_2d(z)
    zn = F.normalize(z.detach().double(), dim=1)
    return float(zn.std(dim=0, unbiased=False).mean())


@torch.no_grad()
def alignment(z1: torch.Tensor, z2: torch.Tensor, alpha: float = 2) -> float:
    """Wang & Isola 2020 ("Understanding contrastive representation learning through alignment and
    uniformity on the hypersphere"): rows L2-normalised, ``mean_i ||z1_i - z2_i||_2 ** alpha`` over the
    positive pairs (row ``i`` of ``z1`` and of ``z2`` = two views of one image). 0 = views agree
    perfectly; 4 (``alpha=2``) = antipodal.

    Misleads when: read alone -- a collapsed encoder is perfectly aligned (0). Only meaningful beside
    :func:`uniformity`.
    """
    _check_2d(z1, "z1")
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    d = F.normalize(z1.detach().float(), dim=1) - F.normalize(z2.detach().float(), dim=1)
    return float(d.norm(dim=1).pow(alpha).mean())


@torch.no_grad()
def uniformity(z: torch.Tensor, t: float = 2) -> float:
    """Wang & Isola 2020: rows L2-normalised, ``log mean_{i<j} exp(-t ||z_i - z_j||^2)``. 0 = all rows
    equal (collapsed); lower = more uniformly spread over the sphere. For many rows drawn uniformly on
    a high-dimensional sphere it is about ``-2t`` (-4 at ``t=2``; higher in low ``d``). Needs ``N >= 2``.

    Computed as ``logsumexp - log(pairs)``, so very negative values stay finite. Memory: ``N(N-1)/2``
    distances (``torch.pdist``) -- subsample large ``N`` (the paper uses a batch).

    Misleads when: read alone -- random, untrained embeddings are very uniform; the value depends on
    ``t`` and on ``N`` (compare at fixed ``N``); and a few rows can beat the many-row value
    trivially (two antipodal rows give ``-4t``).
    """
    _check_2d(z)
    n = z.shape[0]
    if n < 2:
        raise ValueError(f"uniformity needs at least 2 rows, got {n}")
    sq = torch.pdist(F.normalize(z.detach().float(), dim=1)).pow(2)
    return float(torch.logsumexp(-t * sq, dim=0) - math.log(sq.numel()))


def signals(prefix: str, z1: torch.Tensor, z2: torch.Tensor | None = None) -> dict[str, float]:
    """The bundle logged per embedding kind (``prefix``: e.g. ``backbone``, ``proj``).

    - ``rankme_<prefix>``: :func:`rankme` of ``z1``;
    - ``std_<prefix>``: :func:`embedding_std` of ``z1``;
    - ``std_<prefix>_norm``: ``std * sqrt(d)``, ~1 healthy, 0 collapsed -- dimension-free, so one
      threshold serves every head width (the collapse stopper reads this one);
    - with ``z2`` (a second augmented view of the same images, row-aligned with ``z1``):
      ``align_<prefix>`` = :func:`alignment` ``(z1, z2)`` and ``uniform_<prefix>`` = :func:`uniformity`
      of ``z1`` (omitted for a single row, where it is undefined).
    """
    std = embedding_std(z1)
    out = {
        f"rankme_{prefix}": rankme(z1),
        f"std_{prefix}": std,
        f"std_{prefix}_norm": std * math.sqrt(z1.shape[1]),
    }
    if z2 is not None:
        out[f"align_{prefix}"] = alignment(z1, z2)
        if z1.shape[0] >= 2:
            out[f"uniform_{prefix}"] = uniformity(z1)
    return out
