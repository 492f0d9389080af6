"""Where a worker's epochs come from: the two data streams of ``data.stream``.

- ``epoch``: Ray Train's split of the driver's dataset (a one-worker run: the dataset itself, executed in
  the worker, :mod:`orchestrator.training.shards`), one Ray Data execution per epoch. The map tasks
  seed the augmentation with the epoch they read from the run's epoch clock, which rank 0 moves before
  anyone pulls the epoch's first batch.
- ``run``: this worker's own stream of every epoch still to come (:mod:`data.run_stream`), one execution
  for them all. It is opened as soon as the worker knows its first epoch, so that its map actors (each
  imports torch) start while the rest of the worker's set-up runs, and opened again only when the run's
  length changed (a time budget) or an epoch resumes inside itself.

A fresh run (nothing to restore) knows its first epoch before the worker has imported torch or built its
model: :meth:`EpochData.start_fresh` starts that epoch's data then, so that the pipeline's processes boot
(each imports torch) while the worker does, instead of after it. With either stream the batches are the
ones the epoch would have had anyway: they are seeded by ``(seed, epoch, index)``, and the per-epoch stream
starts early only when the epoch clock already reads epoch 0 with nothing left out.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from orchestrator.training import ranks
from orchestrator.training.plan import WorkerPlan
from orchestrator.training.shards import Shards


class EpochData:
    """One worker's batches, epoch by epoch, from the stream its run's config names."""

    def __init__(self, plan: WorkerPlan, rank: int, world: int, shards: Shards) -> None:
        self.plan, self.cfg, self.rank, self.world = plan, plan.cfg, rank, world
        self.clock: Any = None  # data.stream "epoch": the epoch clock its map tasks read
        # data.stream "epoch": this worker's split of the driver's dataset (a one-worker run: all of it)
        self.shard: Any = None
        self.stream: Any = None  # data.stream "run": data.run_stream.epoch_batches of the epochs to come
        self.opened_for: int | None = None  # the epoch (with its resume skip) the stream was opened for
        self.end_epoch: int | None = None  # ... and the end of the epochs it was opened for
        self.early: FirstBatch | None = None  # data.stream "epoch": epoch 0's iterator, started early
        if self.cfg.data.stream == "epoch":
            self.shard = shards("train")
            if plan.epoch_clock:
                from data.run_actors import get_epoch_clock

                self.clock = get_epoch_clock(plan.epoch_clock)

    def start_fresh(self, end_epoch: int) -> None:
        """A run with nothing to restore: start epoch 0's data now (see the module's docstring). The
        one-execution stream opens; the per-epoch stream pulls epoch 0's first batch in a thread, which
        :meth:`batches` hands over."""
        if self.shard is None:
            self.open(0, end_epoch)
        elif end_epoch > 0:
            self.early = FirstBatch(self._epoch_zero)

    def _epoch_zero(self) -> Iterable[dict[str, Any]] | None:
        """Epoch 0's batches if the epoch clock says epoch 0 and leaves nothing out (a restarted worker
        group that never checkpointed may find it moved on; then rank 0 sets it as usual), else None."""
        if self.clock is not None:
            from data.run_actors import clock_view

            epoch, skip = clock_view(self.clock)
            if epoch != 0 or len(skip):
                return None
        return self._shard_batches(0)

    def open(self, epoch: int, end_epoch: int, skip: np.ndarray | None = None) -> None:
        """``data.stream: run``: build the stream of epochs ``epoch`` .. ``end_epoch - 1`` (``skip``: the
        samples ``epoch`` leaves out, what every rank trained on before a resume inside it) and start its
        execution in the background; already open for exactly that (:meth:`start_fresh`), it stays. Nothing
        to do for the per-epoch stream."""
        if self.shard is not None or epoch >= end_epoch:
            return
        if (
            self.stream is not None
            and self.opened_for == epoch
            and skip is None
            and end_epoch == self.end_epoch
        ):
            return
        from data.pipeline import configure_data_context
        from data.run_stream import build_run_stream, epoch_batches

        cfg = self.cfg
        epochs = range(epoch, end_epoch)
        configure_data_context()  # this process runs the execution: its blocks, no progress bars
        ds, _ = build_run_stream(
            cfg.data,
            cfg.seed,
            epochs,
            rank=self.rank,
            world=self.world,
            batch_size=cfg.optim.batch_size,
            skip=None if skip is None else {epoch: skip},
            corrupt_counter=self.plan.corrupt_counter,
        )
        self.stream = epoch_batches(
            ds, cfg.optim.batch_size, epochs, prefetch_batches=cfg.data.prefetch_batches, start=True
        )
        self.opened_for, self.end_epoch = epoch, end_epoch

    def batches(self, epoch: int, end_epoch: int, skip: np.ndarray | None) -> Iterable[dict[str, Any]]:
        """``epoch``'s batches for this worker (``skip``: samples it leaves out, see :meth:`open`)."""
        if self.shard is None:
            return self._from_stream(epoch, end_epoch, skip)
        import ray

        if self.clock is not None:
            if self.rank == 0:
                ray.get(self.clock.set.remote(epoch, skip))
            ranks.barrier()  # no worker pulls the epoch's first batch before the clock moved
        early, self.early = self.early, None
        if early is not None and epoch == 0 and skip is None:
            started = early.take()
            if started is not None:
                return started
        return self._shard_batches(epoch)

    def _shard_batches(self, epoch: int) -> Iterable[dict[str, Any]]:
        cfg = self.cfg
        return self.shard.iter_torch_batches(
            batch_size=cfg.optim.batch_size,
            drop_last=True,
            prefetch_batches=cfg.data.prefetch_batches,
            local_shuffle_buffer_size=cfg.data.local_shuffle_buffer or None,
            local_shuffle_seed=(cfg.seed * 7919 + epoch) * 64 + self.rank,
        )

    def _from_stream(self, epoch: int, end_epoch: int, skip: np.ndarray | None) -> Iterable[dict[str, Any]]:
        fresh, self.opened_for = self.opened_for == epoch, None
        nxt = next(self.stream, None) if self.stream is not None and (skip is None or fresh) else None
        if nxt is None or nxt[0] != epoch:
            self.open(epoch, end_epoch, skip)
            nxt = next(self.stream)
        return nxt[1]


class FirstBatch:
    """An iterable's first item, pulled in a daemon thread from the moment this is built; :meth:`take`
    waits for it and returns the whole iterable again (None when ``make`` returned None). An error in the
    thread is raised by :meth:`take`."""

    _END = object()

    def __init__(self, make: Callable[[], Iterable[Any] | None]) -> None:
        self._it: Iterator[Any] | None = None
        self._first: Any = self._END
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._pull, args=(make,), name="bamray-first-batch", daemon=True
        )
        self._thread.start()

    def _pull(self, make: Callable[[], Iterable[Any] | None]) -> None:
        try:
            made = make()
            if made is not None:
                self._it = iter(made)
                self._first = next(self._it, self._END)
        except BaseException as err:  # noqa: BLE001 - handed to the thread that takes the batches
            self._error = err

    def take(self) -> Iterable[Any] | None:
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._it is None:
            return None
        return self._it if self._first is self._END else itertools.chain([self._first], self._it)
