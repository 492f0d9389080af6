"""What the training workers agree on through the process group: a barrier, reduced figures, and a
non-finite loss seen on one rank made visible on all. Every call is a no-op outside a process group, so
a 1-worker run and Ray Train's local mode run the same code."""

from __future__ import annotations

import torch


def barrier() -> None:
    """Wait for every worker (nothing outside a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce(values: list[float], device: torch.device, op: str = "mean") -> list[float]:
    """``values`` reduced over the workers: ``"mean"`` or ``"max"`` (unchanged outside a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return (t / dist.get_world_size() if op == "mean" else t).tolist()


def non_finite_everywhere(step: int, loss: torch.Tensor) -> torch.Tensor:
    """Loss hook of a multi-worker run: if any rank's loss is non-finite every rank sees NaN, so all of
    them stop at the same step instead of some blocking in DDP's gradient all-reduce while the others
    have left the loop. Costs one 1-element all-reduce per step."""
    import torch.distributed as dist

    if dist.is_initialized():
        bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            loss = loss * float("nan")
    return loss
