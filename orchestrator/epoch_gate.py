"""Holds a Tune trial's Train workers at a scheduler's decision epochs until Tune has decided.

Why this exists: Ray Train workers do not wait for the controller, let alone for Tune, after a
``ray.train.report``: by the time ASHA has compared a trial at a rung and Tune has killed it, its workers
have trained on, and on short epochs they had finished (and logged to MLflow) the next one, so a trial
recorded as stopped after epoch 1 could show curves to epoch 2. Training past the rung is also
compute thrown away on a cluster.

The trial's driver reports each epoch to Tune itself (``ray.tune.report`` returns only once Tune has
asked for the next result, i.e. once the scheduler said CONTINUE) and then opens the gate up to that
epoch; the workers wait on the gate after reporting a decision epoch (ASHA's rungs, and the epochs
where the collapse watch may stop the trial: :func:`orchestrator.sweep.collapse.decision_epochs`). When
Tune stops the trial, the gate's owner (the trial actor) dies, the gate with it, and the workers' wait
fails as they are torn down anyway. A rung's wait costs one Tune round trip (0.4 s measured on a local
Ray); at a collapse-watch epoch the driver opens the gate as soon as it has the report, and waits for Tune
only when the watch fired (:func:`orchestrator.sweep.relay.fit_reporting_to_tune`). Other epochs never wait.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import ray


@ray.remote(num_cpus=0)
class EpochGate:
    """``release(epoch)`` opens every epoch up to ``epoch``; ``wait(epoch)`` returns once it is open."""

    def __init__(self) -> None:
        self._open_through = 0
        self._changed = asyncio.Condition()

    async def release(self, epoch: int) -> int:
        async with self._changed:
            self._open_through = max(self._open_through, int(epoch))
            self._changed.notify_all()
        return self._open_through

    async def wait(self, epoch: int) -> int:
        async with self._changed:
            await self._changed.wait_for(lambda: self._open_through >= epoch)
        return self._open_through


@dataclasses.dataclass(frozen=True)
class GatedEpochs:
    """What a Train worker needs of a trial's gate: the :class:`EpochGate` actor and the epochs after
    which it must wait (the scheduler's decision epochs)."""

    gate: Any  # an EpochGate actor handle
    epochs: frozenset[int]

    @classmethod
    def of(cls, value: GatedEpochs | None) -> GatedEpochs | None:
        """Type check at the driver: a wrong object would only fail inside a Ray worker."""
        if value is not None and not isinstance(value, GatedEpochs):
            raise TypeError(f"epoch_gate: expected GatedEpochs or None, got {type(value).__name__}")
        return value

    def hold_after(self, epoch: int) -> None:
        """Block until the gate is open through ``epoch`` when that is a decision epoch: no training past it
        before the scheduler decided."""
        if epoch in self.epochs:
            ray.get(self.gate.wait.remote(epoch))
