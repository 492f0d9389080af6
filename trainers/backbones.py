"""Backbones: any timm model by name, headless, with small-image overrides.

timm gives every architecture by name; we strip its classifier (``num_classes=0``) so the model returns
pooled features, and pass ``img_size``/``patch_size`` for ViT-like models so 28-32 px images work.
Weights are never downloaded unless ``pretrained`` is set (and a hub is reachable).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import timm
import torch
from torch import nn

from trainers.options import ConfigError, opt


@dataclasses.dataclass
class ModelConfig:
    """Backbone section of the experiment config."""

    backbone: str = opt("vit_tiny_patch16_224", help="any timm model name (timm.list_models())")
    pretrained: bool = opt(False, help="load timm pretrained weights (needs network access)")
    img_size: int | None = opt(None, gt=0, help="override input size for ViT-like models (default: global crop size)")
    patch_size: int | None = opt(None, gt=0, help="override patch size for ViT-like models")
    drop_path_rate: float = opt(0.0, ge=0.0, lt=1.0)
    backbone_kwargs: dict = opt({}, help="extra keyword arguments passed to timm.create_model")


@functools.lru_cache(maxsize=1)
def _known_models() -> frozenset[str]:
    return frozenset(timm.list_models())


def check_backbone_name(name: str, path: str = "model.backbone") -> None:
    """Raise ConfigError when ``name`` is not a timm model (checked before any job starts)."""
    base = name.split(".")[0]  # timm allows 'model.tag'
    if base not in _known_models():
        close = [m for m in _known_models() if base.split("_")[0] in m][:8]
        raise ConfigError(path, f"unknown timm model {name!r}; e.g. {close or ['resnet18', 'vit_small_patch16_224']}")


def build_backbone(cfg: ModelConfig, in_chans: int = 3, default_img_size: int | None = None) -> tuple[nn.Module, int]:
    """Create ``cfg.backbone`` headless; returns ``(module, feature_dim)``.

    ``img_size``/``patch_size`` are passed only to architectures whose constructor takes them
    (ViTs, DeiT, ...): CNNs are size-agnostic.
    """
    check_backbone_name(cfg.backbone)
    base: dict[str, Any] = {"pretrained": cfg.pretrained, "num_classes": 0, "in_chans": in_chans}
    if cfg.drop_path_rate:
        base["drop_path_rate"] = cfg.drop_path_rate
    base.update(cfg.backbone_kwargs)
    # ViT-like constructors take these; CNNs are size-agnostic and refuse them (TypeError).
    vit_kwargs: dict[str, Any] = {"dynamic_img_size": True}  # local crops are smaller than global ones
    img_size = cfg.img_size or default_img_size
    if img_size is not None:
        vit_kwargs["img_size"] = img_size
    if cfg.patch_size is not None:
        vit_kwargs["patch_size"] = cfg.patch_size
    try:
        model = timm.create_model(cfg.backbone, **base, **vit_kwargs)
    except TypeError as err:
        if cfg.patch_size is not None:
            raise ConfigError("model.patch_size", f"{cfg.backbone} takes no patch_size; leave it unset") from err
        model = timm.create_model(cfg.backbone, **base)
    return model, int(model.num_features)


def feature_dim(model: nn.Module) -> int:
    return int(model.num_features)


@torch.no_grad()
def extract_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled backbone features (CLS token for ViTs, global pool for CNNs)."""
    return model(images)
