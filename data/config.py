"""Data section of the experiment config."""

from __future__ import annotations

import dataclasses
from typing import Any

from trainers.options import ConfigError, opt


@dataclasses.dataclass
class DataConfig:
    """Where the shards are and how multi-crop views are made (BYOL/DINO augmentations).

    ``path`` is a directory (local path or pyarrow/fsspec URI, e.g. ``s3://bucket/fmnist``) holding
    ``train/*.parquet``, ``test/*.parquet`` and ``meta.json`` as written by ``bamray data prepare``.
    Empty ``path`` means ``<data_root>/<dataset>``.
    """

    dataset: str = opt("fashion-mnist", help="name of a prepared data set under data_root")
    data_root: str = opt(".bamray/data", help="where `bamray data prepare` writes shards")
    path: str = opt("", help="explicit shard directory or URI (overrides dataset/data_root)")
    channels: int = opt(
        0, choices=(0, 1, 3), help="1 = grayscale, 3 = RGB; 0 = the data set's own (its meta.json)"
    )
    mean: tuple[float, ...] = opt(
        (), help="per-channel normalisation mean; empty = the data set's own (measured by `data prepare`)"
    )
    std: tuple[float, ...] = opt((), help="per-channel normalisation std; empty = the data set's own")
    global_crops: int = opt(2, ge=1, le=8)
    global_crop_size: int = opt(28, ge=8, le=1024)
    global_crop_scale: tuple[float, float] = opt((0.25, 1.0))
    local_crops: int = opt(6, ge=0, le=16)
    local_crop_size: int = opt(12, ge=4, le=1024)
    local_crop_scale: tuple[float, float] = opt((0.05, 0.25))
    color_jitter_p: float = opt(0.8, ge=0.0, le=1.0)
    color_jitter: tuple[float, float, float, float] = opt(
        (0.4, 0.4, 0.2, 0.1), help="brightness, contrast, saturation, hue"
    )
    grayscale_p: float = opt(0.2, ge=0.0, le=1.0)
    blur_p: tuple[float, float, float] = opt(
        (1.0, 0.1, 0.5), help="Gaussian blur p: global 1, global 2, locals"
    )
    solarize_p: float = opt(0.2, ge=0.0, le=1.0, help="solarisation of the second global view")
    flip_p: float = opt(0.5, ge=0.0, le=1.0)
    train_limit: int = opt(0, ge=0, help="use only the first N train images (0 = all)")
    val_limit: int = opt(0, ge=0, help="use only the first N validation images (0 = all)")
    local_shuffle_buffer: int = opt(1024, ge=0, help="Ray Data local shuffle buffer (0 = off)")
    prefetch_batches: int = opt(2, ge=0)
    blur_sigma: tuple[float, float] = opt(
        (0.1, 2.0),
        help="Gaussian blur sigma range in pixels of a 224-px view (DINO's values); scaled by "
        "global_crop_size / 224, so at 28 px it is (0.0125, 0.25) px: set e.g. (0.8, 16.0) for a visible blur",
    )
    map_workers: int = opt(
        1,
        ge=1,
        le=1024,
        help="Ray Data augmentation actors or concurrent tasks (keep small: Train takes CPUs too)",
    )
    map_cpus: float = opt(
        1.0, gt=0.0, le=64.0, help="logical CPUs each augmentation actor reserves (may be < 1)"
    )
    map_batch_size: int = opt(
        256, ge=1, le=65536, help="rows per augmentation call (amortises per-call overhead)"
    )
    stream: str = opt(
        "epoch",
        choices=("epoch", "run"),
        help="training stream: a Ray Data execution per epoch (split across the workers), or one execution "
        "per worker for the whole run (data.run_stream: its map_workers actors of map_cpus start once)",
    )
    decode_cache_mb: int = opt(
        256,
        ge=0,
        le=1_048_576,
        help="data.stream run: decoded images each map actor keeps across epochs, MiB (0 = off); a data "
        "set of small images that fits is decoded once a run instead of once an epoch",
    )
    map_compute: str = opt(
        "tasks",
        choices=("tasks", "actors"),
        help="Ray Data augmentation as tasks (reuse warm worker processes) or as an actor pool "
        "(a fresh pool, i.e. processes importing torch, on every epoch's execution)",
    )


def with_dataset_stats(cfg: DataConfig, meta: dict[str, Any], path: str | None = None) -> DataConfig:
    """``cfg`` with ``channels`` / ``mean`` / ``std`` left to the data set (0 / empty) taken from its
    meta (``data prepare`` measures them; shards prepared before that get them measured now from
    ``path``). Explicit values must fit the shards. Every reader of shards applies it, so no code path
    can decode with channels 0 or normalise with nothing."""
    channels = int(meta.get("channels") or cfg.channels or 1)
    where = path or cfg.path or cfg.dataset
    if cfg.channels and cfg.channels != channels:
        raise ConfigError(
            "data.channels",
            f"got {cfg.channels}; the shards in {where} have {channels} channel(s) "
            "(leave it at 0 for the data set's own)",
        )
    mean, std = tuple(cfg.mean), tuple(cfg.std)
    if not mean or not std:
        measured = meta.get("mean"), meta.get("std")
        if measured[0] is None or measured[1] is None or len(measured[0]) != channels:
            from data.shards import image_stats, update_meta

            m, sd, n = image_stats(where, channels)
            measured = (m, sd)
            # shards prepared before the stats existed: measured once, then kept (local directories)
            update_meta(where, mean=list(m), std=list(sd), stats_images=n)
        mean = mean or tuple(float(v) for v in measured[0])
        std = std or tuple(float(v) for v in measured[1])
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != channels:
            raise ConfigError(
                f"data.{name}",
                f"got {len(values)} value(s); the shards in {where} have {channels} channel(s)",
            )
    return dataclasses.replace(cfg, channels=channels, mean=mean, std=std)


def for_reading(cfg: DataConfig, meta: dict[str, Any], path: str) -> DataConfig:
    """The config a reader of the shards at ``path`` decodes and normalises with: as it is when channels,
    mean and std are all set (the labelled evaluation set of a run is viewed as that run's training data:
    a grayscale set decodes to RGB for an RGB model), else completed by :func:`with_dataset_stats`."""
    if cfg.channels and cfg.mean and cfg.std:
        return cfg
    return with_dataset_stats(cfg, meta, path)
