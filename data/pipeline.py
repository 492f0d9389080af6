"""Shards -> training / evaluation streams on Ray Data (the Ray-free twins: :mod:`data.torch_dataset`).

Batch contract (consumed by ``trainers.engine.crops_from_batch``): ``"global"`` uint8 (N, G, C, H, W),
``"local"`` uint8 (N, L, C, h, w) only when L > 0, ``"label"`` int64 (N,), ``"index"`` int64 (N,).
Evaluation batches: ``"image"`` uint8 (N, C, S, S) at ``global_crop_size`` (resize + centre crop) and
``"label"``. Crops stay uint8 (4x smaller than float) and are normalised on the device.

Both paths run the same code for a sample: :func:`data.augment.decode_image` then
:meth:`MultiCropAugment.augment_batch`, seeded by ``(seed, epoch, index)``, so the Ray stream and
:class:`data.torch_dataset.MultiCropTorchDataset` give bit-identical views (a test checks it) and
neither depends on the number of workers. Evaluation rows come from the same
:func:`data.eval_rows.select_eval_indices` on both paths.

Throughput-relevant settings (``DataConfig``):

- ``map_batch_size`` (256): rows per augmentation call. The augmentation is batched, so per-call
  overhead (Python, torch dispatch, one ``roi_align`` per crop size) is paid once per batch; below ~64
  rows throughput drops quickly, above ~512 it only costs memory.
- ``map_compute`` ("tasks"): the callable class runs in Ray's warm, pooled worker processes, built
  per batch (cheap). "actors" keeps one instance per actor, but Ray Data starts a fresh actor pool on
  every execution, i.e. every epoch, and each new process pays for importing torch again; tasks reuse
  processes that have already paid it.
- ``map_workers`` (1) x ``map_cpus`` (1.0): the augmentation actor pool (or concurrent tasks). At
  small image sizes one CPU keeps a single trainer fed (``bench/README.md``, section 2, has the
  figures); add actors when the trainer waits on data. Ray Train's workers take their CPUs out of the
  same pool, so on a small node keep this small or use fractional ``map_cpus``, and call
  :func:`configure_data_context` (Ray Data can otherwise stall with ``backpressured: ResourceBudget``).
- Shard files are read in a random order per epoch (``shuffle="files"``-style ``FileShuffleConfig``
  seeded by ``seed``, reseeded every execution): nearly free, unlike ``random_shuffle()`` which
  materialises the data set. Finer mixing comes from ``local_shuffle_buffer`` at iteration time
  (``iter_torch_batches(local_shuffle_buffer_size=...)``), which the train loop owns.
- ``prefetch_batches``: passed by the train loop to ``iter_torch_batches``.

Every epoch re-executes the lazy dataset, so the views are fresh each epoch; the epoch number the
views are seeded with comes from a named :class:`data.run_actors.EpochClock` actor that the train loop sets before
iterating (read once per batch by the map actors).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray
from ray.data import ActorPoolStrategy, DataContext, Dataset, FileShuffleConfig, TaskPoolStrategy
from ray.data.expressions import col

from data.batch_maps import CleanBatch, MultiCropBatch, run_in_task
from data.config import DataConfig, for_reading
from data.eval_rows import select_eval_indices
from data.run_actors import (
    DEFAULT_CORRUPT_COUNTER,
    DEFAULT_EVAL_CORRUPT_COUNTER,
    get_corrupt_counter,
    get_epoch_clock,
)
from data.shards import is_uri, read_meta, resolve_shards, split_path

# Ray Data's default 128 MiB blocks hold a whole epoch of 28 px multi-crop output (2.4 kB an image) in
# one block, so the first batch waits for almost the whole pass and one map task runs at a time. Smaller
# blocks stream sooner and spread over more map tasks (figures in bench/README.md, section 2).
TARGET_BLOCK_BYTES = 4 * 2**20
#: one read at a time swaps Ray's sampling function (:func:`_sampling_in_process`)
_PATCH_LOCK = threading.Lock()


def configure_data_context(
    cpus: float | None = None,
    object_store_memory: float | None = None,
    progress_bars: bool = False,
    target_block_bytes: int = TARGET_BLOCK_BYTES,
) -> DataContext:
    """Bound what Ray Data may use so it coexists with Ray Train on one node.

    Ray Data budgets from the cluster's CPUs minus what other work holds; Train's workers hold theirs
    for the whole run, and on a small node Data may compute a zero budget and stall. An explicit
    ``cpus`` limit (e.g. node CPUs minus Train's) gives it a fixed, known budget. Call it in the driver
    before building datasets (a Dataset captures the current context). Progress bars are off by default:
    they flood non-interactive logs. ``target_block_bytes``: see :data:`TARGET_BLOCK_BYTES` (smaller
    blocks stream sooner and spread over more map tasks).
    """
    ctx = DataContext.get_current()
    ctx.target_max_block_size = int(target_block_bytes)
    opts = ctx.execution_options
    opts.resource_limits = opts.resource_limits.copy(cpu=cpus, object_store_memory=object_store_memory)
    ctx.enable_progress_bars = progress_bars
    ctx.enable_operator_progress_bars = progress_bars
    return ctx


# ---------------------------------------------------------------------------------------- Ray Data
def build_train_dataset(
    cfg: DataConfig,
    seed: int,
    epoch_clock: str | None = None,
    *,
    corrupt_counter: str = DEFAULT_CORRUPT_COUNTER,
) -> Dataset:
    """The multi-crop training stream over the shards' train split (lazy; re-executed every epoch).

    ``train_limit > 0`` keeps rows with ``index < train_limit`` (pushed down into the Parquet read).
    ``epoch_clock`` names the :class:`data.run_actors.EpochClock` actor (created here, in the caller's process, so it
    lives as long as the driver); with ``None`` every epoch uses epoch 0's views. Corrupt rows are
    dropped and counted under ``corrupt_counter`` (see :func:`data.run_actors.corrupt_count`).
    """
    path = resolve_shards(cfg)
    cfg = for_reading(cfg, read_meta(path), path)  # fails fast with the "bamray data prepare" hint
    counter = get_corrupt_counter(corrupt_counter)
    clock = get_epoch_clock(epoch_clock) if epoch_clock else None
    ds = read_shards(
        split_path(path, "train"),
        num_cpus=cfg.map_cpus,
        shuffle=FileShuffleConfig(seed=int(seed), reseed_after_execution=True),
    )
    if cfg.train_limit > 0:
        ds = ds.filter(expr=col("index") < cfg.train_limit)
    kwargs = {"cfg": cfg, "seed": int(seed), "epoch_clock": clock, "corrupt_counter": counter}
    return _map(ds, cfg, MultiCropBatch, kwargs)


def read_shards(path: str, **kwargs: Any) -> Dataset:
    """``read_parquet`` of one split's shards (columns image, label, index).

    Local shards are read with Ray Data's V1 Parquet datasource. Ray 2.60's default (V2) lists files by
    starting a pool of up to 32 ``FooterReader`` actors per read -- new Python processes, built for
    network-bound footer reads on object stores. A Train run reads 3 datasets (train, k-NN bank,
    validation), so on local disk those processes would dominate start-up (figures in
    ``bench/README.md``, section 2). URIs (``s3://`` ...) keep Ray's default.

    The training pipeline passes ``num_cpus=data.map_cpus``: Ray's read tasks ask 1 CPU each, and on a
    node whose CPUs the training worker mostly holds (a 2-CPU node, a 1.5-CPU worker) no read could ever be
    scheduled, while the map tasks it feeds fit; the run then waited forever for its first batch.
    """
    ctx = DataContext.get_current()
    default = ctx.use_datasource_v2
    ctx.use_datasource_v2 = default and is_uri(path)
    try:
        with contextlib.nullcontext() if is_uri(path) else _sampling_in_process():
            return ray.data.read_parquet(path, columns=["image", "label", "index"], **kwargs)
    finally:
        ctx.use_datasource_v2 = default


@contextlib.contextmanager
def _sampling_in_process() -> Iterator[None]:
    """Ray's V1 Parquet datasource reads the first rows of at least 2 files (1 %, 2 to 10) to estimate
    their in-memory size, each in a Ray task, and ``read_parquet`` waits for them. In a run's driver those
    tasks wait for Ray's pooled processes to boot: 2.7 s of the start-up's critical path on 2 CPUs for 2
    footers and a few hundred rows of local files. Read here, in this process, the same function on the
    same fragments takes milliseconds. Ray samples as usual when an upgrade renamed the two private
    functions; ``tests/test_ray_data.py`` fails then."""
    from ray.data._internal.datasource import parquet_datasource as pq

    fetch_one, fetch_all = (getattr(pq, n, None) for n in ("_fetch_parquet_file_info", "_fetch_file_infos"))
    if fetch_one is None or fetch_all is None:
        yield
        return

    def in_process(fragments: list[Any], *, columns: Any, schema: Any, local_scheduling: Any) -> list[Any]:
        return [fetch_one(fragment, columns=columns, schema=schema) for fragment in fragments]

    with _PATCH_LOCK:
        pq._fetch_file_infos = in_process
        try:
            yield
        finally:
            pq._fetch_file_infos = fetch_all


def _map(ds: Dataset, cfg: DataConfig, fn_class: type, kwargs: dict[str, Any]) -> Dataset:
    """``map_batches`` with the callable class as an actor pool, or (``map_compute="tasks"``) as tasks
    that build the (cheap) callable per batch. Actor pools are started afresh on every execution, i.e.
    every epoch (a new process importing torch: seconds); tasks run in Ray's pooled, warm workers."""
    common = {"batch_size": cfg.map_batch_size, "batch_format": "numpy", "num_cpus": cfg.map_cpus}
    if cfg.map_compute == "tasks":
        return ds.map_batches(
            run_in_task,
            fn_kwargs={"fn_class": fn_class, "kwargs": kwargs},
            compute=TaskPoolStrategy(size=cfg.map_workers),
            **common,
        )
    return ds.map_batches(
        fn_class, fn_constructor_kwargs=kwargs, compute=ActorPoolStrategy(size=cfg.map_workers), **common
    )


def _eval_dataset(
    cfg: DataConfig, path: str, split: str, indices: np.ndarray | None, corrupt_counter: Any
) -> Dataset:
    ds = read_shards(split_path(path, split), num_cpus=cfg.map_cpus)
    if indices is not None:
        ds = ds.filter(expr=col("index").is_in(indices.tolist()))
    # counted as "eval/<split>": a run's one counter then tells training's skipped rows from these
    kwargs = {"cfg": cfg, "split": f"eval/{split}", "corrupt_counter": corrupt_counter}
    return _map(ds, cfg, CleanBatch, kwargs)


def build_eval_datasets(
    cfg: DataConfig,
    train_fraction: float,
    eval_fraction: float,
    seed: int,
    *,
    corrupt_counter: str = DEFAULT_EVAL_CORRUPT_COUNTER,
) -> tuple[Dataset, Dataset]:
    """``(train bank, validation)`` clean-view datasets for k-NN / linear probe.

    The bank is a class-balanced ``train_fraction`` of the train split (within ``train_limit``), the
    validation set a class-balanced ``eval_fraction`` of the test split (within ``val_limit``); both
    deterministic given ``seed`` (see :func:`data.eval_rows.select_eval_indices`).
    """
    path = resolve_shards(cfg)
    cfg = for_reading(cfg, read_meta(path), path)
    counter = get_corrupt_counter(corrupt_counter)
    bank = select_eval_indices(path, "train", train_fraction, seed, cfg.train_limit)
    val = select_eval_indices(path, "test", eval_fraction, seed, cfg.val_limit)
    return (_eval_dataset(cfg, path, "train", bank, counter), _eval_dataset(cfg, path, "test", val, counter))
