"""Optimisers (AdamW / LARS / SGD) with DINO-style parameter groups and scheduled lr / weight decay."""

from __future__ import annotations

import torch
from torch import nn

from trainers.optim_config import OptimConfig


class LARS(torch.optim.Optimizer):
    """LARS (You et al.) with the usual exclusions: no adaptation / decay for biases and 1-D params."""

    def __init__(
        self,
        params,
        lr: float = 0.1,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ):
        super().__init__(
            params,
            dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient),
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    q = torch.where(
                        (param_norm > 0) & (update_norm > 0),
                        g["trust_coefficient"] * param_norm / update_norm,
                        torch.ones_like(param_norm),
                    )
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay only on >1-D weights (no decay on biases / norms / tokens), as DINO and BAM."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (
            no_decay
            if p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name
            else decay
        ).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "no_weight_decay": True}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return LARS(groups, lr=cfg.lr, momentum=cfg.momentum)
