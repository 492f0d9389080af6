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
    data_cfg = _with_data_stats(dataclasses.replace(data_cfg, path=str(path)), meta)
    cfg = dataclasses.replace(cfg, data=data_cfg)
    return dataclasses.replace(cfg, eval=_resolve_eval_path(cfg, root)), meta


def _with_data_stats(data_cfg: Any, meta: dict[str, Any]) -> Any:
    """:func:`data.config.with_dataset_stats`, the values it filled in printed (they are logged as the
    run's ``data.*`` params), so ``--set data.dataset=<name>`` alone trains on any prepared set."""
    from data.config import with_dataset_stats

    out = with_dataset_stats(data_cfg, meta)
    if (out.channels, out.mean, out.std) != (data_cfg.channels, data_cfg.mean, data_cfg.std):
        print(
            f"data {meta.get('name', data_cfg.dataset)}: {out.channels} channel(s), mean {_fmt(out.mean)}, "
            f"std {_fmt(out.std)} (the data set's own; set data.channels / mean / std to override)",
            flush=True,
        )
    return out


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"


def _resolve_eval_path(cfg: ExperimentConfig, root: Path) -> Any:
    """``eval.path`` made absolute (from ``eval.dataset`` under ``data.data_root`` when only that is
    set), and refused naming the field when no labelled data set is there: a k-NN that cannot run
    must fail before Ray starts, not at the end of the first epoch."""
    from data.sources import DataMissingError, read_meta

    ev = cfg.eval
    if not ev.path and not ev.dataset:
        return ev
    field = "eval.path" if ev.path else "eval.dataset"
    path = (
        tracking.absolute_path(ev.path, root) if ev.path else f"{cfg.data.data_root.rstrip('/')}/{ev.dataset}"
    )  # a URI root too
    if not is_uri(path):
        path = str(Path(path).resolve())
    try:
        meta = read_meta(path)
    except DataMissingError as err:
        raise ConfigError(field, f"no prepared data set at {path}: {err}") from err
    if not is_labelled(meta):
        raise ConfigError(field, f"the data set at {path} has no labels; the k-NN needs a labelled one")
    return dataclasses.replace(ev, path=path)


def is_labelled(meta: dict[str, Any]) -> bool:
    """Shards with class labels (meta written before ``labelled`` existed always had them)."""
    return bool(meta.get("labelled", True)) and int(meta.get("num_classes", 0)) > 0


def knn_source(cfg: ExperimentConfig, meta: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
    """``(data config, meta)`` of the labelled set the online k-NN runs on: ``eval.path`` (resolved by
    :func:`prepare_data`) with the training set's views and normalisation, else the training set when
    it has labels; None when there is none (the run logs the label-free signals only)."""
    if cfg.eval.path:
        from data.sources import read_meta

        # The bank is the whole labelled set: data.train_limit caps training images, not the bank.
        return dataclasses.replace(cfg.data, path=cfg.eval.path, train_limit=0), read_meta(cfg.eval.path)
    return (cfg.data, meta) if is_labelled(meta) else None


def require_labels(
    cfg: ExperimentConfig, meta: dict[str, Any], who: str, needs: str
) -> tuple[Any, dict[str, Any]]:
    """:func:`knn_source`, refused naming ``eval.dataset`` when there is none: for the offline evaluations
    (linear probe, retrieval, fine-tuning) of ``who`` (e.g. "run <id>"), which ``needs`` labels."""
    source = knn_source(cfg, meta)
    if source is None:
        raise ConfigError(
            "eval.dataset",
            f"{who} trained on an unlabelled set and named no labelled one; {needs} needs labels (train "
            "with --set eval.dataset=<labelled set>)",
        )
    return source


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

    meta = read_meta(cfg.data.path)
    cfg = dataclasses.replace(cfg, data=_with_data_stats(cfg.data, meta))  # as it is when all are set
    if cfg.eval.dataset and not cfg.eval.path:
        cfg = dataclasses.replace(cfg, eval=_resolve_eval_path(cfg, tracking.project_root()))
    return cfg, meta
