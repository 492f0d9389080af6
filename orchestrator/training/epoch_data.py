"""Where a worker's epochs come from: the two data streams of ``data.stream``.

- ``epoch``: Ray Train's split of the driver's dataset, one Ray Data execution per epoch. The map tasks
  seed the augmentation with the epoch they read from the run's epoch clock, which rank 0 moves before
  anyone pulls the epoch's first batch.
- ``run``: this worker's own stream of every epoch still to come (:mod:`data.run_stream`), one execution
  for them all. It is opened as soon as the worker knows its first epoch, so that its map actors (each
  imports torch) start while the rest of the worker's set-up runs, and opened again only when the run's
  length changed (a time budget) or an epoch resumes inside itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from orchestrator.training import ranks
from orchestrator.training.plan import WorkerPlan


class EpochData:
    """One worker's batches, epoch by epoch, from the stream its run's config names."""

    def __init__(self, plan: WorkerPlan, rank: int, world: int) -> None:
        import ray.train

        self.plan, self.cfg, self.rank, self.world = plan, plan.cfg, rank, world
        self.clock: Any = None  # data.stream "epoch": the epoch clock its map tasks read
        self.shard: Any = None  # data.stream "epoch": this worker's split of the driver's dataset
        self.stream: Any = None  # data.stream "run": data.run_stream.epoch_batches of the epochs to come
        self.opened_for: int | None = None  # the epoch (with its resume skip) the stream was opened for
        if self.cfg.data.stream == "epoch":
            self.shard = ray.train.get_dataset_shard("train")
            if plan.epoch_clock:
                from data.run_actors import get_epoch_clock

                self.clock = get_epoch_clock(plan.epoch_clock)

    def open(self, epoch: int, end_epoch: int, skip: np.ndarray | None = None) -> None:
        """``data.stream: run``: build the stream of epochs ``epoch`` .. ``end_epoch - 1`` (``skip``: the
        samples ``epoch`` leaves out, what every rank trained on before a resume inside it) and start its
        execution in the background. Nothing to do for the per-epoch stream."""
        if self.shard is not None or epoch >= end_epoch:
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
        self.opened_for = epoch

    def batches(self, epoch: int, end_epoch: int, skip: np.ndarray | None) -> Iterable[dict[str, Any]]:
        """``epoch``'s batches for this worker (``skip``: samples it leaves out, see :meth:`open`)."""
        if self.shard is None:
            return self._from_stream(epoch, end_epoch, skip)
        import ray

        if self.clock is not None:
            if self.rank == 0:
                ray.get(self.clock.set.remote(epoch, skip))
            ranks.barrier()  # no worker pulls the epoch's first batch before the clock moved
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
