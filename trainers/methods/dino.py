"""DINO (Caron et al., 2021): self-distillation with no labels.

Student = backbone + DINOHead on every crop; teacher = EMA copy of both on the global crops only
(cosine momentum ``momentum`` -> 1). Targets are centred and sharpened (``trainers.losses.dino``); the
teacher temperature warms up linearly over ``warmup_teacher_temp_epochs``. As in the official code the
prototype layer is frozen for the first ``freeze_last_layer_epochs`` (its gradients are zeroed), which
keeps the randomly initialised prototypes from chasing a still-random backbone.
"""

from __future__ import annotations

import torch
from torch import nn

from trainers.heads import DINOHead
from trainers.losses.dino import DINOLoss
from trainers.methods.base import Method, MethodContext, forward_by_resolution, make_teacher
from trainers.methods.options import DINOOptions
from trainers.schedules import teacher_temperature


class DINO(Method):
    name = "dino"
    Options = DINOOptions
    crop_usage = "multi"

    def __init__(self, options: DINOOptions, ctx: MethodContext):
        super().__init__(options, ctx)
        o = options
        self.backbone = ctx.backbone
        self.head = DINOHead(
            ctx.feat_dim,
            o.out_dim,
            o.hidden_dim,
            o.bottleneck_dim,
            o.head_layers,
            o.norm_last_layer,
            batch_norm=o.head_batch_norm,
        )
        self.teacher_backbone = make_teacher(self.backbone)
        self.teacher_head = make_teacher(self.head)
        self.criterion = DINOLoss(o.out_dim, ctx.num_global_crops, o.student_temp, o.center_momentum)
        self._last_layer_frozen = False
        for p in self.head.last_layer.parameters():
            if p.requires_grad:  # a zero gradient (not None) keeps DDP's reducer in step on every worker
                p.register_hook(lambda g: torch.zeros_like(g) if self._last_layer_frozen else g)

    def training_step(self, crops: list[torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        o = self.options
        epoch = step / max(self.ctx.steps_per_epoch, 1)
        self._last_layer_frozen = epoch < o.freeze_last_layer_epochs
        temp = teacher_temperature(epoch, o.warmup_teacher_temp, o.teacher_temp, o.warmup_teacher_temp_epochs)
        student = self.head(forward_by_resolution(self.backbone, crops))
        with torch.no_grad():
            teacher = self.teacher_head(
                forward_by_resolution(self.teacher_backbone, crops[: self.ctx.num_global_crops])
            )
        return self.criterion(student, teacher, temp), {"teacher_temp": temp}

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.teacher_backbone), (self.head, self.teacher_head)]

    def eval_backbone(self) -> nn.Module:
        return self.teacher_backbone
