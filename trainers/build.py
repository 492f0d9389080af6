"""One place that builds a method (backbone + heads + teacher) and its engine from an experiment config.

The Ray Train worker, the bench's bare loop and the quality benchmark all build through here, so "the
same model" means the same code path: the same seed before the weights are drawn, the same small-image
stem, the same memory layout and the same precision.

``cfg`` is any object with the experiment config's sections (``seed``, ``method_name``, ``method``,
``model``, ``data``, ``optim``, ``train``); trainers/ does not import the orchestrator's config class.
"""

from __future__ import annotations

from typing import Any

import torch

from trainers.backbones import build_backbone, crop_sizes
from trainers.engine import Engine, resolve_precision
from trainers.methods import Method, MethodContext, get_method


def build_method(
    cfg: Any,
    *,
    device: torch.device | str,
    steps_per_epoch: int,
    batch_size: int,
    world_size: int = 1,
) -> Method:
    """The method of ``cfg`` on ``device``; weights drawn from ``cfg.seed`` (identical on every rank).

    ``batch_size`` is per worker. With ``train.channels_last`` the parameters are stored NHWC, the
    layout oneDNN and cuDNN run convolutions fastest in (feed it crops made with ``channels_last=True``).
    """
    torch.manual_seed(cfg.seed)
    d = cfg.data
    backbone, feat_dim = build_backbone(
        cfg.model, in_chans=d.channels, default_img_size=d.global_crop_size, crop_sizes=crop_sizes(d)
    )
    ctx = MethodContext(
        backbone=backbone,
        feat_dim=feat_dim,
        num_global_crops=d.global_crops,
        num_local_crops=d.local_crops,
        batch_size=batch_size,
        world_size=world_size,
        steps_per_epoch=steps_per_epoch,
        epochs=cfg.optim.epochs,
        in_chans=d.channels,
        image_size=d.global_crop_size,
    )
    method = get_method(cfg.method_name)(cfg.method, ctx).to(device)
    if cfg.train.channels_last:
        method.to(memory_format=torch.channels_last)
    return method


def build_engine(
    cfg: Any,
    method: Method,
    *,
    device: torch.device | str,
    steps_per_epoch: int,
    global_batch: int,
    module: torch.nn.Module | None = None,
) -> Engine:
    """The engine (optimiser, schedules, precision) that trains ``method``; ``module`` is what is called
    forward (the DDP-wrapped method under Ray Train)."""
    return Engine(
        method,
        cfg.optim,
        steps_per_epoch=steps_per_epoch,
        global_batch=global_batch,
        device=device,
        precision=resolve_precision(cfg.train.precision, device),
        module=module,
    )
