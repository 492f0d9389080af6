"""The downstream commands end to end: resolve the backbone and the data, embed through the Ray Data job,
score, log to the MLflow run, return the figures.

Each retrieval or copy-detection figure comes with the same figure for the random-init network (the
run's own architecture and seed) and for raw pixels, embedded by the same job on the same rows, so a
learned feature is always read against the floor it must beat.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator import tracking
from orchestrator.downstream.embed import NETWORKS, Network, Rows, read_embeddings, run_embed
from orchestrator.downstream.source import Backbone
from trainers.options import ConfigError

#: the rows of ``bamray eval retrieval`` / ``copydetect`` tables, in print order
ROWS = (("backbone", "learned"), ("random", "random init"), ("pixels", "raw pixels"))


@dataclasses.dataclass
class JobOptions:
    """How the embedding job runs: actors, rows per batch, CPUs / GPUs each, the Ray to use."""

    actors: int = 1
    batch_size: int = 256
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    address: str | None = None


@contextlib.contextmanager
def ray_for(options: JobOptions) -> Iterator[None]:
    """The Ray the job runs on: an initialised one, ``--address`` / ``RAY_ADDRESS``, or a local one with
    this machine's CPUs (shut down afterwards when started here)."""
    from orchestrator.local_ray import connect_or_start

    started = connect_or_start(options.address, num_cpus=os.cpu_count() or 1)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def network(backbone: Backbone, kind: str) -> Network:
    import yaml

    from orchestrator.checkpointing import BACKBONE_FILE, CONFIG_FILE

    config = yaml.safe_load((backbone.directory / CONFIG_FILE).read_text())
    weights = (backbone.directory / BACKBONE_FILE).read_bytes() if kind == "backbone" else None
    return Network(kind, config, weights)


# ------------------------------------------------------------------------------------------------ data
def resolve_data(spec: str | None, backbone: Backbone, tmp: str) -> tuple[str, dict[str, Any]]:
    """``(shard path, meta)`` of ``--data``: a prepared set's name (under ``.bamray/data``), a prepared
    directory or URI (it has ``meta.json``), a folder of images or a Parquet file/folder (imported into
    ``tmp`` first, unlabelled unless the Parquet has a ``label`` column); default the run's own training
    set. Refused when its channels differ from the network's."""
    from data.sources import DataMissingError, is_uri, read_meta

    cfg = backbone.cfg
    if spec is None:
        candidates = [cfg.data.path, str(tracking.project_root() / ".bamray" / "data" / cfg.data.dataset)]
    elif is_uri(spec) or os.path.sep in spec or os.path.exists(spec):
        candidates = [spec]
    else:
        candidates = [str(tracking.project_root() / ".bamray" / "data" / spec)]
    meta, path = None, None
    for c in candidates:
        if not c:
            continue
        try:
            meta, path = read_meta(c), c
            break
        except DataMissingError:
            continue
    if meta is None and spec is not None and os.path.exists(spec):
        path, meta = _import(spec, tmp)
    if meta is None:
        where = spec or f"the run's data set {cfg.data.dataset!r} ({cfg.data.path})"
        raise ConfigError(
            "--data",
            f"no prepared data set, image folder or Parquet at {where}; prepare one with `bamray data prepare`",
        )
    if int(meta["channels"]) != int(cfg.data.channels):
        raise ConfigError(
            "--data",
            f"{path} has {meta['channels']}-channel images but the backbone of {backbone.label} takes "
            f"{cfg.data.channels} channel(s)",
        )
    return (path if is_uri(path) else str(Path(path).resolve())), meta


def _import(src: str, tmp: str) -> tuple[str, dict[str, Any]]:
    """A folder of images or Parquet files, prepared as shards in ``tmp`` (as ``bamray data prepare``)."""
    from data import sources

    out = str(Path(tmp) / "data")
    name = Path(src).name or "data"
    is_parquet = src.endswith(".parquet") or (
        os.path.isdir(src) and any(p.suffix == ".parquet" for p in Path(src).rglob("*.parquet"))
    )
    if is_parquet:
        label = "label" if "label" in sources.parquet_columns(src) else None
        meta = sources.prepare_parquet(src, out, label_column=label, name=name)
    else:
        meta = sources.prepare_image_folder(src, out, name=name, labelled=False)
    print(
        f"imported {src}: {sum(meta['counts'].values())} images ({sources.skipped_summary(meta, out)})",
        flush=True,
    )
    return out, meta


def view_for(backbone: Backbone, path: str) -> Any:
    """The run's evaluation view (size, channels, mean/std) reading ``path``."""
    return dataclasses.replace(backbone.cfg.data, path=path, dataset="", train_limit=0, val_limit=0)


def _splits(meta: dict[str, Any], split: str) -> list[str]:
    have = [s for s in ("train", "test") if int(meta.get("counts", {}).get(s, 0)) > 0]
    if split == "all":
        return have
    if split not in have:
        raise ConfigError(
            "--split", f"the data set has no {split!r} rows (it has: {', '.join(have) or 'none'})"
        )
    return [split]


# ------------------------------------------------------------------------------------------------ embed
def embed_command(
    backbone: Backbone, data: str | None, out: str, *, split: str, kind: str, options: JobOptions
) -> dict[str, Any]:
    """``bamray embed``: every row of ``split`` ("train", "test" or "all") to Parquet under ``out``."""
    from data.sources import is_uri
    from orchestrator.downstream.embed import check_out
    from orchestrator.training.data_prep import is_labelled

    if kind not in NETWORKS:
        raise ConfigError("--network", f"got {kind!r}; one of {', '.join(NETWORKS)}")
    out = out if is_uri(out) else str(Path(out).resolve())
    check_out(out)
    with tempfile.TemporaryDirectory(prefix="bamray-embed-") as tmp:
        path, meta = resolve_data(data, backbone, tmp)
        parts = [Rows(s, path=path) for s in _splits(meta, split)]
        with ray_for(options):
            summary = _embed(backbone, kind, path, parts, out, labelled=is_labelled(meta), options=options)
    summary["out"] = out
    if backbone.run_id:
        tracking.log_metrics(
            backbone.tracking_uri,
            backbone.run_id,
            {"embed_rows": summary["rows"], "embed_images_per_s": summary["images_per_s"]},
            0,
        )
        tracking.log_tags(backbone.tracking_uri, backbone.run_id, {"bamray.embed.last": f"{out} ({path})"})
    return summary


def _embed(
    backbone: Backbone,
    kind: str,
    path: str,
    parts: list[Rows],
    out: str,
    *,
    labelled: bool,
    options: JobOptions,
) -> dict[str, Any]:
    return run_embed(
        network(backbone, kind),
        view_for(backbone, path),
        parts,
        out,
        labelled=labelled,
        actors=options.actors,
        batch_size=options.batch_size,
        cpus_per_actor=options.cpus_per_actor,
        gpus_per_actor=options.gpus_per_actor,
    )


def _work_dir(work_dir: str | None, tmp: str, kind: str) -> str:
    base = work_dir.rstrip("/") if work_dir else tmp
    return f"{base}/{kind}"


# ------------------------------------------------------------------------------------------------ retrieval
def retrieval_command(
    backbone: Backbone,
    *,
    queries: int = 0,
    options: JobOptions,
    work_dir: str | None = None,
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict[str, dict[str, float]]:
    """``bamray eval retrieval``: the labelled set's test split (the online k-NN's validation rows, at most
    ``queries`` of them when > 0) as queries against its train split (the k-NN's bank), per network."""
    from data.torch_dataset import select_eval_indices
    from trainers.evaluation.retrieval import retrieval_metrics

    cfg = backbone.cfg
    labelled = labelled_view(backbone, "retrieval")
    path = labelled.path
    # the online k-NN's rows: its bank within data.train_limit, its queries within data.val_limit
    bank = select_eval_indices(path, "train", cfg.eval.knn_train_fraction, cfg.seed, labelled.train_limit)
    val = select_eval_indices(path, "test", cfg.eval.knn_eval_fraction, cfg.seed, labelled.val_limit)
    if queries > 0:
        val = _at_most(val, path, "test", queries)
    parts = [Rows("train", path=path, indices=bank), Rows("test", path=path, indices=val)]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bamray-retrieval-") as tmp, ray_for(options):
        for kind, _ in ROWS:
            out = _work_dir(work_dir, tmp, f"retrieval-{kind}")
            _embed(backbone, kind, path, parts, out, labelled=True, options=options)
            e = read_embeddings(out)
            b, q = e["split"] == "train", e["split"] == "test"
            results[kind] = retrieval_metrics(
                _t(e["embedding"][q]), _t(e["label"][q]), _t(e["embedding"][b]), _t(e["label"][b]), ks=ks
            )
            results[kind]["bank"] = float(b.sum())
    _log_figures(backbone, "retrieval", results)
    return results


def labelled_view(backbone: Backbone, needs: str) -> Any:
    """The labelled set the run's k-NN used (``eval.path`` or its own training set), found on this
    machine, with the run's view; refused naming ``eval.dataset`` when the run has none (``needs``: the
    evaluation that asked)."""
    from orchestrator.training.data_prep import prepare_data, require_labels

    cfg = backbone.cfg
    local = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=_local_path(cfg.data)))
    if cfg.eval.path and not os.path.exists(cfg.eval.path):
        local = dataclasses.replace(local, eval=dataclasses.replace(cfg.eval, path=""))
    local, meta = prepare_data(local)
    data, meta = require_labels(local, meta, backbone.label, needs)
    if int(meta["channels"]) != int(cfg.data.channels):
        raise ConfigError(
            "eval.dataset", f"{data.path} has {meta['channels']} channel(s), the backbone {cfg.data.channels}"
        )
    return data


def _local_path(data: Any) -> str:
    """The run's data path when it exists here, else '' (found again from ``data.dataset``)."""
    from data.sources import is_uri

    return data.path if data.path and (is_uri(data.path) or os.path.exists(data.path)) else ""


def _at_most(indices: np.ndarray | None, path: str, split: str, n: int) -> np.ndarray:
    """At most ``n`` of ``indices`` (all rows of ``split`` when None), evenly spaced: every class kept."""
    from data.shards import read_split_table

    if indices is None:
        indices = np.sort(read_split_table(path, split, columns=["index"]).column("index").to_numpy())
    if len(indices) <= n:
        return indices
    return indices[np.linspace(0, len(indices) - 1, n).round().astype(np.int64)]


def _t(a: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(a))


def _log_figures(backbone: Backbone, prefix: str, results: dict[str, dict[str, float]]) -> None:
    """``<prefix>_map``, ``<prefix>_recall_at_k`` for the learned network, the same with ``_random_init``
    / ``_raw_pixels`` appended for the baselines."""
    if not backbone.run_id:
        return
    suffix = {"backbone": "", "random": "_random_init", "pixels": "_raw_pixels"}
    metrics = {}
    for kind, figures in results.items():
        for name, value in figures.items():
            if name == "map" or name.startswith("recall@"):
                metrics[f"{prefix}_{name.replace('@', '_at_')}{suffix[kind]}"] = value
    tracking.log_metrics(backbone.tracking_uri, backbone.run_id, metrics, 0)
    tracking.log_tags(
        backbone.tracking_uri, backbone.run_id, {f"bamray.{prefix}.checkpoint": backbone.checkpoint}
    )


def figures_table(results: dict[str, dict[str, float]], columns: tuple[str, ...]) -> str:
    """A plain-text table: one row per network, ``columns`` of its figures (in %)."""
    head = f"{'':12s}" + "".join(f"{c:>12s}" for c in columns)
    lines = [head]
    for kind, name in ROWS:
        if kind in results:
            lines.append(f"{name:12s}" + "".join(f"{results[kind][c]:11.2f}%" for c in columns))
    return "\n".join(lines)
