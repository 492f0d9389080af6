"""BYOL (Grill et al., 2020, Algorithm 1): online backbone + projector + predictor regress an EMA target.

The target (backbone + projector) follows ``xi <- tau xi + (1 - tau) theta`` with tau on a cosine
schedule from ``momentum`` to 1 (``Method.teacher_momentum``). Only the two global crops are used
(views ``t`` and ``t'``); heads are 2-layer MLPs with BatchNorm + ReLU as in the paper. The evaluated
encoder is the online one (the algorithm's output is ``f_theta``).
"""

from __future__ import annotations

import torch
from torch import nn

from trainers.heads import MLPHead
from trainers.losses.byol import symmetric_byol_loss
from trainers.methods.base import Method, MethodContext, forward_by_resolution, make_teacher
from trainers.methods.options import BYOLOptions


class BYOL(Method):
    name = "byol"
    Options = BYOLOptions
    crop_usage = "global"

    def __init__(self, options: BYOLOptions, ctx: MethodContext):
        super().__init__(options, ctx)
        o = options
        head = {"num_layers": 2, "batch_norm": True, "activation": "relu"}
        self.backbone = ctx.backbone
        self.projector = MLPHead(ctx.feat_dim, o.proj_hidden_dim, o.proj_out_dim, **head)
        self.predictor = MLPHead(o.proj_out_dim, o.pred_hidden_dim, o.proj_out_dim, **head)
        self.target_backbone = make_teacher(self.backbone)
        self.target_projector = make_teacher(self.projector)

    def training_step(self, crops: list[torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        views = crops[:2]
        p1, p2 = self.predictor(self.projector(forward_by_resolution(self.backbone, views))).chunk(2)
        with torch.no_grad():
            t1, t2 = self.target_projector(forward_by_resolution(self.target_backbone, views)).chunk(2)
        return symmetric_byol_loss(p1, p2, t1, t2), {}

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]

    def eval_backbone(self) -> nn.Module:
        return self.backbone

    def signal_head(self) -> nn.Module:
        return self.projector  # the online twin, as eval_backbone
