"""BAM: Balanced Self-Attention Matching (Shalam & Korman, ECCV 2024, arXiv 2408.02014).

Each view's *self-attention vector* -- the softmax of its similarities to every target crop in the
(global) batch -- is matched to a *balanced* target attention obtained from the target crops' own
similarities by a few Sinkhorn iterations with entropy regularisation ``reg``.

Semantics follow the official code (``bam/bam_loss.py``), see ``shared/BAM_NOTES.md``:

- ``z``: every crop's projection, crop-major ``(num_crops * B, D)``, global crops first; L2-normalised here.
- targets: the first ``num_target_crops`` crops, all-gathered across workers, crop-major over the
  global batch (column ``t * W * B + rank * B + i``); gradients flow through the gather.
- positive masking: row ``(v, i)`` ignores the columns of image ``i``'s own target views.
- target ``P``: Sinkhorn on ``exp(S / reg)`` over *all* crops' rows (locals take part in balancing),
  uniform marginals; only the global-crop rows are kept; each row sums to 1. With ``top_k_sink``
  the top-k columns of the global-view average are kept for every global view, then renormalised.
- source: ``log_softmax(S / temperature)`` with positives masked.
- loss: mean over global targets ``g`` of the mean over views ``v != g`` of
  ``mean_i(-sum_j P_g[i, j] log Q_v[i, j])``.
- diagnostics (``return_stats=True``, see :func:`attention_entropies`): mean row entropies of ``P`` and
  of ``Q``, read off the same tensors the loss uses.

Differences from the official code, all deliberate:

- Sinkhorn runs in the log domain (the official code exponentiates after subtracting one global max,
  so a row far below that max underflows to all zeros and divides by zero at small ``reg``).
- The official row marginal is ``1 / (K - num_target_crops)``: a uniform constant, which the following
  column normalisation cancels exactly, so uniform ``1 / K`` gives the identical ``P``.
- The top-k path runs (the official one raises: ``masking_fn`` is never set), and the positive mask is
  rebuilt per batch size (the official one is cached for the first batch size).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainers import distributed as D


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp32 for bf16 / fp16 inputs (their matmuls shift the Sinkhorn target by ~2 %), fp64 kept as it is
    (the exactness checks run in fp64)."""
    return t if t.dtype == torch.float64 else t.float()


def positive_mask(
    num_crops: int,
    batch_size: int,
    num_target_crops: int,
    world_size: int = 1,
    rank: int = 0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Boolean ``(num_crops*B, num_target_crops*W*B)``: True where column shows the row's own image."""
    rows = torch.arange(num_crops * batch_size, device=device) % batch_size  # image index i of row (v, i)
    cols = torch.arange(num_target_crops * world_size * batch_size, device=device)
    col_rank = (cols // batch_size) % world_size
    col_img = cols % batch_size
    return (col_img[None, :] == rows[:, None]) & (col_rank[None, :] == rank)


@torch.no_grad()
def sinkhorn(log_scores: torch.Tensor, num_iters: int, distributed: bool = True) -> torch.Tensor:
    """Balanced attention from ``log_scores`` (``(n_local_rows, K)``, ``-inf`` = masked).

    Alternates (as the official code) scaling every *target column* to mass ``1/K`` -- summed over the
    source rows of all workers -- and every *source row* to mass ``1/N`` (``N`` rows in the global
    batch). Returns the plan with rows renormalised to sum to 1 (an attention distribution per row).
    """
    log_p = at_least_fp32(log_scores)
    n_local, k = log_p.shape
    n_total = n_local * D.world_size()
    log_col_mass = -math.log(k)
    log_row_mass = -math.log(n_total)
    for _ in range(num_iters):
        col = D.global_logsumexp(log_p, dim=0) if distributed else torch.logsumexp(log_p, dim=0)
        log_p = log_p - col[None, :] + log_col_mass
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True) + log_row_mass
    return torch.softmax(log_p, dim=1)  # rows sum to 1


def keep_top_k(p: torch.Tensor, num_views: int, k: int) -> torch.Tensor:
    """Keep, for every view, the top-k columns of the view-averaged target; renormalise rows."""
    b = p.shape[0] // num_views
    avg = p.view(num_views, b, -1).mean(0)
    idx = avg.topk(k, dim=-1).indices
    keep = torch.zeros_like(avg, dtype=torch.bool).scatter_(-1, idx, True)
    p = p * keep.repeat(num_views, 1)
    return p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)


@torch.no_grad()
def attention_entropies(
    p: torch.Tensor, log_q: torch.Tensor, num_global: int, num_crops: int
) -> dict[str, torch.Tensor]:
    """Mean row entropies (nats) of the loss's own target ``p`` and source ``log_q``, as 0-d tensors.

    Why: the loss value alone cannot tell a sharpening target (``reg`` too small, near one-hot rows)
    from a source that stopped attending (near-uniform rows); their entropies can, at the cost of two
    element-wise passes over matrices the loss already holds.

    - ``bam_target_entropy``: ``-sum_j P[i, j] log P[i, j]`` over the ``B * num_global`` rows of ``P``
      the loss uses (global-crop rows, after top-k), with ``0 log 0 = 0``: positives (``P`` is exactly 0
      there) and columns dropped by top-k contribute nothing, so a uniform row over ``K`` unmasked kept
      columns reads ``log K``.
    - ``bam_attn_entropy_global`` / ``bam_attn_entropy_local``: ``-sum_j Q[i, j] log Q[i, j]`` of the
      source attention ``Q = softmax(S / temperature)`` over the unmasked columns, for the global-crop
      rows and for the local-crop rows (absent without local crops). ``log_q`` holds 0 at positives
      (the loss's masking), so they contribute ``exp(0) * 0 = 0``.

    Rows are this worker's (``B`` = local batch); columns span the gathered targets.
    """
    b = log_q.shape[0] // num_crops
    h_source = -(log_q.exp() * log_q).sum(dim=-1)
    stats = {
        "bam_target_entropy": torch.special.entr(p).sum(dim=-1).mean(),
        "bam_attn_entropy_global": h_source[: b * num_global].mean(),
    }
    if num_crops > num_global:
        stats["bam_attn_entropy_local"] = h_source[b * num_global :].mean()
    return stats


class BAMLoss(nn.Module):
    """Balanced Self-Attention Matching loss. ``forward(z)`` returns the scalar loss.

    Args:
        num_crops: views per image in ``z`` (global + local).
        num_global_crops: leading crops used as targets of the loss (rows of ``P`` kept).
        num_target_crops: leading crops that form the attention columns (gathered over workers).
        reg: Sinkhorn entropy regularisation (smaller -> sharper target).
        temperature: softmax temperature of the source attention.
        num_sink_iter: Sinkhorn iterations.
        top_k_sink: keep only the top-k target entries (0 = all).
        positive_masking: ignore each image's own views.
        gather_distributed: all-gather targets over ``torch.distributed`` workers when initialised.
        vectorized: the cross-view reduction in its cheaper form per crop count (default; see
            :func:`cross_view_loss`) instead of always the per-view loop.
        block_images: 0 = the dense form; N > 0 = N images (all their crops) at a time, never holding a
            whole ``(rows x columns)`` matrix (:mod:`trainers.losses.bam_blocked`: same value, gradients
            and entropies); -1 = automatic: dense while a whole matrix has at most 4M elements on a CPU
            (64M on a GPU), else blocks of about 512K (16M) elements.
    """

    def __init__(
        self,
        num_crops: int,
        num_global_crops: int,
        num_target_crops: int = 2,
        reg: float = 0.05,
        temperature: float = 0.1,
        num_sink_iter: int = 3,
        top_k_sink: int = 0,
        positive_masking: bool = True,
        gather_distributed: bool = True,
        vectorized: bool = True,
        block_images: int = 0,
    ):
        super().__init__()
        if not 1 <= num_global_crops <= num_crops:
            raise ValueError(
                f"num_global_crops must be in [1, num_crops={num_crops}], got {num_global_crops}"
            )
        if not 1 <= num_target_crops <= num_crops:
            raise ValueError(
                f"num_target_crops must be in [1, num_crops={num_crops}], got {num_target_crops}"
            )
        if reg <= 0 or temperature <= 0 or num_sink_iter < 1 or top_k_sink < 0:
            raise ValueError("need reg > 0, temperature > 0, num_sink_iter >= 1, top_k_sink >= 0")
        self.num_crops = num_crops
        self.num_global_crops = num_global_crops
        self.num_target_crops = num_target_crops
        self.reg = reg
        self.temperature = temperature
        self.num_sink_iter = num_sink_iter
        self.top_k_sink = top_k_sink
        self.positive_masking = positive_masking
        self.gather_distributed = gather_distributed
        self.vectorized = vectorized
        if block_images < -1:
            raise ValueError(f"block_images must be -1 (auto), 0 (dense) or > 0, got {block_images}")
        self.block_images = block_images

    def _gather_targets(self, t: torch.Tensor, differentiable: bool) -> torch.Tensor:
        """Local ``(T*B, D)`` crop-major -> global ``(T*W*B, D)`` crop-major."""
        if not (self.gather_distributed and D.is_dist()):
            return t
        parts = D.all_gather_grad(t) if differentiable else D.all_gather_nograd(t)
        per_rank = [p.chunk(self.num_target_crops) for p in parts]
        return torch.cat([per_rank[r][c] for c in range(self.num_target_crops) for r in range(len(parts))])

    def forward(
        self,
        z: torch.Tensor,
        z_teacher: torch.Tensor | None = None,
        reg: float | None = None,
        return_stats: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``z``: student projections ``(num_crops*B, D)``; ``z_teacher``: optional teacher
        projections of the same crops (targets and the Sinkhorn input then come from the teacher);
        ``reg``: overrides the regularisation (for a warm-up schedule); ``return_stats``: return
        ``(loss, stats)`` with the detached 0-d entropies of :func:`attention_entropies`."""
        reg = self.reg if reg is None else reg
        n = z.shape[0]
        if n % self.num_crops:
            raise ValueError(f"z has {n} rows, not a multiple of num_crops={self.num_crops}")
        b = n // self.num_crops
        num_t, num_g = self.num_target_crops, self.num_global_crops
        gather = self.gather_distributed and D.is_dist()
        world, rank = (D.world_size(), D.rank()) if gather else (1, 0)
        if self.positive_masking and b * world < 2:
            raise ValueError(
                "BAM with positive masking needs >= 2 images in the global batch (every column "
                "of a single image is its own positive)"
            )
        # Similarities in fp32 even under bf16 autocast: bf16 matmuls shift the Sinkhorn target by ~2 %.
        with torch.autocast(z.device.type, enabled=False):
            from trainers.losses.bam_blocked import blocked_loss, use_blocks

            if use_blocks(self.block_images, n, num_t * world * b, z.device.type):
                zn, targets, sink_rows, sink_targets = self._embeddings(z, z_teacher, b, num_t)
                loss, stats = blocked_loss(
                    self,
                    zn,
                    targets,
                    sink_rows,
                    sink_targets,
                    reg,
                    b,
                    gather,
                    world,
                    rank,
                    z_teacher is not None,
                )
                return (loss, stats) if return_stats else loss
            loss, p, log_q = self._loss(z, z_teacher, reg, b, num_t, num_g, gather, world, rank)
            if not return_stats:
                return loss
            return loss, attention_entropies(p, log_q.detach(), num_g, self.num_crops)

    @torch.no_grad()
    def matrices(
        self, z: torch.Tensor, z_teacher: torch.Tensor | None = None, reg: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """For a picture of one batch on this process alone (no gathering): the balanced target ``P`` and
        the source attention ``Q`` of the global crops' rows, ``(num_global*B, num_target*B)`` each, and the
        entropies of :func:`attention_entropies`."""
        b = z.shape[0] // self.num_crops
        num_t, num_g = self.num_target_crops, self.num_global_crops
        reg = self.reg if reg is None else reg
        gather, self.gather_distributed = self.gather_distributed, False  # this process's batch alone
        try:
            with torch.autocast(z.device.type, enabled=False):
                _, p, log_q = self._loss(z, z_teacher, reg, b, num_t, num_g, False, 1, 0)
        finally:
            self.gather_distributed = gather
        stats = attention_entropies(p, log_q, num_g, self.num_crops)
        q = log_q.exp()
        if self.positive_masking:  # log_q holds 0 there (the loss's masking): Q is 0 at positives
            q = q.masked_fill(positive_mask(self.num_crops, b, num_t, 1, 0, device=z.device), 0.0)
        return p, q[: b * num_g], stats

    def _embeddings(self, z, z_teacher, b, num_t):
        """Normalised rows ``z``, the (gathered) target columns the source attends to, and the detached
        rows / columns of the Sinkhorn input: the teacher's, or ``z``'s own."""
        z = F.normalize(at_least_fp32(z), dim=-1)
        if z_teacher is None:
            targets = self._gather_targets(z[: b * num_t], differentiable=True)
            return z, targets, z.detach(), targets.detach()
        zt = F.normalize(at_least_fp32(z_teacher.detach()), dim=-1)
        targets = self._gather_targets(zt[: b * num_t], differentiable=False)
        return z, targets, zt, targets

    def _loss(self, z, z_teacher, reg, b, num_t, num_g, gather, world, rank):
        """The loss and the target ``P`` / source ``log Q`` it was computed from (the dense form)."""
        z, targets, sink_rows, sink_targets = self._embeddings(z, z_teacher, b, num_t)
        sink_in = sink_rows @ sink_targets.t()
        sim = z @ targets.t()  # (V*B, T*W*B)

        if self.positive_masking:
            mask = positive_mask(self.num_crops, b, num_t, world, rank, device=z.device)
        else:
            mask = torch.zeros_like(sim, dtype=torch.bool)

        with torch.no_grad():
            log_scores = (sink_in / reg).masked_fill(mask, float("-inf"))
            p = sinkhorn(log_scores, self.num_sink_iter, distributed=gather)[: b * num_g]
            if self.top_k_sink > 0:
                p = keep_top_k(p, num_g, min(self.top_k_sink, p.shape[1]))

        log_q = F.log_softmax((sim / self.temperature).masked_fill(mask, float("-inf")), dim=-1)
        log_q = log_q.masked_fill(mask, 0.0)  # P is 0 there; avoids 0 * -inf

        reduce = cross_view_loss if self.vectorized else cross_view_loss_loop
        return reduce(p, log_q, num_g, self.num_crops), p, log_q


def cross_view_loss_loop(
    p: torch.Tensor, log_q: torch.Tensor, num_global: int, num_crops: int
) -> torch.Tensor:
    """Straightforward form (as the official code): mean over global targets ``g`` of the mean over
    views ``v != g`` of ``mean_i(-sum_j P_g[i, j] log Q_v[i, j])``."""
    p_views, log_q_views = p.chunk(num_global), log_q.chunk(num_crops)
    loss = log_q.new_zeros(())
    for g in range(num_global):
        terms = [
            -(p_views[g] * log_q_views[v]).sum(dim=-1).mean()
            for v in range(num_crops)
            if v != g or num_crops == 1
        ]
        loss = loss + torch.stack(terms).mean()
    return loss / num_global


def cross_view_loss(p: torch.Tensor, log_q: torch.Tensor, num_global: int, num_crops: int) -> torch.Tensor:
    """Same value as :func:`cross_view_loss_loop`, in whichever form costs fewer passes over the
    ``(B, K)`` matrices. The loop makes ``G x (V - 1)`` products; the summed form uses
    ``sum_{v != g} log Q_v = sum_v log Q_v - log Q_g``: one sum over the ``V`` views, one matrix-vector
    product for ``sum_g <P_g, S>`` and one for ``sum_g <P_g, log Q_g>`` (about ``V + G`` passes). With
    few crops (2 global only, as in ``bench``'s 2g rows) the loop is the cheaper one: measured 1.7 vs
    4.2 ms fwd+bwd at B=512 for the summed form that was used for every shape before."""
    if num_crops == 1 or num_global * (num_crops - 1) <= num_crops + num_global:
        return cross_view_loss_loop(p, log_q, num_global, num_crops)
    b = log_q.shape[0] // num_crops
    p_flat, log_q_flat = p.reshape(num_global, -1), log_q.reshape(num_crops, -1)
    total = (p_flat @ log_q_flat.sum(0)).sum() - (p_flat * log_q_flat[:num_global]).sum()
    return -total / (b * num_global * (num_crops - 1))
