"""``bamray embed``: a Ray Data job that turns images into backbone embeddings written as Parquet.

The rows stream: shards are read in blocks, a pool of actors (``map_batches`` with an actor pool: one
model load per actor, a GPU each when asked) decodes, centre-crops and embeds a batch at a time, and
``write_parquet`` writes each output block as it comes. No process ever holds the data set: the driver
only plans the job and reads a summary from a stats actor (rows, corrupt rows skipped, each actor's peak
RSS). Retrieval and copy detection embed through the same job, so they scale the same way.

Output columns: ``split`` (string), ``index`` (the row's index in its split), ``label`` (only for a
labelled set), ``embedding`` (``fixed_size_list<float32>[D]``: the backbone's pooled features, not
normalised; cosine similarity is the dot product of L2-normalised rows). Readable with pyarrow, pandas,
polars or DuckDB, no Ray needed.

The view is the one the online k-NN evaluates: decode in the network's channels, resize the shorter side
to the global crop size, centre crop, normalise with the run's mean/std (pixels / 255 for the raw-pixel
"network").
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from orchestrator.downstream import NETWORKS  # noqa: F401 - re-exported
from trainers.options import ConfigError

#: CPUs each Parquet read task and each write task asks for: reading shards and writing embeddings are
#: light next to decoding and the network, and the actors hold their CPUs for the whole job, so a read or
#: write asking Ray's default whole CPU could never be scheduled on a node the actors fill (the job then
#: waited forever)
IO_CPUS = 0.25


@dataclasses.dataclass
class Network:
    """What an actor builds: the run's ``backbone`` (its weights), the same architecture at ``random``
    initialisation (seeded as training seeds it: the run's random-init row), or raw ``pixels``."""

    kind: str
    #: the exported ``config.yaml`` as a dict (rebuilds the architecture)
    config: dict[str, Any]
    #: safetensors bytes of the weights, or an ObjectRef to them (``kind == "backbone"`` only)
    weights: Any = None


@dataclasses.dataclass
class Rows:
    """Rows to embed: split ``split`` of the prepared set at ``path`` (only ``indices`` when given), or
    an in-memory Arrow ``table`` with the shard columns (``image``, ``label``, ``index``)."""

    split: str
    path: str | None = None
    indices: np.ndarray | None = None
    table: pa.Table | None = None


def build_network(net: Network) -> Any:
    """The module of ``net`` in eval mode (CPU)."""
    import torch
    from torch import nn

    if net.kind == "pixels":
        return nn.Flatten().eval()
    from orchestrator.config import config_from_dict, upgrade_saved_config
    from trainers.backbones import build_backbone
    from trainers.build import crop_sizes

    cfg = config_from_dict(upgrade_saved_config(net.config))
    torch.manual_seed(cfg.seed)  # as trainers.build.build_method: the random-init row is the run's init
    d = cfg.data
    module, _ = build_backbone(
        cfg.model, in_chans=d.channels, default_img_size=d.global_crop_size, crop_sizes=crop_sizes(d)
    )
    if net.kind == "backbone":
        import ray
        from safetensors.torch import load as load_safetensors

        weights = ray.get(net.weights) if isinstance(net.weights, ray.ObjectRef) else net.weights
        module.load_state_dict(load_safetensors(weights), strict=True)
    return module.eval()


class EmbedActor:
    """The ``map_batches`` callable: one network per actor process, built once."""

    def __init__(self, net: Network, view: Any, labelled: bool, stats: Any, cpus: float, use_gpu: bool):
        import torch

        torch.set_num_threads(max(1, int(cpus)))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = build_network(net).to(self.device)
        self.pixels = net.kind == "pixels"
        self.view, self.labelled, self.stats = view, labelled, stats
        self.name = f"{os.uname().nodename}:{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import ray
        import torch

        from data.batch_maps import decode_rows
        from data.images import clean_transform
        from trainers.engine import normalise_uint8

        size, c = self.view.global_crop_size, self.view.channels
        index = np.asarray(batch["index"], dtype=np.int64)
        split = np.asarray(batch["split"]).astype(str)
        images, keep = decode_rows(batch["image"], c)
        views = [clean_transform(im, size) for im in images]
        if views:
            x = torch.stack(views)
            with torch.inference_mode():
                if self.pixels:
                    x = x.to(self.device, torch.float32) / 255.0
                else:
                    x = normalise_uint8(x, self.view.mean, self.view.std, self.device)
                feats = self.model(x).float().flatten(1).cpu().numpy()
        else:
            feats = np.zeros((0, 1), np.float32)
        bad = [(s, int(i)) for s, i in zip(split[~keep], index[~keep])]
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        ray.get(self.stats.add.remote(self.name, int(keep.sum()), bad, peak_mb))
        return embedding_table(
            split[keep], index[keep], np.asarray(batch["label"])[keep] if self.labelled else None, feats
        )


def embedding_table(split: Any, index: Any, label: Any, feats: np.ndarray) -> pa.Table:
    """The output schema: ``split, index, [label,] embedding`` (a fixed-size list column)."""
    d = feats.shape[1] if feats.ndim == 2 else 0
    flat = pa.array(np.ascontiguousarray(feats, dtype=np.float32).reshape(-1), pa.float32())
    cols: dict[str, Any] = {
        "split": pa.array(np.asarray(split, dtype=str), pa.string()),
        "index": pa.array(np.asarray(index, dtype=np.int64), pa.int64()),
    }
    if label is not None:
        cols["label"] = pa.array(np.asarray(label, dtype=np.int64), pa.int64())
    cols["embedding"] = pa.FixedSizeListArray.from_arrays(flat, d)
    return pa.table(cols)


def check_out(out: str) -> None:
    """A local ``--out`` must be new or empty: appending to an earlier job's files would mix two sets."""
    from data.sources import is_uri

    if is_uri(out):
        return
    p = Path(out)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise ConfigError("--out", f"{out} exists and is not an empty directory; give a new one")


def check_resources(
    actors: int, batch_size: int, cpus_per_actor: float, gpus_per_actor: float, cluster: dict[str, float]
) -> None:
    """Refuse a pool the cluster cannot hold beside one read and one write task, naming the flag: Ray would queue the
    actors (or the reads) forever instead of failing."""
    if actors < 1:
        raise ConfigError("--actors", f"got {actors}; must be >= 1")
    if batch_size < 1:
        raise ConfigError("--batch-size", f"got {batch_size}; must be >= 1")
    if cpus_per_actor <= 0:
        raise ConfigError("--cpus-per-actor", f"got {cpus_per_actor}; must be > 0")
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    need = actors * cpus_per_actor + 2 * IO_CPUS
    if need > cpus:
        raise ConfigError(
            "--actors",
            f"{actors} actor(s) x {cpus_per_actor:g} CPU + {2 * IO_CPUS:g} to read and write = {need:g} CPUs; the "
            f"cluster has {cpus:g}: lower --actors or --cpus-per-actor",
        )
    if gpus_per_actor > 0 and actors * gpus_per_actor > gpus:
        raise ConfigError(
            "--gpus-per-actor", f"{actors} actor(s) x {gpus_per_actor:g} GPU; the cluster has {gpus:g} GPU(s)"
        )


def run_embed(
    net: Network,
    view: Any,
    parts: list[Rows],
    out: str,
    *,
    labelled: bool,
    actors: int = 1,
    batch_size: int = 256,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
) -> dict[str, Any]:
    """Embed ``parts`` with ``net`` into Parquet files under ``out`` (Ray must be initialised).

    Returns ``{"rows", "corrupt", "actors": {name: {"rows", "peak_rss_mb"}}, "seconds",
    "images_per_s"}``."""
    import ray
    from ray.data import ActorPoolStrategy
    from ray.data.expressions import col, lit

    from data.pipeline import read_shards
    from data.run_actors import EmbedStats, on_this_node
    from data.shards import split_path

    check_out(out)
    check_resources(actors, batch_size, cpus_per_actor, gpus_per_actor, ray.cluster_resources())
    if net.kind == "backbone" and isinstance(net.weights, bytes | bytearray):
        net = dataclasses.replace(net, weights=ray.put(bytes(net.weights)))  # once, not once per actor
    stats = EmbedStats.options(scheduling_strategy=on_this_node()).remote()
    datasets = []
    for part in parts:
        if part.table is not None:
            ds = ray.data.from_arrow(part.table)
        else:
            ds = read_shards(split_path(part.path, part.split), num_cpus=IO_CPUS)
            if part.indices is not None:
                ds = ds.filter(expr=col("index").is_in([int(i) for i in part.indices]))
        datasets.append(ds.with_column("split", lit(part.split), num_cpus=IO_CPUS))  # fused into the read
    ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    kwargs = {
        "net": net,
        "view": view,
        "labelled": labelled,
        "stats": stats,
        "cpus": cpus_per_actor,
        "use_gpu": gpus_per_actor > 0,
    }
    ds = ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs=kwargs,
        compute=ActorPoolStrategy(size=actors),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor or None,
    )
    start = time.perf_counter()
    ds.write_parquet(out, ray_remote_args={"num_cpus": IO_CPUS})
    seconds = time.perf_counter() - start
    summary = ray.get(stats.summary.remote())
    ray.kill(stats)
    summary.update(seconds=seconds, images_per_s=summary["rows"] / max(seconds, 1e-9))
    return summary


def read_embeddings(out: str) -> dict[str, np.ndarray]:
    """An ``embed`` output read back: ``{"split", "index", "label" (if any), "embedding" (N, D)}`` sorted
    by (split, index), so a result does not depend on the order the actors finished in."""
    import pyarrow.dataset as pads

    from data.shards import filesystem_and_path

    fs, path = filesystem_and_path(out)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    order = np.lexsort(
        (table.column("index").to_numpy(), table.column("split").to_numpy(zero_copy_only=False))
    )
    res: dict[str, np.ndarray] = {}
    for name in table.column_names:
        column = table.column(name).take(pa.array(order))
        if name == "embedding":
            lists = column.combine_chunks()
            d = lists.type.list_size
            res[name] = lists.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)
        else:
            res[name] = column.to_numpy(zero_copy_only=False)
    return res
