"""Shards -> training / evaluation streams on Ray Data (the Ray-free twins: :mod:`data.torch_dataset`).

Batch contract (consumed by ``trainers.engine.crops_from_batch``): ``"global"`` uint8 (N, G, C, H, W),
``"local"`` uint8 (N, L, C, h, w) only when L > 0, ``"label"`` int64 (N,), ``"index"`` int64 (N,).
Evaluation batches: ``"image"`` uint8 (N, C, S, S) at ``global_crop_size`` (resize + centre crop) and
``"label"``. Crops stay uint8 (4x smaller than float) and are normalised on the device.

Both paths run the same code for a sample: :func:`data.augment.decode_image` then
:meth:`MultiCropAugment.augment_batch`, seeded by ``(seed, epoch, index)``, so the Ray stream and
:class:`data.torch_dataset.MultiCropTorchDataset` give bit-identical views (a test checks it) and
neither depends on the number of workers. Evaluation rows come from the same
:func:`data.torch_dataset.select_eval_indices` on both paths.

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
views are seeded with comes from a named :class:`EpochClock` actor that the train loop sets before
iterating (read once per batch by the map actors).
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import ray
import torch
from ray.data import ActorPoolStrategy, DataContext, Dataset, FileShuffleConfig, TaskPoolStrategy
from ray.data.expressions import col

from data.augment import MultiCropAugment
from data.config import DataConfig
from data.images import clean_transform, decode_image
from data.shards import is_uri, read_meta, resolve_shards, split_path

# The Ray-free twins live in data.torch_dataset; re-exported so `from data.pipeline import ...` keeps working.
from data.torch_dataset import (  # noqa: F401
    CleanTorchDataset,
    MultiCropTorchDataset,
    collate_batch,
    select_eval_indices,
)

DEFAULT_CORRUPT_COUNTER = "bamray-corrupt-train"
DEFAULT_EVAL_CORRUPT_COUNTER = "bamray-corrupt-eval"


# ------------------------------------------------------------------------------ named helper actors
@ray.remote(num_cpus=0)
class CorruptCounter:
    """Counts corrupt rows skipped by the map actors (metric ``data_corrupt_skipped``).

    Keyed by ``(split, index)`` so a corrupt image is counted once however many epochs, actors or
    retries meet it.
    """

    def __init__(self) -> None:
        self._seen: set[tuple[str, int]] = set()

    def add(self, split: str, indices: list[int]) -> int:
        self._seen.update((split, int(i)) for i in indices)
        return len(self._seen)

    def count(self) -> int:
        return len(self._seen)


@ray.remote(num_cpus=0)
class EpochClock:
    """The epoch the augmentation is seeded with, and the samples it leaves out; set by the train loop,
    read by every map task.

    ``skip`` is for an epoch resumed from a checkpoint taken inside it: the samples its first attempt
    already trained on (:mod:`orchestrator.training.midepoch`). Map tasks read ``state()`` (epoch, version)
    every batch and fetch the skip array only when the version changed."""

    def __init__(self) -> None:
        self._epoch, self._version, self._id = 0, 0, uuid.uuid4().hex
        self._skip = np.zeros(0, np.int64)

    def set(self, epoch: int, skip: np.ndarray | None = None) -> int:
        self._epoch = int(epoch)
        self._skip = np.unique(np.asarray(skip if skip is not None else [], dtype=np.int64))
        self._version += 1
        return self._epoch

    def get(self) -> int:
        return self._epoch

    def state(self) -> tuple[int, str]:
        """The epoch, and a key that changes whenever the skip array may have (unique across clocks)."""
        return self._epoch, f"{self._id}-{self._version}"

    def skipped(self) -> np.ndarray:
        return self._skip


#: the clock's key (see ``EpochClock.state``) -> sorted sample indices to leave out; per process (map tasks build their callable
#: per batch, so the cache must outlive it)
_SKIP_CACHE: dict[str, Any] = {"key": None, "skip": np.zeros(0, np.int64)}


def _clock_view(clock: Any) -> tuple[int, np.ndarray]:
    """The clock's epoch and skip array, fetching the array once per version."""
    epoch, key = ray.get(clock.state.remote())
    if _SKIP_CACHE["key"] != key:
        _SKIP_CACHE.update(key=key, skip=ray.get(clock.skipped.remote()))
    return int(epoch), _SKIP_CACHE["skip"]


def on_this_node() -> Any:
    """The scheduling strategy of a run's helper actors: the node of the process that creates them (the
    driver's), as Ray Train pins its own controller and dataset manager. Left to Ray, a zero-CPU actor may
    land on any worker node, and losing that node in the middle of a run would take the run's counters and
    clocks with it, failing a run that Ray Train could otherwise restart on the nodes left."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)


#: The helper actors come back if their node is lost, on another node, with fresh state: the train loop sets
#: the clock at the start of every epoch (a restarted group starts an epoch first), and a counter that
#: restarts undercounts, which beats failing the run. Found by tests/test_nodes_ray.py: the clock died with a
#: lost worker node, and the restarted group could not start.
RESTARTABLE = {"max_restarts": -1, "max_task_retries": -1}


def get_corrupt_counter(name: str = DEFAULT_CORRUPT_COUNTER) -> ray.actor.ActorHandle:
    """Create-or-get the named :class:`CorruptCounter`.

    A named actor lives as long as the process that created it: create it in the driver (as
    :func:`build_train_dataset` does), not in a short-lived worker.
    """
    handle = CorruptCounter.options(
        name=name, get_if_exists=True, scheduling_strategy=on_this_node(), **RESTARTABLE
    ).remote()
    ray.get(handle.count.remote())  # registered and alive before anyone looks it up by name
    return handle


def corrupt_count(name: str = DEFAULT_CORRUPT_COUNTER) -> int:
    """Distinct corrupt rows skipped so far under counter ``name``."""
    return int(ray.get(get_corrupt_counter(name).count.remote()))


def get_epoch_clock(name: str) -> ray.actor.ActorHandle:
    """Create-or-get the named :class:`EpochClock` (``.set.remote(epoch)``, ``.get.remote()``)."""
    handle = EpochClock.options(
        name=name, get_if_exists=True, scheduling_strategy=on_this_node(), **RESTARTABLE
    ).remote()
    ray.get(handle.get.remote())
    return handle


# Ray Data's default 128 MiB blocks hold a whole epoch of 28 px multi-crop output (2.4 kB an image) in
# one block, so the first batch waits for almost the whole pass and one map task runs at a time. Smaller
# blocks stream sooner and spread over more map tasks (figures in bench/README.md, section 2).
TARGET_BLOCK_BYTES = 4 * 2**20


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


# ------------------------------------------------------------------------------------- map functions
def _decode_rows(images: Any, channels: int) -> tuple[list[torch.Tensor], np.ndarray]:
    """Decode a column of PNG bytes; returns the decoded images and a keep-mask (False = corrupt)."""
    decoded, keep = [], np.zeros(len(images), dtype=bool)
    for k, data in enumerate(images):
        image = decode_image(data, channels)
        if image is not None:
            decoded.append(image)
            keep[k] = True
    return decoded, keep


class _MultiCropBatch:
    """Ray Data map actor: PNG rows -> multi-crop batch (the contract). Corrupt rows are dropped and
    reported to the named :class:`CorruptCounter`; the epoch comes from the :class:`EpochClock`."""

    def __init__(self, cfg: DataConfig, seed: int, epoch_clock: Any, corrupt_counter: Any):
        torch.set_num_threads(1)  # tiny tensors: threads only add contention with the other actors
        self.augment = MultiCropAugment(cfg)
        self.cfg, self.seed = cfg, int(seed)
        self.clock = epoch_clock  # actor handles (passed, not looked up by name: no namespace issues)
        self.counter = corrupt_counter

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        epoch, skip = _clock_view(self.clock) if self.clock is not None else (0, None)
        if skip is not None and len(skip):
            fresh = ~np.isin(np.asarray(batch["index"], dtype=np.int64), skip)
            if not fresh.all():  # trained on before this epoch's checkpoint: not again
                batch = {k: v[fresh] for k, v in batch.items()}
        indices = np.asarray(batch["index"], dtype=np.int64)
        images, keep = _decode_rows(batch["image"], self.cfg.channels)
        if not keep.all():
            self._report(indices[~keep])
        kept = indices[keep]
        g, loc = self.augment.augment_batch(images, self.seed, epoch, kept.tolist())
        out = {"global": g.numpy()}
        if self.cfg.local_crops > 0:
            out["local"] = loc.numpy()
        out["label"] = np.asarray(batch["label"], dtype=np.int64)[keep]
        out["index"] = kept
        return out

    def _report(self, bad: np.ndarray) -> None:
        # Waited for: the count must be recorded before this actor can be torn down.
        ray.get(self.counter.add.remote("train", bad.tolist()))


class _CleanBatch:
    """Ray Data map actor for evaluation: PNG rows -> ``{"image", "label"}`` clean views."""

    def __init__(self, cfg: DataConfig, split: str, corrupt_counter: Any):
        torch.set_num_threads(1)
        self.cfg, self.split, self.counter = cfg, split, corrupt_counter

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        indices = np.asarray(batch["index"], dtype=np.int64)
        images, keep = _decode_rows(batch["image"], self.cfg.channels)
        if not keep.all():
            ray.get(self.counter.add.remote(self.split, indices[~keep].tolist()))
        size, c = self.cfg.global_crop_size, self.cfg.channels
        views = [clean_transform(im, size) for im in images]
        stacked = torch.stack(views).numpy() if views else np.zeros((0, c, size, size), dtype=np.uint8)
        return {"image": stacked, "label": np.asarray(batch["label"], dtype=np.int64)[keep]}


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
    ``epoch_clock`` names the :class:`EpochClock` actor (created here, in the caller's process, so it
    lives as long as the driver); with ``None`` every epoch uses epoch 0's views. Corrupt rows are
    dropped and counted under ``corrupt_counter`` (see :func:`corrupt_count`).
    """
    path = resolve_shards(cfg)
    read_meta(path)  # fail fast with the "run: bamray data prepare ..." hint
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
    return _map(ds, cfg, _MultiCropBatch, kwargs)


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
        return ray.data.read_parquet(path, columns=["image", "label", "index"], **kwargs)
    finally:
        ctx.use_datasource_v2 = default


def _map(ds: Dataset, cfg: DataConfig, fn_class: type, kwargs: dict[str, Any]) -> Dataset:
    """``map_batches`` with the callable class as an actor pool, or (``map_compute="tasks"``) as tasks
    that build the (cheap) callable per batch. Actor pools are started afresh on every execution, i.e.
    every epoch (a new process importing torch: seconds); tasks run in Ray's pooled, warm workers."""
    common = {"batch_size": cfg.map_batch_size, "batch_format": "numpy", "num_cpus": cfg.map_cpus}
    if cfg.map_compute == "tasks":
        return ds.map_batches(
            _run_in_task,
            fn_kwargs={"fn_class": fn_class, "kwargs": kwargs},
            compute=TaskPoolStrategy(size=cfg.map_workers),
            **common,
        )
    return ds.map_batches(
        fn_class, fn_constructor_kwargs=kwargs, compute=ActorPoolStrategy(size=cfg.map_workers), **common
    )


def _run_in_task(
    batch: dict[str, np.ndarray], fn_class: type, kwargs: dict[str, Any]
) -> dict[str, np.ndarray]:
    return fn_class(**kwargs)(batch)


def _eval_dataset(
    cfg: DataConfig, path: str, split: str, indices: np.ndarray | None, corrupt_counter: Any
) -> Dataset:
    ds = read_shards(split_path(path, split), num_cpus=cfg.map_cpus)
    if indices is not None:
        ds = ds.filter(expr=col("index").is_in(indices.tolist()))
    return _map(ds, cfg, _CleanBatch, {"cfg": cfg, "split": split, "corrupt_counter": corrupt_counter})


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
    deterministic given ``seed`` (see :func:`data.torch_dataset.select_eval_indices`).
    """
    path = resolve_shards(cfg)
    read_meta(path)
    counter = get_corrupt_counter(corrupt_counter)
    bank = select_eval_indices(path, "train", train_fraction, seed, cfg.train_limit)
    val = select_eval_indices(path, "test", eval_fraction, seed, cfg.val_limit)
    return (_eval_dataset(cfg, path, "train", bank, counter), _eval_dataset(cfg, path, "test", val, counter))
