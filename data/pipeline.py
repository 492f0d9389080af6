"""Shards -> training / evaluation streams: Ray Data for the cluster, torch Datasets as the twin.

Batch contract (consumed by ``trainers.engine.crops_from_batch``): ``"global"`` uint8 (N, G, C, H, W),
``"local"`` uint8 (N, L, C, h, w) only when L > 0, ``"label"`` int64 (N,), ``"index"`` int64 (N,).
Evaluation batches: ``"image"`` uint8 (N, C, S, S) at ``global_crop_size`` (resize + centre crop) and
``"label"``. Crops stay uint8 (4x smaller than float) and are normalised on the device.

Both paths run the same code for a sample: :func:`data.augment.decode_image` then
:meth:`MultiCropAugment.augment_batch`, seeded by ``(seed, epoch, index)``, so the Ray stream and
:class:`MultiCropTorchDataset` give bit-identical views (a test checks it) and neither depends on the
number of workers.

Throughput-relevant settings (``DataConfig``):

- ``map_batch_size`` (256): rows per augmentation call. The augmentation is batched, so per-call
  overhead (Python, torch dispatch, one ``roi_align`` per crop size) is paid once per batch; below ~64
  rows throughput drops quickly, above ~512 it only costs memory.
- ``map_compute`` ("tasks"): the callable class runs in Ray's warm, pooled worker processes, built
  per batch (cheap). "actors" keeps one instance per actor, but Ray Data starts a fresh actor pool on
  every execution, i.e. every epoch (new processes importing torch: seconds each; on the 2-core test box
  two eval executions took 42 s as actors vs 13 s as tasks).
- ``map_workers`` (1) x ``map_cpus`` (1.0): the augmentation actor pool (or concurrent tasks). One actor does roughly 10k
  images/s at 28 px with 2+6 crops (one CPU); add actors when the trainer waits on data. Ray Train's
  workers take their CPUs out of the same pool, so on a small node keep this small or use fractional
  ``map_cpus``, and call :func:`configure_data_context` (Ray Data can otherwise stall with
  ``backpressured: ResourceBudget``).
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

from typing import Any

import numpy as np
import ray
import torch
from ray.data import ActorPoolStrategy, DataContext, Dataset, FileShuffleConfig, TaskPoolStrategy
from ray.data.expressions import col

from data.augment import MultiCropAugment, clean_transform, decode_image
from data.config import DataConfig
from data.sources import is_uri, read_meta, read_split_table, resolve_shards, split_path

DEFAULT_CORRUPT_COUNTER = "bamray-corrupt-train"
DEFAULT_EVAL_CORRUPT_COUNTER = "bamray-corrupt-eval"


# ------------------------------------------------------------------------------ named helper actors
@ray.remote(num_cpus=0)
class CorruptCounter:
    """Counts corrupt rows skipped by the map actors (metric ``data_corrupt_skipped``).

    Keyed by ``(split, index)`` so a corrupt image is counted once however many epochs, actors or
    retries meet it; ``events`` is the raw number of skips.
    """

    def __init__(self) -> None:
        self._seen: set[tuple[str, int]] = set()
        self._events = 0

    def add(self, split: str, indices: list[int]) -> int:
        self._events += len(indices)
        self._seen.update((split, int(i)) for i in indices)
        return len(self._seen)

    def count(self) -> int:
        return len(self._seen)

    def events(self) -> int:
        return self._events


@ray.remote(num_cpus=0)
class EpochClock:
    """The epoch the augmentation is seeded with; set by the train loop, read by every map actor."""

    def __init__(self) -> None:
        self._epoch = 0

    def set(self, epoch: int) -> int:
        self._epoch = int(epoch)
        return self._epoch

    def get(self) -> int:
        return self._epoch


def get_corrupt_counter(name: str = DEFAULT_CORRUPT_COUNTER) -> ray.actor.ActorHandle:
    """Create-or-get the named :class:`CorruptCounter`.

    A named actor lives as long as the process that created it: create it in the driver (as
    :func:`build_train_dataset` does), not in a short-lived worker.
    """
    handle = CorruptCounter.options(name=name, get_if_exists=True).remote()
    ray.get(handle.count.remote())  # registered and alive before anyone looks it up by name
    return handle


def corrupt_count(name: str = DEFAULT_CORRUPT_COUNTER) -> int:
    """Distinct corrupt rows skipped so far under counter ``name``."""
    return int(ray.get(get_corrupt_counter(name).count.remote()))


def get_epoch_clock(name: str) -> ray.actor.ActorHandle:
    """Create-or-get the named :class:`EpochClock` (``.set.remote(epoch)``, ``.get.remote()``)."""
    handle = EpochClock.options(name=name, get_if_exists=True).remote()
    ray.get(handle.get.remote())
    return handle


# Ray Data's default 128 MiB blocks hold a whole epoch of 28 px multi-crop output (2.4 kB an image) in
# one block: measured on full Fashion-MNIST (2 CPUs), the first batch came after 8.8 s of a 9.5 s pass
# and one map task ran at a time. 4 MiB: first batch after 2.9 s, 6.8-8.3k img/s instead of 6.3k.
TARGET_BLOCK_BYTES = 4 * 2**20


def configure_data_context(
    cpus: float | None = None, object_store_memory: float | None = None, progress_bars: bool = False,
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
        epoch = int(ray.get(self.clock.get.remote())) if self.clock is not None else 0
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
    cfg: DataConfig, seed: int, epoch_clock: str | None = None, *,
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
    ds = read_shards(split_path(path, "train"), shuffle=FileShuffleConfig(seed=int(seed), reseed_after_execution=True))
    if cfg.train_limit > 0:
        ds = ds.filter(expr=col("index") < cfg.train_limit)
    kwargs = {"cfg": cfg, "seed": int(seed), "epoch_clock": clock, "corrupt_counter": counter}
    return _map(ds, cfg, _MultiCropBatch, kwargs)


def read_shards(path: str, **kwargs: Any) -> Dataset:
    """``read_parquet`` of one split's shards (columns image, label, index).

    Local shards are read with Ray Data's V1 Parquet datasource. Ray 2.60's default (V2) lists files by
    starting a pool of up to 32 ``FooterReader`` actors per read -- new Python processes, built for
    network-bound footer reads on object stores. A Train run reads 3 datasets (train, k-NN bank,
    validation), so on local disk that pool cost more than everything else in start-up: on 2 CPUs one
    1-worker run spawned 44 Ray processes and took its first step 58.5 s after launch, against 21
    processes and 36.7 s with V1 (39.8 s with a single footer actor). URIs (``s3://`` ...) keep Ray's
    default.
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
        return ds.map_batches(_run_in_task, fn_kwargs={"fn_class": fn_class, "kwargs": kwargs},
                              compute=TaskPoolStrategy(size=cfg.map_workers), **common)
    return ds.map_batches(fn_class, fn_constructor_kwargs=kwargs, compute=ActorPoolStrategy(size=cfg.map_workers),
                          **common)


def _run_in_task(batch: dict[str, np.ndarray], fn_class: type, kwargs: dict[str, Any]) -> dict[str, np.ndarray]:
    return fn_class(**kwargs)(batch)


def select_eval_indices(path: str, split: str, fraction: float, seed: int, limit: int = 0) -> np.ndarray | None:
    """Indices of a deterministic, class-balanced ``fraction`` of ``split`` (``None`` = all rows).

    Per class, ``max(1, round(fraction * n_class))`` rows chosen by ``default_rng([seed, class])``
    among rows with ``index < limit`` (when ``limit > 0``); returned sorted.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction: got {fraction}; must be in (0, 1]")
    if fraction >= 1.0 and limit <= 0:
        return None
    table = read_split_table(path, split, columns=["label", "index"])
    labels = table.column("label").to_numpy()
    indices = table.column("index").to_numpy()
    if limit > 0:
        keep = indices < limit
        labels, indices = labels[keep], indices[keep]
    if fraction >= 1.0:
        return np.sort(indices)
    chosen = []
    for cls in np.unique(labels):
        members = indices[labels == cls]
        k = max(1, int(round(fraction * len(members))))
        rng = np.random.default_rng([int(seed), int(cls)])
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def _eval_dataset(cfg: DataConfig, path: str, split: str, indices: np.ndarray | None,
                  corrupt_counter: Any) -> Dataset:
    ds = read_shards(split_path(path, split))
    if indices is not None:
        ds = ds.filter(expr=col("index").is_in(indices.tolist()))
    return _map(ds, cfg, _CleanBatch, {"cfg": cfg, "split": split, "corrupt_counter": corrupt_counter})


def build_eval_datasets(
    cfg: DataConfig, train_fraction: float, eval_fraction: float, seed: int, *,
    corrupt_counter: str = DEFAULT_EVAL_CORRUPT_COUNTER,
) -> tuple[Dataset, Dataset]:
    """``(train bank, validation)`` clean-view datasets for k-NN / linear probe.

    The bank is a class-balanced ``train_fraction`` of the train split (within ``train_limit``), the
    validation set a class-balanced ``eval_fraction`` of the test split (within ``val_limit``); both
    deterministic given ``seed`` (see :func:`select_eval_indices`).
    """
    path = resolve_shards(cfg)
    read_meta(path)
    counter = get_corrupt_counter(corrupt_counter)
    bank = select_eval_indices(path, "train", train_fraction, seed, cfg.train_limit)
    val = select_eval_indices(path, "test", eval_fraction, seed, cfg.val_limit)
    return (_eval_dataset(cfg, path, "train", bank, counter),
            _eval_dataset(cfg, path, "test", val, counter))


# -------------------------------------------------------------------------------- torch twin (no Ray)
class _ShardRows(torch.utils.data.Dataset):
    """A split's rows held in memory (PNG bytes are small: Fashion-MNIST train is ~30 MB)."""

    def __init__(self, cfg: DataConfig, split: str, indices: np.ndarray | None = None, limit: int = 0):
        self.cfg = cfg
        self.path = resolve_shards(cfg)
        self.meta = read_meta(self.path)
        table = read_split_table(self.path, split, columns=["image", "label", "index"])
        index = table.column("index").to_numpy()
        keep = np.ones(len(index), dtype=bool)
        if limit > 0:
            keep &= index < limit
        if indices is not None:
            keep &= np.isin(index, indices)
        rows = np.flatnonzero(keep)
        # Kept as one Arrow array, not a list of Python bytes: forked DataLoader workers would otherwise
        # copy every page they touch (reference counts live next to the objects).
        self.images = table.column("image").take(rows).combine_chunks()
        self.labels = table.column("label").to_numpy()[rows].astype(np.int64)
        self.indices = index[rows].astype(np.int64)
        self.split = split
        #: corrupt rows met by this process (DataLoader workers count their own copies)
        self.corrupt_skipped = 0

    def __len__(self) -> int:
        return len(self.indices)


class MultiCropTorchDataset(_ShardRows):
    """torch twin of :func:`build_train_dataset`: the same sample for the same ``(seed, epoch, index)``.

    Items are ``{"global", "local"?, "label", "index"}`` (``None`` for a corrupt row; the collate drops
    it). ``__getitems__`` augments a whole DataLoader batch in one call (the fast path, identical
    results). Call :meth:`set_epoch` before each epoch; with ``persistent_workers=True`` the workers keep
    their copy, so re-create the iterator (the default) for the new epoch to reach them.
    """

    def __init__(self, cfg: DataConfig, split: str = "train", seed: int = 0):
        super().__init__(cfg, split, limit=cfg.train_limit if split == "train" else cfg.val_limit)
        self.augment = MultiCropAugment(cfg)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor] | None:
        return self.__getitems__([i])[0]

    def __getitems__(self, positions: list[int]) -> list[dict[str, torch.Tensor] | None]:
        decoded = [decode_image(self.images[p].as_py(), self.cfg.channels) for p in positions]
        ok = [k for k, im in enumerate(decoded) if im is not None]
        self.corrupt_skipped += len(positions) - len(ok)
        idx = [int(self.indices[positions[k]]) for k in ok]
        g, loc = self.augment.augment_batch([decoded[k] for k in ok], self.seed, self.epoch, idx)
        out: list[dict[str, torch.Tensor] | None] = [None] * len(positions)
        for j, k in enumerate(ok):
            item = {"global": g[j], "label": torch.tensor(self.labels[positions[k]]),
                    "index": torch.tensor(idx[j])}
            if self.cfg.local_crops > 0:
                item["local"] = loc[j]
            out[k] = item
        return out


class CleanTorchDataset(_ShardRows):
    """torch twin of :func:`build_eval_datasets`: ``{"image", "label"}`` clean views of a
    class-balanced ``fraction`` of ``split`` (same selection as the Ray path for the same seed)."""

    def __init__(self, cfg: DataConfig, split: str = "test", fraction: float = 1.0, seed: int = 0):
        limit = cfg.train_limit if split == "train" else cfg.val_limit
        path = resolve_shards(cfg)
        super().__init__(cfg, split, indices=select_eval_indices(path, split, fraction, seed, limit), limit=limit)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor] | None:
        image = decode_image(self.images[i].as_py(), self.cfg.channels)
        if image is None:
            self.corrupt_skipped += 1
            return None
        return {"image": clean_transform(image, self.cfg.global_crop_size), "label": torch.tensor(self.labels[i])}


def collate_batch(samples: list[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor]:
    """Stack samples into the batch contract, dropping ``None`` (corrupt) items."""
    samples = [s for s in samples if s is not None]
    if not samples:
        return {}
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}

