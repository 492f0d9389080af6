"""Linear probe on frozen features (the BAM / DINO protocol, on pre-extracted features).

``BatchNorm1d(affine=False)`` then ``Linear``, SGD with momentum 0.9 and no weight decay, cosine lr
per step, best validation top-1 reported (as the official ``eval_linear.py``). Training on cached
features instead of re-running the frozen backbone every epoch gives the same probe without
augmentation at a fraction of the cost, which is what an online / end-of-run figure needs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class LinearProbe(nn.Module):
    """Parameter-free BatchNorm (standardises the features, so one lr suits any backbone) + Linear."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


@torch.no_grad()
def _top1(model: nn.Module, feats: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    correct = 0
    for start in range(0, feats.shape[0], batch_size):
        logits = model(feats[start : start + batch_size])
        correct += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    return 100.0 * correct / feats.shape[0]


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    epochs: int = 10,
    lr: float = 0.1,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Train a linear classifier on frozen features; returns ``{"top1", "final_top1", "history"}``.

    ``top1`` is the best validation top-1 (%) over epochs (the published protocol), ``final_top1`` the
    last epoch's, ``history`` one ``{"epoch", "loss", "lr", "val_top1"}`` per epoch. Initialisation
    (``N(0, 0.01)`` weights, zero bias, as DINO) and shuffling use a generator seeded by ``seed``, so the
    result is deterministic and the global RNG is left untouched.
    """
    if epochs < 1:
        raise ValueError(f"epochs: got {epochs}; must be >= 1")
    if not lr > 0:
        raise ValueError(f"lr: got {lr}; must be > 0")
    if batch_size < 2:
        raise ValueError(f"batch_size: got {batch_size}; must be >= 2 (BatchNorm needs 2 rows)")
    if num_classes < 2:
        raise ValueError(f"num_classes: got {num_classes}; must be >= 2")
    if train_feats.ndim != 2 or val_feats.ndim != 2 or train_feats.shape[1] != val_feats.shape[1]:
        raise ValueError(
            f"features must be (N, D) with the same D; got train {tuple(train_feats.shape)}, "
            f"val {tuple(val_feats.shape)}"
        )
    if train_feats.shape[0] < 2 or val_feats.shape[0] < 1:
        raise ValueError(
            f"need >= 2 train and >= 1 validation rows; got {train_feats.shape[0]} and {val_feats.shape[0]}"
        )
    if train_labels.shape != train_feats.shape[:1] or val_labels.shape != val_feats.shape[:1]:
        raise ValueError("labels must be (N,) matching the features' rows")

    device = torch.device(device)
    x_train = train_feats.to(device, torch.float32)
    y_train = train_labels.to(device, torch.long)
    x_val = val_feats.to(device, torch.float32)
    y_val = val_labels.to(device, torch.long)

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # nn.Linear's default init draws from the global RNG
        model = LinearProbe(x_train.shape[1], num_classes)
    with torch.no_grad():
        model.fc.weight.normal_(0.0, 0.01, generator=gen)
        model.fc.bias.zero_()
    model.to(device)

    n = x_train.shape[0]
    # A trailing batch of one row would break BatchNorm in training mode: drop it (it changes every
    # epoch with the shuffle, so no sample is ignored for good).
    steps_per_epoch = n // batch_size + (1 if n % batch_size > 1 else 0)
    total_steps = epochs * steps_per_epoch
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)

    history: list[dict[str, float]] = []
    step = 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n, generator=gen).to(device)
        loss_sum, seen = 0.0, 0
        epoch_lr = lr
        for b in range(steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            epoch_lr = 0.5 * lr * (1.0 + math.cos(math.pi * step / total_steps))
            for group in optimizer.param_groups:
                group["lr"] = epoch_lr
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * idx.numel()
            seen += idx.numel()
            step += 1
        model.eval()
        val_top1 = _top1(model, x_val, y_val, max(batch_size, 1024))
        history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "lr": epoch_lr, "val_top1": val_top1})

    return {
        "top1": max(h["val_top1"] for h in history),
        "final_top1": history[-1]["val_top1"],
        "history": history,
    }
