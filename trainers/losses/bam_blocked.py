"""The BAM loss a block of images at a time: the same value, gradients and entropies as the dense form in
:mod:`trainers.losses.bam`, without ever holding a whole ``(rows x columns)`` matrix.

Why: the dense loss keeps, per step, the similarity, Sinkhorn and attention matrices of all
``num_crops * B`` rows against all ``num_target_crops * W * B`` columns, several copies of each for
autograd. At the published scale (2+10 crops, global batch 4096) that is gigabytes per GPU; here the peak is
one block of rows (``block_images * num_crops`` of them) plus the ``(rows + columns) x D`` embeddings.

How, exactly:

- **Sinkhorn as potentials.** Every log-domain Sinkhorn step adds a constant to each row or each column,
  so after ``n`` steps ``log P = S / reg + u_i + v_j``. Only the column potentials ``v`` matter for the
  target (each row is renormalised at the end), and the updates close on the potentials alone:
  ``v <- log(1/K) - logsumexp_i(S_ij / reg + u_i)`` (summed over the rows of every worker), then
  ``u <- log(1/N) - logsumexp_j(S_ij / reg + v_j)``. Each iteration is one pass over the rows, a block
  at a time, recomputing ``S`` from the embeddings (a matrix product is cheaper than keeping it).
- **Loss and gradient in one pass.** ``P`` carries no gradient, so the gradient of
  ``-sum P_g log Q_v`` with respect to the logits ``S / temperature`` of view ``v``'s row is known in
  closed form: ``-(W - rowsum(W) Q) / temperature`` with ``W`` the sum of the other views' targets
  ``P_g``. Each block's gradient goes straight into ``dL/dz = dS @ targets`` and
  ``dL/dtargets = dS^T @ z``; autograd then carries them through the normalisation and the gather.
- Blocks are whole images (all of an image's views together), so the cross-view sums, the top-k over
  views and the positive mask stay inside one block.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from trainers import distributed as D
from trainers.losses.bam import keep_top_k

#: elements of one block's ``(rows x columns)`` matrix when ``block_images`` is "auto" (-1), by device.
#: CPU: 2 MiB fp32, measured fastest of 0.25-16 MiB at B = 256-2048 x (2+6) crops (``bench``: the
#: element-wise passes stay in cache; the matrix products are still large enough to run at full speed).
#: GPU: 64 MiB, where many small kernels would cost more than the memory saved (not yet measured).
AUTO_BLOCK_ELEMENTS = {"cpu": 1 << 19, "cuda": 1 << 24}
#: "auto" keeps the dense form while one whole ``(rows x columns)`` matrix has at most this many elements:
#: on the CPU the dense loss was faster up to B = 512 x (2+6) crops (4M elements: 0.88x for blocks there,
#: 2.06x at B = 1024; ``bench``, loss section), and its memory is small there.
AUTO_DENSE_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}


def use_blocks(block_images: int, rows: int, columns: int, device: str = "cpu") -> bool:
    """Whether the loss runs a block at a time: always for ``block_images > 0``, never for 0, and for -1
    (auto) once a whole matrix would pass :data:`AUTO_DENSE_ELEMENTS` of ``device``'s type."""
    if block_images >= 0:
        return block_images > 0
    return rows * columns > AUTO_DENSE_ELEMENTS.get(device, AUTO_DENSE_ELEMENTS["cuda"])


def block_size(block_images: int, batch: int, num_crops: int, columns: int, device: str = "cpu") -> int:
    """Images per block: ``block_images`` (clipped to the batch), or for -1 as many as keep one block's
    matrix under :data:`AUTO_BLOCK_ELEMENTS` of ``device``'s type."""
    if block_images < 0:
        budget = AUTO_BLOCK_ELEMENTS.get(device, AUTO_BLOCK_ELEMENTS["cuda"])
        block_images = max(1, budget // max(1, num_crops * columns))
    return max(1, min(block_images, batch))


class _Columns:
    """The target columns a block is compared with, and where each row's positives sit among them: image
    ``i``'s target view ``t`` on this worker is column ``t * W * B + rank * B + i`` (the gather's order)."""

    def __init__(self, sink_targets: torch.Tensor, b: int, world: int, rank: int, num_t: int, masking: bool):
        self.sink_targets = sink_targets
        self.masking = masking
        self.offsets = torch.arange(num_t, device=sink_targets.device) * world * b + rank * b

    def fill_positives(self, m: torch.Tensor, images: torch.Tensor, value: float) -> torch.Tensor:
        """``m`` (one row per entry of ``images``) with each row's positives set to ``value``, in place:
        ``num_target_crops`` entries a row instead of a pass over a full boolean mask."""
        if self.masking:
            rows = torch.arange(len(images), device=m.device)[:, None]
            m[rows, self.offsets[None, :] + images[:, None]] = value
        return m


def _blocks(
    b: int, size: int, num_views: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per block of images ``[i0, i1)``: the image of each row and the rows (view-major, as ``z``)."""
    for i0 in range(0, b, size):
        images = torch.arange(i0, min(i0 + size, b), device=device)
        rows = (torch.arange(num_views, device=device)[:, None] * b + images[None, :]).reshape(-1)
        yield images.repeat(num_views), rows


@torch.no_grad()
def column_potentials(
    sink_rows: torch.Tensor,
    columns: _Columns,
    reg: float,
    num_iters: int,
    b: int,
    size: int,
    num_crops: int,
    distributed: bool,
) -> torch.Tensor:
    """The Sinkhorn column potentials ``v`` (``(K,)``) of :func:`trainers.losses.bam.sinkhorn` on
    ``S = sink_rows @ sink_targets^T`` with positives masked, computed a block of rows at a time."""
    n_local, k = sink_rows.shape[0], columns.sink_targets.shape[0]
    log_col_mass, log_row_mass = -math.log(k), -math.log(n_local * (D.world_size() if distributed else 1))
    u = sink_rows.new_zeros(n_local)
    v = None
    for _ in range(num_iters):
        col = sink_rows.new_full((k,), float("-inf"))
        for images, rows in _blocks(b, size, num_crops, sink_rows.device):
            s = columns.fill_positives(
                (sink_rows[rows] @ columns.sink_targets.t()).div_(reg), images, -math.inf
            )
            if v is not None:  # the row step of the previous iteration, with its column potentials
                u[rows] = log_row_mass - torch.logsumexp(s + v[None, :], dim=1)
            col = torch.logaddexp(col, torch.logsumexp(s + u[rows, None], dim=0))
        if distributed:
            col = D.global_logsumexp(col[None, :], dim=0)
        v = log_col_mass - col
    assert v is not None
    return v


class _BlockedLoss(torch.autograd.Function):
    """Loss value from ``run``; its gradients (computed by ``run`` in the same pass) on the way back."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, targets: torch.Tensor, run: Callable) -> torch.Tensor:
        loss, grad_z, grad_t = run(ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_z, grad_t)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        grad_z, grad_t = ctx.saved_tensors
        return (
            grad * grad_z if grad_z is not None else None,
            grad * grad_t if grad_t is not None else None,
            None,
        )


def blocked_loss(
    loss_fn: Any,
    z: torch.Tensor,
    targets: torch.Tensor,
    sink_rows: torch.Tensor,
    sink_targets: torch.Tensor,
    reg: float,
    b: int,
    gather: bool,
    world: int,
    rank: int,
    teacher: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The BAM loss of :meth:`BAMLoss._loss` and the sums behind :func:`attention_entropies`, a block of
    images at a time. ``z``: normalised rows ``(V*B, D)``; ``targets``: the (gathered) columns the source
    attends to; ``sink_rows`` / ``sink_targets``: the detached embeddings of the Sinkhorn input (the
    teacher's, or ``z``'s own)."""
    num_crops, num_g, temperature = loss_fn.num_crops, loss_fn.num_global_crops, loss_fn.temperature
    k = targets.shape[0]
    size = block_size(loss_fn.block_images, b, num_crops, k, z.device.type)
    num_t = loss_fn.num_target_crops
    columns = _Columns(sink_targets, b, world, rank, num_t, loss_fn.positive_masking)
    v = column_potentials(sink_rows, columns, reg, loss_fn.num_sink_iter, b, size, num_crops, gather)
    pairs = num_g * (num_crops - 1) if num_crops > 1 else num_g
    norm = b * pairs
    sums = {"target": z.new_zeros(()), "global": z.new_zeros(()), "local": z.new_zeros(())}

    @torch.no_grad()
    def run(want_z: bool, want_t: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        zd, td = z.detach(), targets.detach()
        grad_z = torch.zeros_like(zd) if want_z else None
        grad_t = torch.zeros_like(td) if want_t else None
        total = zd.new_zeros(())
        for images, rows in _blocks(b, size, num_crops, z.device):
            c = len(rows) // num_crops
            gr = slice(0, num_g * c)  # the global views' rows
            zr = zd[rows]
            logits = zr @ td.t()  # (V*c, K): the source's similarities
            sink = logits[gr].clone() if not teacher else sink_rows[rows[gr]] @ sink_targets.t()
            sink = columns.fill_positives(sink.div_(reg), images[gr], -math.inf).add_(v[None, :])
            p = torch.softmax(sink, dim=1)
            del sink
            if loss_fn.top_k_sink > 0:
                p = keep_top_k(p, num_g, min(loss_fn.top_k_sink, k))
            logits = columns.fill_positives(logits.div_(temperature), images, -math.inf)
            log_q = columns.fill_positives(F.log_softmax(logits, dim=1), images, 0.0)
            del logits
            lq, pv = log_q.view(num_crops, c, k), p.view(num_g, c, k)
            # W_v: the targets view v is matched to (every global view but itself; itself with one crop)
            w = pv.sum(0, keepdim=True).expand(num_crops, c, k).clone()
            if num_crops > 1:
                w[:num_g] -= pv
            total -= (w * lq).sum()
            q = columns.fill_positives(log_q.exp(), images, 0.0)
            h = -(q * log_q).sum(dim=1)
            sums["target"] += torch.special.entr(p).sum()
            sums["global"] += h[: num_g * c].sum()
            sums["local"] += h[num_g * c :].sum()
            if grad_z is None and grad_t is None:
                continue
            w = w.view(-1, k)
            d_logits = -(w - w.sum(dim=1, keepdim=True) * q) / (temperature * norm)
            if grad_z is not None:
                grad_z[rows] += d_logits @ td
            if grad_t is not None:
                grad_t += d_logits.t() @ zr
        return total / norm, grad_z, grad_t

    loss = _BlockedLoss.apply(z, targets, run)
    n_global, n_local = b * num_g, b * (num_crops - num_g)
    stats = {
        "bam_target_entropy": sums["target"] / n_global,
        "bam_attn_entropy_global": sums["global"] / n_global,
    }
    if n_local:
        stats["bam_attn_entropy_local"] = sums["local"] / n_local
    return loss, stats
