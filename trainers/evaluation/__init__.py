"""Evaluation of frozen features: weighted k-NN (DINO / InstDisc protocols) and a linear probe."""

from __future__ import annotations

import dataclasses

from trainers.options import opt


@dataclasses.dataclass
class EvalConfig:
    """Online k-NN (every ``knn_freq`` epochs and at the end) and the linear probe."""

    knn_freq: int = opt(1, ge=0, help="k-NN (and label-free signals) every N epochs (0 = only at the end)")
    dataset: str = opt(
        "",
        help="labelled data set (under data.data_root) the k-NN uses; empty = the training set, "
        "when it has labels (an unlabelled one then gets the label-free signals only)",
    )
    path: str = opt("", help="explicit shard directory or URI of that labelled set (overrides eval.dataset)")
    signal_samples: int = opt(
        512,
        ge=0,
        le=65536,
        help="images of the fixed held-out sample the label-free signals (RankMe, std, alignment, "
        "uniformity) are computed on (0 = off)",
    )
    knn_k: int = opt(20, ge=1, help="neighbours (DINO protocol: 20; InstDisc: 200)")
    knn_temperature: float = opt(0.07, gt=0.0, help="weights exp(sim / T) (DINO: 0.07; InstDisc: 0.1)")
    knn_train_fraction: float = opt(1.0, gt=0.0, le=1.0, help="class-balanced fraction of train as the bank")
    knn_eval_fraction: float = opt(1.0, gt=0.0, le=1.0, help="fraction of the validation split")
    linear_epochs: int = opt(10, ge=1)
    linear_lr: float = opt(0.1, gt=0.0, help="SGD lr of the probe (cosine)")
    linear_batch_size: int = opt(256, ge=1)
    linear_at_end: bool = opt(False, help="run the linear probe when training ends")
    pictures: bool = opt(
        True,
        help="at every k-NN epoch, log PNGs by step: attention maps (ViT; a feature-norm map for a CNN), "
        "an embedding map of the validation sample, and for BAM its target / attention matrices",
    )
    embedding_map: str = opt(
        "umap",
        choices=("umap", "pca"),
        help="2-D projection of the embedding map: UMAP (umap-learn; its first fit on a machine compiles "
        "for about 20 s, later processes load the compiled code) or PCA",
    )
    map_samples: int = opt(
        1000, ge=10, le=20000, help="validation images of the embedding map (rank 0's share)"
    )
