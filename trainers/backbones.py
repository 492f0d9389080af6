"""Backbones: any timm model by name, headless, with a stem that suits the image size.

timm gives every architecture by name; we strip its classifier (``num_classes=0``) so the model returns
pooled features. Weights are never downloaded unless ``pretrained`` is set (and a hub is reachable).

Why a small-image stem: timm's models are built for ImageNet. A ResNet's stem (7x7 stride-2 conv and a
stride-2 max-pool) shrinks a 28 px image to 7x7 before the first block and to 1x1 in the last stage, so
most of the network sees almost nothing; a ViT's 16 px patch cuts it into one or four tokens. The SSL
libraries that report small-image results (solo-learn, lightly) replace the ResNet stem by a 3x3
stride-1 conv without max-pool, and use 4 px patches for ViTs on 32 px data. ``model.stem`` does the
same for any timm ResNet-family model and any ViT-like model; ``auto`` picks by the image size.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainers.options import ConfigError, opt

if TYPE_CHECKING:
    from timm.models.resnet import ResNet
    from torch import nn

#: ``stem: auto`` chooses the small-image stem up to this global crop size (CIFAR / MNIST / STL-64 scale).
SMALL_STEM_MAX_SIZE = 64
#: ViT patch sizes ``stem: small`` may choose, largest first; the grid keeps at least this many patches a side.
SMALL_PATCH_CANDIDATES = (16, 8, 7, 4, 2, 1)
MIN_PATCH_GRID = 7


@dataclasses.dataclass
class ModelConfig:
    """Backbone section of the experiment config."""

    backbone: str = opt("vit_tiny_patch16_224", help="any timm model name (timm.list_models())")
    stem: str = opt(
        "auto",
        choices=("auto", "imagenet", "small"),
        help="small = ResNet stem 3x3 stride 1 without max-pool, ViT patch giving a >= 7x7 grid; "
        f"imagenet = timm's own; auto = small when the global crop is <= {SMALL_STEM_MAX_SIZE} px",
    )
    pretrained: bool = opt(False, help="load timm pretrained weights (needs network access)")
    img_size: int | None = opt(
        None, gt=0, help="override input size for ViT-like models (default: global crop size)"
    )
    patch_size: int | None = opt(None, gt=0, help="ViT patch size (default: chosen by model.stem)")
    drop_path_rate: float = opt(0.0, ge=0.0, lt=1.0)
    init_from: str = opt(
        "",
        help="start from these backbone weights (weights only, a new schedule): an MLflow run id (its "
        "'final' export) or an exported directory; `bamray train --init-from`. Not --resume",
    )
    backbone_kwargs: dict = opt(
        {},
        help="extra keyword arguments passed to timm.create_model "
        "(e.g. ResNet layers: [1, 1, 1, 1], channels: [32, 64, 128, 256])",
    )


@functools.lru_cache(maxsize=1)
def _known_models() -> frozenset[str]:
    import timm  # here, not at the top: a config (and every Ray process that unpickles one) stays light

    names = frozenset(timm.list_models())
    _write_names_cache(names)
    return names


def _names_cache() -> Path | None:
    """Where the names of this timm version's models are kept (``$BAMRAY_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/bamray``, else ``~/.cache/bamray``); None without timm."""
    try:
        version = importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:
        return None
    from trainers.fileio import user_cache_dir

    return user_cache_dir() / f"timm-{version}-models.json"


def _cached_names() -> frozenset[str]:
    path = _names_cache()
    try:
        return frozenset(json.loads(path.read_text())) if path is not None else frozenset()
    except (OSError, ValueError, TypeError):
        return frozenset()


def _write_names_cache(names: frozenset[str]) -> None:
    """Atomically (a reader never sees half a file); a cache that cannot be written is only slower."""
    path = _names_cache()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(sorted(names)))
        os.replace(tmp, path)
    except OSError:
        pass


def check_backbone_name(name: str, path: str = "model.backbone") -> None:
    """Raise ConfigError when ``name`` is not a timm model (checked before any job starts).

    A name found in the cached list of this timm version's models passes without importing timm: that
    import (timm, torchvision and ``torch._dynamo`` with it) is about 4 s of a driver's start-up, and a
    model name of a given timm version does not go away. Any other name is checked by timm itself, which
    refreshes the cache."""
    base = name.split(".")[0]  # timm allows 'model.tag'
    if base in _cached_names():
        return
    if base not in _known_models():
        close = [m for m in _known_models() if base.split("_")[0] in m][:8]
        raise ConfigError(
            path, f"unknown timm model {name!r}; e.g. {close or ['resnet18', 'vit_small_patch16_224']}"
        )


def resolve_stem(stem: str, img_size: int | None) -> str:
    """``auto`` -> ``small`` for images up to :data:`SMALL_STEM_MAX_SIZE` px, else ``imagenet``."""
    if stem != "auto":
        return stem
    return "small" if img_size is not None and img_size <= SMALL_STEM_MAX_SIZE else "imagenet"


def small_patch_size(crop_sizes: Sequence[int]) -> int:
    """The largest patch that divides every crop size and leaves the global crop (the first) a grid of
    at least :data:`MIN_PATCH_GRID` patches a side: 28 px with 12 px locals -> 4, 32 -> 4, 64 -> 8."""
    sizes = [int(s) for s in crop_sizes if s]
    for p in SMALL_PATCH_CANDIDATES:
        if all(s % p == 0 for s in sizes) and sizes[0] // p >= MIN_PATCH_GRID:
            return p
    return 1


def crop_sizes(data_cfg: Any) -> tuple[int, ...]:
    """Every crop size the backbone sees, global first (a ViT patch must divide them all)."""
    if data_cfg.local_crops:
        return (data_cfg.global_crop_size, data_cfg.local_crop_size)
    return (data_cfg.global_crop_size,)


def patch_size_for(cfg: ModelConfig, crop_sizes: Sequence[int]) -> int | None:
    """The ViT patch size the backbone is built with: ``model.patch_size`` when set, the small-image
    patch when the stem resolves to ``small``, else None (timm's own)."""
    if cfg.patch_size is not None:
        return cfg.patch_size
    if resolve_stem(cfg.stem, crop_sizes[0] if crop_sizes else None) == "small":
        return small_patch_size(crop_sizes)
    return None


def small_resnet_stem(model: ResNet, in_chans: int) -> None:
    """Replace a timm ResNet's stem (7x7 stride-2 conv, or the deep 3-conv stem, then a stride-2
    max-pool) by one 3x3 stride-1 conv and no pooling, as solo-learn and lightly do for 32 px data.
    The new conv keeps the old stem's output width, so every later layer is unchanged."""
    from torch import nn

    width = [m for m in model.conv1.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
    model.conv1 = nn.Conv2d(in_chans, width, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def build_backbone(
    cfg: ModelConfig,
    in_chans: int = 3,
    default_img_size: int | None = None,
    crop_sizes: Sequence[int] = (),
) -> tuple[nn.Module, int]:
    """Create ``cfg.backbone`` headless with the stem ``cfg.stem`` asks for; returns ``(module, feature_dim)``.

    ``crop_sizes``: every crop size the model will see, global first (the ViT patch must divide them
    all); defaults to ``(default_img_size,)``. ``img_size``/``patch_size`` are passed only to
    architectures whose constructor takes them (ViTs, DeiT, ...): CNNs are size-agnostic.
    """
    import timm
    from timm.models.resnet import ResNet

    check_backbone_name(cfg.backbone)
    img_size = cfg.img_size or default_img_size
    sizes = tuple(crop_sizes) or ((img_size,) if img_size else ())
    stem = resolve_stem(cfg.stem, sizes[0] if sizes else None)
    base: dict[str, Any] = {"pretrained": cfg.pretrained, "num_classes": 0, "in_chans": in_chans}
    if cfg.drop_path_rate:
        base["drop_path_rate"] = cfg.drop_path_rate
    base.update(cfg.backbone_kwargs)
    # ViT-like constructors take these; CNNs are size-agnostic and refuse them (TypeError).
    vit_kwargs: dict[str, Any] = {"dynamic_img_size": True}  # local crops are smaller than global ones
    if img_size is not None:
        vit_kwargs["img_size"] = img_size
    patch = patch_size_for(cfg, sizes)
    if patch is not None:
        vit_kwargs["patch_size"] = patch
    try:
        return _feature_model(timm.create_model(cfg.backbone, **base, **vit_kwargs))
    except TypeError as err:
        if cfg.patch_size is not None:
            raise ConfigError(
                "model.patch_size", f"{cfg.backbone} takes no patch_size; leave it unset"
            ) from err
    model = timm.create_model(cfg.backbone, **base)  # a CNN: size-agnostic, its stem is set here
    if stem == "small" and isinstance(model, ResNet):
        small_resnet_stem(model, in_chans)
    elif stem == "small" and cfg.stem == "small":  # asked for explicitly; `auto` keeps timm's stem
        raise ConfigError(
            "model.stem",
            f"no small-image stem for {cfg.backbone} (known: timm ResNet-family and "
            "ViT-like models); use imagenet or auto",
        )
    return _feature_model(model)


def _feature_model(model: nn.Module) -> tuple[nn.Module, int]:
    return model, int(model.num_features)
