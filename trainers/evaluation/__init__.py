"""Evaluation of frozen features: weighted k-NN (DINO / InstDisc protocols) and a linear probe."""

from __future__ import annotations

import dataclasses

from trainers.options import opt


@dataclasses.dataclass
class EvalConfig:
    """Online k-NN (every ``knn_freq`` epochs and at the end) and the linear probe."""

    knn_freq: int = opt(1, ge=0, help="k-NN every N epochs (0 = only at the end)")
    knn_k: int = opt(20, ge=1, help="neighbours (DINO protocol: 20; InstDisc: 200)")
    knn_temperature: float = opt(0.07, gt=0.0, help="weights exp(sim / T) (DINO: 0.07; InstDisc: 0.1)")
    knn_train_fraction: float = opt(1.0, gt=0.0, le=1.0, help="class-balanced fraction of train as the bank")
    knn_eval_fraction: float = opt(1.0, gt=0.0, le=1.0, help="fraction of the validation split")
    linear_epochs: int = opt(10, ge=1)
    linear_lr: float = opt(0.1, gt=0.0, help="SGD lr of the probe (cosine)")
    linear_batch_size: int = opt(256, ge=1)
    linear_at_end: bool = opt(False, help="run the linear probe when training ends")
