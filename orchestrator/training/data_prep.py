"""The data a run trains on: the shard directory (auto-prepared Fashion-MNIST when its Debian IDX files
are installed), its meta, and how many optimiser steps one epoch of it gives.

Runs before any Ray or MLflow work, so a missing data set or an impossible batch is refused naming the
field instead of failing inside a worker.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from data.sources import is_uri
from orchestrator import tracking
from orchestrator.config import ExperimentConfig
from trainers.fileio import file_lock
from trainers.options import ConfigError

FMNIST_SRC = os.environ.get("BAMRAY_FMNIST_SRC", "/usr/share/datasets/fashion-mnist")


def train_rows(cfg: ExperimentConfig, meta: dict[str, Any]) -> int:
    """Images one epoch streams: the prepared train count, capped by ``data.train_limit``."""
    count = int(meta["counts"]["train"])
    return min(count, cfg.data.train_limit) if cfg.data.train_limit > 0 else count


def steps_per_epoch(cfg: ExperimentConfig, meta: dict[str, Any]) -> int:
    """Optimiser steps per epoch: every worker gets ``rows // world`` rows (``streaming_split(equal=True)``)
    and drops its last partial batch, so ``rows // (batch * world)``; refuse a config that gives 0."""
    rows = train_rows(cfg, meta)
    steps = rows // (cfg.optim.batch_size * cfg.world_size)
    if steps < 1:
        raise ConfigError(
            "optim.batch_size",
            f"got {cfg.optim.batch_size}; {rows} train images over {cfg.world_size} worker(s) give no "
            f"full batch: need batch_size x workers <= {rows}",
        )
    return steps


def prepare_data(cfg: ExperimentConfig) -> tuple[ExperimentConfig, dict[str, Any]]:
    """Resolve the shard directory to an absolute path (auto-preparing Fashion-MNIST when its IDX source
    files are installed) and read its meta. Returns a config whose ``data.path`` is absolute."""
    from data.sources import DataMissingError, read_meta, resolve_shards

    root = tracking.project_root()
    data_cfg = dataclasses.replace(
        cfg.data,
        data_root=tracking.absolute_path(cfg.data.data_root, root),
        path=tracking.absolute_path(cfg.data.path, root),
    )
    path = resolve_shards(data_cfg)
    try:
        meta = read_meta(path)
    except DataMissingError:
        src = Path(FMNIST_SRC)
        if (
            data_cfg.dataset != "fashion-mnist"
            or data_cfg.path
            or not (src / "train-images-idx3-ubyte.gz").exists()
        ):
            raise
        meta = _prepare_fashion_mnist_once(str(path), src)
    if not is_uri(str(path)):
        path = str(Path(path).resolve())
    data_cfg = dataclasses.replace(data_cfg, path=str(path))
    if int(meta.get("channels", cfg.data.channels)) != cfg.data.channels:
        raise ConfigError(
            "data.channels",
            f"got {cfg.data.channels}; the shards in {path} have {meta['channels']} channel(s)",
        )
    return dataclasses.replace(cfg, data=data_cfg), meta


def _prepare_fashion_mnist_once(path: str, src: Path) -> dict[str, Any]:
    """Write the Fashion-MNIST shards into ``path`` unless another run did while we waited for the lock:
    two first runs must not write the same shards."""
    from data.sources import DataMissingError, prepare_fashion_mnist, read_meta

    with file_lock(path.rstrip("/") + ".lock"):
        try:
            return read_meta(path)
        except DataMissingError:
            print(f"Fashion-MNIST shards not found: preparing them from {src} into {path} (once)", flush=True)
            prepare_fashion_mnist(path, src_dir=str(src))
            return read_meta(path)


def resolved_data(cfg: ExperimentConfig) -> tuple[ExperimentConfig, dict[str, Any]]:
    """``cfg`` and its meta, through :func:`prepare_data` unless ``data.path`` is already absolute (a sweep
    resolves it once in its driver: a Tune trial's working directory is not the project root)."""
    if not cfg.data.path or (not is_uri(cfg.data.path) and not os.path.isabs(cfg.data.path)):
        return prepare_data(cfg)
    from data.sources import read_meta

    return cfg, read_meta(cfg.data.path)
