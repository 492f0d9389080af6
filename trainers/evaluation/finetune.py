"""Semi-supervised evaluation (BYOL / SimCLR's 1 % and 10 % protocol), pure torch: the class-balanced label
subset, the supervised augmentation, one training step, and top-k counts.

The protocol: a class-balanced subset of the train labels; a linear head on the backbone trained end to
end (``finetune``) or on the frozen backbone (``probe``); the same network from its random init trained
with the same recipe on the same labels (``scratch``, the "supervised" row); top-1 / top-5 on the test
split. Kept free of Ray so the worker loop is a few lines and each piece is tested by hand.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torch import nn

from trainers.evaluation.linear import LinearProbe
from trainers.options import ConfigError

MODES = ("finetune", "probe", "scratch")


def parse_labels(spec: str) -> tuple[str, float]:
    """``"1%"`` -> ``("fraction", 0.01)``; ``"500"`` -> ``("count", 500)`` (images in all, class-balanced)."""
    text = str(spec).strip()
    try:
        if text.endswith("%"):
            value = float(text[:-1]) / 100.0
            if not 0.0 < value <= 1.0:
                raise ValueError
            return "fraction", value
        value = int(text)
        if value < 1:
            raise ValueError
        return "count", float(value)
    except ValueError:
        raise ConfigError(
            "--labels", f"got {spec!r}; a percentage in (0, 100] such as 1% or 10%, or a count >= 1"
        ) from None


def label_subset(labels: np.ndarray, spec: str, seed: int = 0) -> np.ndarray:
    """Sorted positions of a class-balanced subset of ``labels``: ``round(fraction x class size)`` per class,
    or ``count`` split evenly (the first classes take the remainder). Drawn by
    ``numpy.random.default_rng([seed, class])`` as the k-NN bank is. Refuses a subset that leaves a class
    without an image, naming the class and its size."""
    kind, value = parse_labels(spec)
    y = np.asarray(labels).reshape(-1)
    classes, sizes = np.unique(y, return_counts=True)
    if kind == "fraction":
        per_class = [int(round(value * n)) for n in sizes]
    else:
        base, extra = divmod(int(value), len(classes))
        per_class = [base + (1 if i < extra else 0) for i in range(len(classes))]
    chosen = []
    for cls, n, k in zip(classes, sizes, per_class):
        if k < 1:
            raise ConfigError(
                "--labels",
                f"{spec} leaves class {int(cls)} ({int(n)} train images) without a labelled image; "
                + (
                    f"ask for at least {len(classes)} (one per class)"
                    if kind == "count"
                    else f"ask for at least {100 / n:.2g}%"
                ),
            )
        if k > n:
            raise ConfigError("--labels", f"{spec} asks {k} images of class {int(cls)}, which has {int(n)}")
        rng = np.random.default_rng([int(seed), int(cls)])
        chosen.append(rng.choice(np.flatnonzero(y == cls), size=k, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


class Classifier(nn.Module):
    """Backbone + the linear probe's head (parameter-free BatchNorm, then Linear: one lr suits features of
    any scale); ``frozen`` keeps the backbone in eval mode without gradients (the probe)."""

    def __init__(self, backbone: nn.Module, feat_dim: int, num_classes: int, frozen: bool = False):
        super().__init__()
        self.backbone, self.frozen = backbone, frozen
        self.head = LinearProbe(feat_dim, num_classes)
        if frozen:
            backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # BatchNorm statistics stay the pretrained ones
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                feats = self.backbone(x)
        else:
            feats = self.backbone(x)
        return self.head(feats.flatten(1))


def augment(
    images: torch.Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.5, 1.0)
) -> torch.Tensor:
    """The supervised recipe's augmentation on a uint8 ``(N, C, S, S)`` batch: a random resized crop of
    ``scale`` of the area (aspect 3/4-4/3) back to S, and a horizontal flip with probability 0.5."""
    n, _, h, w = images.shape
    out = torch.empty_like(images)
    r = torch.rand(n, 5, generator=generator)
    for i in range(n):
        area = (scale[0] + (scale[1] - scale[0]) * float(r[i, 0])) * h * w
        aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * float(r[i, 1]))
        ch = max(1, min(h, round(math.sqrt(area / aspect))))
        cw = max(1, min(w, round(math.sqrt(area * aspect))))
        top = int(float(r[i, 2]) * (h - ch + 1))
        left = int(float(r[i, 3]) * (w - cw + 1))
        img = F.resized_crop(images[i], top, left, ch, cw, [h, w], antialias=True)
        out[i] = F.horizontal_flip(img) if float(r[i, 4]) < 0.5 else img
    return out


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """How many rows have their label among the top-k logits, per k (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels.view(-1, 1)
    return [int(hit[:, : min(k, logits.shape[1])].any(dim=1).sum()) for k in ks]


def cosine_lr(base: float, step: int, total: int, warmup: int = 0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine to 0 at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
