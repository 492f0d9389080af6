"""Rank 0's pictures of an evaluation epoch, logged to the MLflow run by step (the UI's image view steps
through them): where the backbone looks (``attention``: the last block's per-head [CLS] attention of a ViT;
``feature_norm``: the norm of a CNN's last feature map, labelled as such), how rank 0's validation sample
clusters (``embedding_map``, UMAP or PCA, coloured by class, the k-NN in the title), and for BAM the target
``P`` and source attention ``Q`` of one fixed training batch (``bam_targets``).

A picture that fails is reported on the console and skipped: it never stops a training run.
"""

from __future__ import annotations

import traceback
from typing import Any

import numpy as np
import torch

from orchestrator import pictures
from orchestrator.config import ExperimentConfig
from orchestrator.console import say
from trainers.engine import crops_from_batch

#: images in the attention / feature-norm picture
MAP_IMAGES = 6


def fixed_images(kept: dict[str, Any] | None, fixed_batch: dict[str, Any] | None) -> np.ndarray | None:
    """The images the maps are drawn on: rank 0's first validation images, else the first global crops of
    the fixed training batch (an unlabelled run). uint8 (N, C, H, W)."""
    if kept and "images" in kept:
        return np.asarray(kept["images"])[:MAP_IMAGES]
    if fixed_batch is not None:
        return np.asarray(fixed_batch["global"])[:MAP_IMAGES, 0]
    return None


def log_eval_pictures(
    log: Any,
    method: Any,
    cfg: ExperimentConfig,
    *,
    kept: dict[str, Any] | None,
    fixed_batch: dict[str, Any] | None,
    device: torch.device,
    step: int,
    epoch: int,
    knn_top1: float | None,
) -> list[str]:
    """Draw and log the epoch's pictures; returns the keys logged."""
    done = []
    tag = f"epoch {epoch}" + (f", k-NN top-1 {knn_top1:.2f} %" if knn_top1 is not None else "")
    backbone = method.eval_backbone()

    def attempt(key: str, draw: Any) -> None:
        try:
            image = draw()
        except Exception:  # noqa: BLE001 - a picture must never stop training
            say(f"picture {key} skipped: {traceback.format_exc(limit=2).strip()}")
            return
        if image is not None:
            log.log_image_step(image, key, step)
            done.append(key)

    def maps() -> Any:
        images = fixed_images(kept, fixed_batch)
        if images is None:
            return None
        return pictures.backbone_maps(backbone, images, cfg.data.mean, cfg.data.std, device, tag)[0]

    def embedding() -> Any:
        if not kept or "val" not in kept:
            return None
        feats, labels = kept["val"]
        n = cfg.eval.map_samples
        points, how = pictures.project_2d(feats[:n].float().cpu().numpy(), cfg.eval.embedding_map, cfg.seed)
        return pictures.embedding_map(
            points, labels[:n].cpu().numpy(), f"{how} of {len(points)} validation images; {tag}"
        )

    def bam() -> Any:
        if not hasattr(method, "target_matrices") or fixed_batch is None:
            return None
        crops = crops_from_batch(
            {k: torch.as_tensor(v) for k, v in fixed_batch.items()},
            cfg.data.mean,
            cfg.data.std,
            device,
            crop_usage=method.crop_usage,
        )
        p, q, stats = method.target_matrices(crops)
        return pictures.bam_matrices(p.cpu().numpy(), q.cpu().numpy(), stats, f"BAM on a fixed batch; {tag}")

    attempt("attention", maps)
    attempt("embedding_map", embedding)
    attempt("bam_targets", bam)
    return done
