"""torch.distributed helpers that degrade to no-ops in a single process (no Ray imports)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def all_gather_grad(x: torch.Tensor) -> list[torch.Tensor]:
    """All-gather that keeps the autograd graph: the backward sums each rank's gradient back to the
    owner (``torch.distributed.nn``), so a loss on gathered targets trains every worker's encoder."""
    if not is_dist():
        return [x]
    from torch.distributed.nn.functional import all_gather

    return list(all_gather(x.contiguous()))


@torch.no_grad()
def all_gather_nograd(x: torch.Tensor) -> list[torch.Tensor]:
    if not is_dist():
        return [x]
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return out


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def global_logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp over ``dim`` where that dimension is split across ranks (stable: max all-reduced)."""
    local = torch.logsumexp(x, dim=dim)
    if not is_dist():
        return local
    m = all_reduce_max(local.clone())
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = all_reduce_sum(torch.exp(local - m_safe))
    return m_safe + torch.log(s)


@torch.no_grad()
def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (rows may differ in number) concatenated in rank order, on every rank: padded to
    the longest for ``all_gather``, then trimmed."""
    if not is_dist():
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [int(s.item()) for s in all_gather_nograd(n)]
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    return torch.cat([part[:size] for part, size in zip(all_gather_nograd(padded), sizes)])
