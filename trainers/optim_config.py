"""The optimisation section of a config (``optim.*``), apart from the optimisers it builds
(:mod:`trainers.optim`): torch-free, so that unpickling a run's config (Ray Train's controller does) does
not import torch."""

from __future__ import annotations

import dataclasses

from trainers.options import opt


@dataclasses.dataclass
class OptimConfig:
    """Optimisation section. ``lr`` is per 256 images: the applied peak lr is ``lr * global_batch / 256``."""

    optimizer: str = opt("adamw", choices=("adamw", "lars", "sgd"))
    lr: float = opt(5e-4, gt=0.0, le=10.0, help="peak lr per 256 images (linear scaling rule)")
    min_lr: float = opt(1e-6, ge=0.0, help="final lr of the cosine schedule")
    warmup_epochs: float = opt(1.0, ge=0.0, help="linear lr warm-up")
    weight_decay: float = opt(0.04, ge=0.0, help="start of the cosine weight-decay schedule")
    weight_decay_end: float = opt(0.4, ge=0.0, help="end of the cosine weight-decay schedule")
    momentum: float = opt(0.9, ge=0.0, lt=1.0, help="SGD / LARS momentum")
    clip_grad: float = opt(3.0, ge=0.0, help="max gradient norm (0 = off)")
    batch_size: int = opt(128, ge=2, help="images per worker per step")
    epochs: int = opt(10, ge=1)
