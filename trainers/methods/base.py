"""The one interface every self-supervised method implements (pure PyTorch).

A method is an ``nn.Module`` that owns its backbone, heads, teacher copies and loss. The training loop
(``trainers.engine``) only ever calls:

- ``loss, logs = method(crops, step)``: ``crops`` is a list of float image batches, global crops
  first, each ``(B, C, H, W)`` and already normalised; crops of one size are forwarded together;
- ``method.update_teacher(step)`` after the optimiser step (EMA of every ``momentum_pairs`` pair);
- ``method.eval_backbone()`` for k-NN / linear probe features (the teacher's backbone when there is one).

Calling the module itself (``forward``) keeps DDP's gradient hooks working when Ray's
``prepare_model`` wraps it. Teacher parameters have ``requires_grad=False`` so neither the optimiser
nor DDP touch them. Schedules use the *global* step, so a resumed run continues them (the official BAM
code restarts its teacher-momentum schedule on resume).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from trainers import schedules


@dataclasses.dataclass
class MethodContext:
    """What a method needs to know about the run, besides its own options."""

    backbone: nn.Module
    feat_dim: int
    num_global_crops: int = 2
    num_local_crops: int = 0
    batch_size: int = 64  # per worker
    world_size: int = 1
    steps_per_epoch: int = 1
    epochs: int = 1
    in_chans: int = 3
    image_size: int = 32  # global crop size

    @property
    def num_crops(self) -> int:
        return self.num_global_crops + self.num_local_crops

    @property
    def total_steps(self) -> int:
        return max(1, self.steps_per_epoch * self.epochs)


class Method(nn.Module):
    """Base class; subclasses set ``name``, ``Options`` and implement ``training_step``."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = type(None)
    #: crops the method consumes; "multi" = global + local, "global" = the global crops only,
    #: "single" = just the first global crop (MAE).
    crop_usage: ClassVar[str] = "multi"
    #: per-step ``logs`` keys whose epoch means are reported with the epoch (MLflow, Ray Tune), so a sweep
    #: may optimise or watch them (``bamray sweep --metric``)
    epoch_logs: ClassVar[tuple[str, ...]] = ()
    #: the method has a projection head (:meth:`signal_head`), whose outputs get their own signals
    has_projection_head: ClassVar[bool] = True
    #: the heads :meth:`signal_head` looks for, the evaluated twin first (teacher / target before online)
    SIGNAL_HEADS: ClassVar[tuple[str, ...]] = (
        "teacher_projector",
        "projector",
        "teacher_head",
        "head",
    )

    def __init__(self, options: Any, ctx: MethodContext):
        super().__init__()
        self.options = options
        self.ctx = ctx

    # ------------------------------------------------------------------ interface
    def training_step(self, crops: list[torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def forward(self, crops: list[torch.Tensor], step: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        return self.training_step(crops, step)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(online, target)`` module pairs that ``update_teacher`` EMA-updates."""
        return []

    def teacher_momentum(self, step: int) -> float:
        """``options.momentum`` -> 1 over the run (``trainers.schedules.teacher_momentum``)."""
        return schedules.teacher_momentum(
            float(getattr(self.options, "momentum", 0.996)), step, self.ctx.total_steps
        )

    @torch.no_grad()
    def update_teacher(self, step: int) -> float | None:
        """EMA-update every target from its online twin; returns the momentum used (or None)."""
        pairs = self.momentum_pairs()
        if not pairs:
            return None
        m = self.teacher_momentum(step)
        for online, target in pairs:
            ema_update(online, target, m)
        return m

    def init_backbone(self, state: dict[str, torch.Tensor]) -> None:
        """Start from pretrained backbone weights (``--init-from``): the online backbone and its EMA twin
        (the teacher's starts equal to the student's, as at a fresh start), strictly: every key, every
        shape."""
        self.backbone.load_state_dict(state, strict=True)  # type: ignore[attr-defined]
        for online, target in self.momentum_pairs():
            if online is self.backbone:  # type: ignore[attr-defined]
                target.load_state_dict(state, strict=True)

    def eval_backbone(self) -> nn.Module:
        """The network whose features are evaluated (teacher backbone when the method has one)."""
        return self.backbone  # type: ignore[attr-defined]

    def signal_head(self) -> nn.Module | None:
        """The projection head the label-free signals read besides the backbone (``*_proj``): the twin of
        :meth:`eval_backbone` (teacher / target when there is one); None for a method without one (MAE)."""
        for name in self.SIGNAL_HEADS:
            head = getattr(self, name, None)
            if isinstance(head, nn.Module):
                return head
        return None


def make_teacher(module: nn.Module) -> nn.Module:
    """A frozen deep copy (the EMA target)."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """``target = m * target + (1 - m) * online`` for parameters; buffers (BN stats) are copied."""
    online_params = [p.detach() for p in online.parameters()]
    target_params = list(target.parameters())
    torch._foreach_mul_(target_params, momentum)
    torch._foreach_add_(target_params, online_params, alpha=1.0 - momentum)
    for b_t, b_o in zip(target.buffers(), online.buffers()):
        b_t.copy_(b_o)


def forward_by_resolution(module: nn.Module, crops: list[torch.Tensor]) -> torch.Tensor:
    """One forward pass per run of same-size crops (DINO's MultiCropWrapper); outputs concatenated
    crop-major: rows ``[v*B:(v+1)*B]`` belong to crop ``v``."""
    outputs = []
    start = 0
    while start < len(crops):
        end = start + 1
        while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
            end += 1
        outputs.append(module(torch.cat(crops[start:end])))
        start = end
    return torch.cat(outputs)
