"""SimCLR (Chen et al., 2020): backbone + BN/ReLU MLP projector, NT-Xent over the two global crops.

Negatives are every other view in the batch, so the batch is the method's dictionary: with
``gather_distributed`` the loss sees the global batch of all workers (differentiable all-gather).
"""

from __future__ import annotations

import torch

from trainers.heads import MLPHead
from trainers.losses.simclr import NTXentLoss
from trainers.methods.base import Method, MethodContext, forward_by_resolution
from trainers.methods.options import SimCLROptions


class SimCLR(Method):
    name = "simclr"
    Options = SimCLROptions
    crop_usage = "global"

    def __init__(self, options: SimCLROptions, ctx: MethodContext):
        super().__init__(options, ctx)
        o = options
        self.backbone = ctx.backbone
        self.projector = MLPHead(
            ctx.feat_dim,
            o.proj_hidden_dim,
            o.proj_out_dim,
            num_layers=o.proj_layers,
            batch_norm=True,
            activation="relu",
        )
        self.criterion = NTXentLoss(o.temperature, o.gather_distributed)

    def training_step(self, crops: list[torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        z1, z2 = self.projector(forward_by_resolution(self.backbone, crops[:2])).chunk(2)
        return self.criterion(z1, z2), {}
