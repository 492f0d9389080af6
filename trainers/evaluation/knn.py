"""Weighted k-NN classification of frozen features (DINO's protocol, Wu et al.'s InstDisc weighting).

Every test image votes with its ``k`` most cosine-similar train features; neighbour ``j`` adds
``exp(sim_j / T)`` to its class. This is the online metric BAM, DINO and lightly report, so our
figures compare with theirs only if the arithmetic is the same: L2-normalised features, top-k by
cosine, exponential weights, classes ranked by summed weight.

Distributed: :func:`knn_evaluate` all-gathers the train bank (shards may differ in size: padded to the
largest and trimmed) and all-reduces the correct / total counts of each rank's test shard, so every
rank gets the number a single process would get on the whole data. Pure PyTorch, no Ray.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainers import distributed as D
from trainers.evaluation.balanced import class_balanced_indices as balanced


@torch.no_grad()
def extract_features(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features of every ``(images, labels)`` batch: ``(N, D)`` L2-normalised float32 and ``(N,)``.

    ``images`` are float and already normalised (the clean eval transform). The model runs in eval
    mode (BatchNorm running statistics, no dropout) and is put back in the mode it was in, because
    this is called in the middle of training. Features stay on ``device`` for the k-NN matmuls.
    """
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for images, targets in batches:
            out = model(torch.as_tensor(images).to(device, non_blocking=True))
            if isinstance(out, (tuple, list)):
                out = out[0]
            feats.append(F.normalize(out.float().flatten(1), dim=1))
            labels.append(torch.as_tensor(targets).to(device=device, dtype=torch.long).flatten())
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("extract_features: `batches` yielded no batch")
    return torch.cat(feats), torch.cat(labels)


def _check_args(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
) -> None:
    if k < 1:
        raise ValueError(f"k: got {k}; must be >= 1")
    if not temperature > 0:
        raise ValueError(f"temperature: got {temperature}; must be > 0")
    if num_classes < 1:
        raise ValueError(f"num_classes: got {num_classes}; must be >= 1")
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"features must be (N, D) with the same D; got train {tuple(train_feats.shape)}, "
            f"test {tuple(test_feats.shape)}"
        )
    if train_labels.shape != train_feats.shape[:1] or test_labels.shape != test_feats.shape[:1]:
        raise ValueError(
            "labels must be (N,) matching the features' rows; got "
            f"train {tuple(train_labels.shape)} / {train_feats.shape[0]}, "
            f"test {tuple(test_labels.shape)} / {test_feats.shape[0]}"
        )


@torch.no_grad()
def _knn_counts(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
    chunk: int,
) -> torch.Tensor:
    """``[top1_correct, top5_correct, n_test]`` (float64, on the features' device)."""
    counts = torch.zeros(3, dtype=torch.float64, device=train_feats.device)
    if test_feats.shape[0] == 0:
        return counts
    if train_feats.shape[0] == 0:
        raise ValueError("knn: the train bank is empty")
    k = min(k, train_feats.shape[0])  # a bank smaller than k: every train feature votes
    top_n = min(5, k, num_classes)
    train_feats = train_feats.float()
    train_labels = train_labels.to(train_feats.device, torch.long)
    for start in range(0, test_feats.shape[0], chunk):
        q = test_feats[start : start + chunk].to(train_feats.device, torch.float32)
        y = test_labels[start : start + chunk].to(train_feats.device, torch.long)
        sim, idx = (q @ train_feats.t()).topk(k, dim=1)
        # exp((sim - max) / T): the same ranking as exp(sim / T) (one factor per row) without overflow
        # at small T (e^(1/0.01) is beyond float32).
        weights = ((sim - sim[:, :1]) / temperature).exp()
        neighbour_labels = train_labels[idx]
        votes = torch.zeros(q.shape[0], num_classes, device=q.device, dtype=weights.dtype)
        votes.scatter_add_(1, neighbour_labels, weights)
        voted = torch.zeros(q.shape[0], num_classes, device=q.device, dtype=torch.bool)
        voted.scatter_(1, neighbour_labels, True)
        ranked = votes.topk(top_n, dim=1).indices
        # A class no neighbour voted for is never a hit: DINO's full sort ranks such zero-vote classes
        # in arbitrary order, which would make top-5 depend on tie-breaking.
        hit = (ranked == y[:, None]) & voted.gather(1, ranked)
        counts[0] += hit[:, :1].sum()
        counts[1] += hit.sum()
        counts[2] += q.shape[0]
    return counts


def _percent(counts: torch.Tensor) -> dict[str, float]:
    top1, top5, n = (float(c) for c in counts.cpu())
    if n == 0:
        raise ValueError("knn: the test set is empty")
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> dict[str, float]:
    """Weighted k-NN accuracy in percent: ``{"top1", "top5"}`` (single process).

    Features must be L2-normalised (dot product = cosine). Test rows are processed ``chunk`` at a time,
    so memory is ``chunk x len(train)`` similarities whatever the test-set size. ``k`` larger than the
    bank is clipped to the bank; top-5 looks at the ``min(5, k)`` best-voted classes (as DINO) and never
    counts a class that got no vote.
    """
    _check_args(train_feats, train_labels, test_feats, test_labels, num_classes, k, temperature)
    if chunk < 1:
        raise ValueError(f"chunk: got {chunk}; must be >= 1")
    return _percent(
        _knn_counts(train_feats, train_labels, test_feats, test_labels, num_classes, k, temperature, chunk)
    )


def all_gather_variable(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank in rank order, when ranks hold different numbers of rows.

    ``torch.distributed.all_gather`` needs equal shapes: gather the row counts first, pad every shard to
    the largest, gather, then trim each part back to its true length.
    """
    if not D.is_dist():
        return x
    x = x.contiguous()
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [int(s) for s in D.all_gather_nograd(size)]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = D.all_gather_nograd(padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def knn_evaluate(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> dict[str, float]:
    """:func:`knn_classify` over data sharded across ``torch.distributed`` ranks (or a single process).

    Each rank passes its own shard of the train bank and of the test set. The bank is all-gathered
    (every test image must see every train image), the test shards are not: each rank classifies its
    own and the correct / total counts are summed. Every rank returns the same dict, equal to the
    single-process result on the concatenated data.
    """
    _check_args(train_feats, train_labels, test_feats, test_labels, num_classes, k, temperature)
    if D.is_dist():
        train_feats = all_gather_variable(train_feats.float())
        train_labels = all_gather_variable(train_labels.to(train_feats.device, torch.long))
    counts = _knn_counts(
        train_feats, train_labels, test_feats, test_labels, num_classes, k, temperature, chunk
    )
    return _percent(D.all_reduce_sum(counts))


def _to_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A tensor view of ``x``; numpy arrays are copied (IDX buffers are read-only)."""
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x))


def raw_pixel_baseline(
    train_images_uint8: np.ndarray | torch.Tensor,
    train_labels: np.ndarray | torch.Tensor,
    test_images_uint8: np.ndarray | torch.Tensor,
    test_labels: np.ndarray | torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 (%) of the weighted k-NN on raw pixels: the floor a learned representation must beat.

    Images are flattened, scaled to float and L2-normalised, exactly like learned features.
    """

    def prep(images: np.ndarray | torch.Tensor) -> torch.Tensor:
        return F.normalize(_to_tensor(images).flatten(1).float() / 255.0, dim=1)

    y_train = _to_tensor(train_labels).long()
    y_test = _to_tensor(test_labels).long()
    num_classes = int(max(int(y_train.max()), int(y_test.max()))) + 1
    return knn_classify(
        prep(train_images_uint8),
        y_train,
        prep(test_images_uint8),
        y_test,
        num_classes,
        k=k,
        temperature=temperature,
    )["top1"]


def class_balanced_indices(labels: np.ndarray | torch.Tensor, fraction: float, seed: int = 0) -> np.ndarray:
    """:func:`trainers.evaluation.balanced.class_balanced_indices` of ``labels``, a tensor on any device or
    an array: the k-NN bank and the validation subset of every path, so "the same bank" is one set."""
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return balanced(y, fraction, seed)
