"""Offline evaluation of a backbone on clean views: features, the linear probe, and raw-pixel baselines.

One code path for every offline figure: ``bamray eval linear``, the quality benchmark's linear probe and
its random-init and raw-pixel rows all embed the same clean centre crops (the torch twin of the online
k-NN's Ray pipeline, bit-identical views) and feed the same ``knn_classify`` / ``linear_probe``. So
"learned vs raw pixels on the same bank" compares features, not code paths.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch
from torch import nn

from orchestrator import checkpointing as ckpt
from orchestrator import tracking
from orchestrator.metric_names import mlflow_key
from trainers.loop import embed

EMBED_BATCH = 256


def clean_loader(
    data_cfg: Any, split: str, *, fraction: float = 1.0, seed: int = 0, batch_size: int = EMBED_BATCH
):
    """Batches ``{"image": uint8 (N, C, S, S), "label"}`` of the clean views of ``split`` (the online
    k-NN's selection for the same ``fraction`` and ``seed``)."""
    from torch.utils.data import DataLoader

    from data.torch_dataset import CleanTorchDataset, collate_batch

    ds = CleanTorchDataset(data_cfg, split=split, fraction=fraction, seed=seed)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate_batch)
    return (b for b in loader if b)


def clean_features(
    model: nn.Module,
    data_cfg: Any,
    split: str,
    device: torch.device | str,
    *,
    fraction: float = 1.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features of ``model`` (eval mode) on the clean views, and their labels."""
    batches = ((b["image"], b["label"]) for b in clean_loader(data_cfg, split, fraction=fraction, seed=seed))
    return embed(model, batches, device, data_cfg=data_cfg)


def raw_pixel_features(
    data_cfg: Any, split: str, *, fraction: float = 1.0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean views themselves as features: pixels / 255, flattened, L2-normalised (the online k-NN's
    raw-pixel row), with their labels."""
    batches = ((b["image"], b["label"]) for b in clean_loader(data_cfg, split, fraction=fraction, seed=seed))
    return embed(nn.Flatten(), batches, "cpu")


def run_linear_eval(
    run: str,
    tracking_uri: str | None = None,
    *,
    checkpoint: str = "final",
    epochs: int | None = None,
    device: str | None = None,
) -> float:
    """`bamray eval linear --run <id | exported directory>`: the backbone found as every downstream command
    finds it (:func:`orchestrator.downstream.source.resolve_backbone`: a run's ``checkpoint`` = "final" or
    "best_knn", or an export), its clean train / test features (plain torch, no Ray), the linear probe;
    ``linear_top1`` (best validation top-1, %) and the per-epoch validation top-1 go to the run (none
    for a plain directory)."""
    from mlflow.entities import Metric

    from orchestrator.downstream.source import resolve_backbone
    from orchestrator.training.data_prep import prepare_data, require_labels
    from trainers.evaluation.linear import linear_probe

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        backbone = resolve_backbone(run, tmp, checkpoint=checkpoint, tracking_uri=tracking_uri)
        model, cfg = ckpt.load_backbone(backbone.directory, device=dev)
    cfg, meta = prepare_data(cfg)
    # the labelled set, viewed and normalised as the run's training data
    data, meta = require_labels(cfg, meta, backbone.label, "the linear probe")
    train_f, train_y = clean_features(model, data, "train", dev, seed=cfg.seed)
    val_f, val_y = clean_features(model, data, "test", dev, seed=cfg.seed)
    res = linear_probe(
        train_f,
        train_y,
        val_f,
        val_y,
        int(meta["num_classes"]),
        epochs=epochs or cfg.eval.linear_epochs,
        lr=cfg.eval.linear_lr,
        batch_size=cfg.eval.linear_batch_size,
        seed=cfg.seed,
        device=dev,
    )
    if backbone.run_id is None:
        return float(res["top1"])
    ts = int(time.time() * 1000)
    points = [
        Metric(mlflow_key("linear_val_top1"), float(h["val_top1"]), ts, int(h["epoch"]))
        for h in res["history"]
    ]
    points.append(Metric(mlflow_key("linear_top1"), float(res["top1"]), ts, 0))
    c = tracking.client(backbone.tracking_uri)
    tracking.with_retry(c.log_batch, backbone.run_id, metrics=points)
    tracking.with_retry(c.set_tag, backbone.run_id, "linear_probe_artifact", checkpoint)
    return float(res["top1"])
