"""One Ray Data execution for many epochs: every epoch's multi-crop views in a single stream.

Why it exists (``README.md``, *Where the core goes*): :func:`data.pipeline.build_train_dataset` is
re-executed every epoch, and each execution started with Ray Data 2.60's one-task first second (since
2026-12-04 no longer: :mod:`data.ray_budget`), dispatches a task per block (its worker then idles 20-60
ms), and an actor pool would be new processes importing torch again. Here the whole plan of epochs is one execution: its map actors start once (each imports torch
once), Ray keeps several chunks queued at each actor, and no epoch pays a start.

The plan is deterministic given ``(seed, epoch, rank, world)`` and built from the ``index`` columns
alone. Per epoch: the train split's shard files in a seeded order, each file's rows in a seeded order,
concatenated; rank ``r`` takes the ``r``-th of ``world`` equal contiguous segments (the remainder is left
out, as ``streaming_split(equal=True)`` does), cut to whole batches when ``batch_size`` is given. The
segment is cut into chunks of ``map_batch_size`` rows; map actors read the rows of a chunk from the shard
files (keeping the last files' columns: consecutive chunks share a file), decode, augment with the same
``MultiCropAugment`` seeded by ``(seed, epoch, index)`` as every other path, and emit them with an
``epoch`` column. The execution keeps the plan's order, so epoch ``e``'s rows all come before ``e + 1``'s.

A corrupt image is counted (the named :class:`data.run_actors.CorruptCounter`) and replaced by a repeat of
a readable image of the same chunk, so every epoch keeps exactly its planned rows and, in a DDP run, every
rank the same number of steps. Mixing: batches draw from one or two shard files at a time (no local
shuffle buffer, which would mix epochs), so the files themselves must not be sorted by class;
``bamray data prepare`` writes them in a random order.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from data.batch_maps import decode_rows
from data.config import DataConfig, for_reading
from data.decode_cache import MISS, DecodeCache
from data.run_actors import DEFAULT_CORRUPT_COUNTER, get_corrupt_counter
from data.shards import parquet_files, read_meta, resolve_shards, split_path

#: at most this many blocks in the stream's input (chunks are grouped into blocks beyond it)
MAX_BLOCKS = 20_000
#: shard files' columns an actor keeps in memory (consecutive chunks mostly read the same file)
CACHED_FILES = 2


@dataclasses.dataclass
class StreamPlan:
    """Which rows every epoch of one rank's stream holds, and in what order (cheap to pickle: file paths
    and the kept row positions of each file)."""

    filesystem: pafs.FileSystem  # where the shard files are (local or an object store)
    files: list[str]  # the train split's shard files, sorted (paths inside ``filesystem``)
    rows: list[np.ndarray]  # per file: the positions of the rows kept (``index < train_limit``)
    indices: list[np.ndarray]  # per file: the ``index`` of every row of the file
    seed: int
    rank: int = 0
    world: int = 1
    batch_size: int = 0  # > 0: each epoch's segment is cut to whole batches
    chunk_rows: int = 256
    #: epoch -> sample indices to leave out of that epoch (an epoch resumed from a checkpoint inside it)
    skip: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)

    def epoch_rows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(file ids, row positions)`` of this rank's rows of ``epoch``, in stream order."""
        rng = np.random.default_rng([self.seed, epoch, 0x5EED])
        file_ids, positions = [], []
        skip = self.skip.get(epoch)
        for f in rng.permutation(len(self.files)):
            rows = self.rows[f][rng.permutation(len(self.rows[f]))]
            if skip is not None and len(skip):
                rows = rows[~np.isin(self.indices[f][rows], skip)]
            file_ids.append(np.full(len(rows), f, np.int32))
            positions.append(rows)
        fid = np.concatenate(file_ids) if file_ids else np.zeros(0, np.int32)
        pos = np.concatenate(positions) if positions else np.zeros(0, np.int64)
        share = len(pos) // self.world
        if self.batch_size > 0:
            share -= share % self.batch_size
        lo = self.rank * share
        return fid[lo : lo + share], pos[lo : lo + share]

    def rows_per_epoch(self, epoch: int) -> int:
        return len(self.epoch_rows(epoch)[0])

    def chunks(self, epoch: int) -> int:
        return -(-self.rows_per_epoch(epoch) // self.chunk_rows)


def make_plan(
    cfg: DataConfig,
    seed: int,
    *,
    rank: int = 0,
    world: int = 1,
    batch_size: int = 0,
    skip: dict[int, np.ndarray] | None = None,
) -> StreamPlan:
    """Read the ``index`` column of every train shard and keep the rows the config trains on."""
    fs, files = parquet_files(split_path(resolve_shards(cfg), "train"))
    rows, indices = [], []
    for f in files:
        index = pq.read_table(f, columns=["index"], filesystem=fs).column("index").to_numpy()
        kept = np.flatnonzero(index < cfg.train_limit) if cfg.train_limit > 0 else np.arange(len(index))
        rows.append(kept.astype(np.int64))
        indices.append(index.astype(np.int64))
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    return StreamPlan(
        filesystem=fs,
        files=files,
        rows=rows,
        indices=indices,
        seed=int(seed),
        rank=rank,
        world=world,
        batch_size=batch_size,
        chunk_rows=cfg.map_batch_size,
        skip={int(e): np.asarray(s, np.int64) for e, s in (skip or {}).items()},
    )


class RunStreamBatch:
    """Ray Data map actor: a block of ``(epoch, first chunk, chunks)`` rows -> those chunks' multi-crop
    views, one output batch per chunk, in plan order."""

    def __init__(self, cfg: DataConfig, plan: StreamPlan, corrupt_counter: Any):
        import torch

        from data.augment import MultiCropAugment

        torch.set_num_threads(1)
        self.cfg, self.plan, self.counter = cfg, plan, corrupt_counter
        self.augment = MultiCropAugment(cfg)
        self.cache = DecodeCache(cfg.decode_cache_mb * 2**20)  # pixels kept across epochs
        self._columns: OrderedDict[int, Any] = OrderedDict()  # the last files' image columns
        self._labels: dict[int, np.ndarray] = {}  # labels of every file read so far (small; kept)
        self._epoch: tuple[int, tuple[np.ndarray, np.ndarray]] | None = None

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for epoch, first, count in zip(batch["epoch"], batch["chunk"], batch["chunks"]):
            fid, pos = self._rows(int(epoch))
            step = self.plan.chunk_rows
            for c in range(int(first), int(first) + int(count)):
                yield self._chunk(int(epoch), fid[c * step : (c + 1) * step], pos[c * step : (c + 1) * step])

    def _rows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self.plan.epoch_rows(epoch))
        return self._epoch[1]

    def _column(self, f: int) -> Any:
        """The image column of shard file ``f`` (its labels are kept on the side)."""
        if f not in self._columns:
            t = pq.read_table(self.plan.files[f], columns=["image", "label"], filesystem=self.plan.filesystem)
            self._columns[f] = t.column("image").combine_chunks()
            self._labels[f] = t.column("label").to_numpy().astype(np.int64)
            while len(self._columns) > CACHED_FILES:
                self._columns.popitem(last=False)
        self._columns.move_to_end(f)
        return self._columns[f]

    def _decode(self, fid: np.ndarray, pos: np.ndarray) -> list[Any]:
        """The chunk's images, ``None`` where one does not decode; from the cache where it has them."""
        images: list[Any] = [self.cache.get(int(f), int(p)) for f, p in zip(fid, pos)]
        todo = [k for k, im in enumerate(images) if im is MISS]
        if todo:
            raw = [self._column(int(fid[k]))[int(pos[k])].as_py() for k in todo]
            decoded, ok = decode_rows(raw, self.cfg.channels)
            fresh = iter(decoded)
            for k, good in zip(todo, ok):
                images[k] = next(fresh) if good else None
                self.cache.put(int(fid[k]), int(pos[k]), images[k])
        return images

    def _chunk(self, epoch: int, fid: np.ndarray, pos: np.ndarray) -> dict[str, np.ndarray]:
        images = self._decode(fid, pos)  # reads the files the cache misses, their labels with them
        labels = np.array([self._labels[int(f)][p] for f, p in zip(fid, pos)], np.int64)
        indices = np.array([self.plan.indices[f][p] for f, p in zip(fid, pos)], np.int64)
        keep = np.array([im is not None for im in images], bool)
        decoded = [im for im in images if im is not None]
        if not keep.all():
            ray.get(self.counter.add.remote("train", indices[~keep].tolist()))
            if not keep.any():  # nothing to stand in: the rows are left out (the epoch comes up short)
                return self._empty(epoch)
            # A readable image of the chunk stands in for each corrupt one, augmented with the corrupt
            # row's own seed (its index), so the epoch keeps its rows and the stand-in is a fresh view.
            good = np.flatnonzero(keep)
            source = np.where(keep, np.cumsum(keep) - 1, np.arange(len(keep)) % len(good))
            decoded = [decoded[i] for i in source]
            labels = labels[good][source]
        g, loc = self.augment.augment_batch(decoded, self.plan.seed, epoch, indices.tolist())
        out = {"global": g.numpy(), "label": labels, "index": indices, "epoch": np.full(len(pos), epoch)}
        if self.cfg.local_crops > 0:
            out["local"] = loc.numpy()
        return out

    def _empty(self, epoch: int) -> dict[str, np.ndarray]:
        c, cfg = self.cfg.channels, self.cfg
        out = {
            "global": np.zeros(
                (0, cfg.global_crops, c, cfg.global_crop_size, cfg.global_crop_size), np.uint8
            ),
            "label": np.zeros(0, np.int64),
            "index": np.zeros(0, np.int64),
            "epoch": np.full(0, epoch),
        }
        if cfg.local_crops > 0:
            out["local"] = np.zeros(
                (0, cfg.local_crops, c, cfg.local_crop_size, cfg.local_crop_size), np.uint8
            )
        return out


def build_run_stream(
    cfg: DataConfig,
    seed: int,
    epochs: Sequence[int],
    *,
    rank: int = 0,
    world: int = 1,
    batch_size: int = 0,
    skip: dict[int, np.ndarray] | None = None,
    corrupt_counter: str = DEFAULT_CORRUPT_COUNTER,
) -> tuple[ray.data.Dataset, StreamPlan]:
    """The multi-crop stream of ``epochs`` for one rank, as one lazy dataset (one execution).

    Rows are the batch contract of :mod:`data.pipeline` plus ``epoch``; iterate it with
    :func:`epoch_batches`. ``cfg.map_workers`` actors of ``cfg.map_cpus`` CPUs each run the map.
    """
    from ray.data import ActorPoolStrategy

    path = resolve_shards(cfg)
    cfg = for_reading(cfg, read_meta(path), path)
    plan = make_plan(cfg, seed, rank=rank, world=world, batch_size=batch_size, skip=skip)
    per_epoch = {e: plan.chunks(e) for e in epochs}
    group = max(1, -(-sum(per_epoch.values()) // MAX_BLOCKS))
    items = [
        {"epoch": e, "chunk": c, "chunks": min(group, n - c)}
        for e, n in per_epoch.items()
        for c in range(0, n, group)
    ]
    ds = ray.data.from_items(items, override_num_blocks=max(len(items), 1))
    ds = ds.map_batches(
        RunStreamBatch,
        fn_constructor_kwargs={
            "cfg": cfg,
            "plan": plan,
            "corrupt_counter": get_corrupt_counter(corrupt_counter),
        },
        batch_size=1,
        batch_format="numpy",
        num_cpus=cfg.map_cpus,
        compute=ActorPoolStrategy(size=max(cfg.map_workers, 1)),
    )
    ds.context.execution_options.preserve_order = True  # epoch e's rows before e + 1's
    return ds, plan


def _started(it: Iterator[Any]) -> Iterator[Any]:
    """``it``, its first item already being fetched in a daemon thread (an error is raised at the first
    ``next``, in the caller's thread)."""
    box: dict[str, Any] = {}

    def first() -> None:
        try:
            box["item"] = next(it, _END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            box["error"] = err

    thread = threading.Thread(target=first, name="bamray-stream-start", daemon=True)
    thread.start()

    def rest() -> Iterator[Any]:
        thread.join()
        if "error" in box:
            raise box["error"]
        if box["item"] is _END:
            return
        yield box["item"]
        yield from it

    return rest()


_END = object()


def epoch_batches(
    ds: ray.data.Dataset,
    batch_size: int,
    epochs: Sequence[int],
    *,
    prefetch_batches: int = 2,
    start: bool = False,
) -> Iterator[tuple[int, Iterator[dict[str, Any]]]]:
    """``(epoch, that epoch's batches as torch tensors)`` for every epoch of the stream, from one
    iteration of ``ds``. A batch never mixes epochs: an epoch's last rows that do not fill a batch are
    left out (``drop_last``). Ask for the epochs in order; what an epoch's consumer leaves unread is
    skipped when the next one starts. ``start``: begin the execution now, in a background thread (its
    actors start while the caller does other work), not at the first ``next``."""
    import torch

    stream = iter(
        ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=prefetch_batches)
    )
    if start:
        stream = _started(stream)
    carry: dict[str, np.ndarray] | None = None  # rows of the next epoch met at the end of this one

    def one_epoch(epoch: int) -> Iterator[dict[str, Any]]:
        nonlocal carry
        buf: list[dict[str, np.ndarray]] = []
        have = 0
        while True:
            if carry is not None:
                b, carry = carry, None
            else:
                b = next(stream, None)
                if b is None:
                    return
            if (b["epoch"] < epoch).any():  # an earlier epoch was left before its end (a failed step)
                b = {k: v[b["epoch"] >= epoch] for k, v in b.items()}
            mine = b["epoch"] == epoch
            if not mine.all():  # the next epoch starts in this batch: its rows wait for it
                carry = {k: v[~mine] for k, v in b.items()}
                b = {k: v[mine] for k, v in b.items()}
            if not have and len(b["epoch"]) == batch_size:  # the usual case: a whole batch as it came
                # Arrow's buffers are read-only; a tensor over them would warn (and must never be written)
                yield {k: torch.from_numpy(v if v.flags.writeable else v.copy()) for k, v in b.items()}
            elif len(b["epoch"]):
                buf.append(b)
                have += len(b["epoch"])
                if have >= batch_size:
                    whole = {k: np.concatenate([x[k] for x in buf]) for k in buf[0]}
                    yield {k: torch.from_numpy(v[:batch_size]) for k, v in whole.items()}
                    rest = {k: v[batch_size:] for k, v in whole.items()}
                    buf, have = ([rest] if len(rest["epoch"]) else []), len(rest["epoch"])
            if carry is not None:
                return  # what is left in buf is less than a batch: dropped

    for epoch in epochs:
        yield epoch, one_epoch(epoch)
