"""Projection / prediction heads (small independent modules, as in lightly)."""

from __future__ import annotations

from torch import nn


class MLPHead(nn.Module):
    """``num_layers``-layer MLP: Linear-(BN)-GELU blocks then a linear output.

    BAM and DINO use GELU without BatchNorm (BN-free ViT training); BYOL/SimCLR use BN + ReLU. On a
    ResNet, whose pooled features are post-ReLU averages with a large common component, the BN-free
    head keeps that component: the projections of a random network then have a mean cosine of 0.86,
    and attention over the batch starts nearly flat. BN centres them (mean cosine 0.31).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 3,
        batch_norm: bool = False,
        activation: str = "gelu",
    ):
        super().__init__()
        act = {"gelu": nn.GELU, "relu": nn.ReLU}[activation]
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(max(num_layers - 1, 0)):
            layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(act())
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim))
        self.net = nn.Sequential(*layers)
        self.apply(_init)

    def forward(self, x):
        return self.net(x)


class DINOHead(nn.Module):
    """DINO head: MLP to a bottleneck, L2-normalise, weight-normalised prototype layer."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        norm_last_layer: bool = True,
        batch_norm: bool = False,
    ):
        super().__init__()
        self.mlp = MLPHead(
            in_dim,
            hidden_dim,
            bottleneck_dim,
            num_layers=num_layers,
            activation="gelu",
            batch_norm=batch_norm,
        )
        self.last_layer = nn.utils.parametrizations.weight_norm(
            nn.Linear(bottleneck_dim, out_dim, bias=False)
        )
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad = False

    def forward(self, x):
        x = nn.functional.normalize(self.mlp(x), dim=-1)
        return self.last_layer(x)


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
