"""The run's helper actors: the corrupt-row counters and the epoch clock that the map tasks read.

They live apart from :mod:`data.pipeline` on purpose: Ray ships an actor class by reference, so each actor
process imports the class's module. ``data.pipeline`` pulls in torch and Ray Data (about 4 s of CPU per
process); this module only numpy and Ray, so a run's helper actor (:class:`RunLedger`: its counter and its
clock) starts in a fraction of that.
"""

from __future__ import annotations

import importlib
import os
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray

DEFAULT_CORRUPT_COUNTER = "bamray-corrupt-train"
DEFAULT_EVAL_CORRUPT_COUNTER = "bamray-corrupt-eval"


@ray.remote(num_cpus=0)
class RunLedger:
    """A run's corrupt-row count and its epoch clock, in one actor process.

    Counting: the rows the map tasks skipped as corrupt (metric ``data_corrupt_skipped``), keyed by
    ``(split, index)`` so a corrupt image is counted once however many epochs, actors or retries meet it.

    Clock: the epoch the augmentation is seeded with, and the samples it leaves out; set by the train loop,
    read by every map task. ``skip`` is for an epoch resumed from a checkpoint taken inside it: the samples
    its first attempt already trained on (:mod:`orchestrator.training.midepoch`). Map tasks read
    ``state()`` (epoch, version) every batch and fetch the skip array only when the version changed.

    One class for both so that a run names one actor for both (``bamray train`` does): a process fewer to
    boot before the first step (about 0.8 s of CPU here). Under two names it is two independent actors.
    """

    def __init__(self) -> None:
        self._seen: set[tuple[str, int]] = set()
        self._epoch, self._version, self._id = 0, 0, uuid.uuid4().hex
        self._skip = np.zeros(0, np.int64)

    def add(self, split: str, indices: list[int]) -> int:
        self._seen.update((split, int(i)) for i in indices)
        return len(self._seen)

    def count(self, split: str | None = None) -> int:
        """Distinct corrupt rows of ``split`` (every split's when None)."""
        if split is None:
            return len(self._seen)
        return sum(1 for s, _ in self._seen if s == split)

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


#: the names the rest of the code reads them by: a counter and a clock are the same actor class
CorruptCounter = EpochClock = RunLedger


#: the clock's key (see ``EpochClock.state``) -> sorted sample indices to leave out; per process (map tasks build their callable
#: per batch, so the cache must outlive it)
_SKIP_CACHE: dict[str, Any] = {"key": None, "skip": np.zeros(0, np.int64)}


def clock_view(clock: Any) -> tuple[int, np.ndarray]:
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
    """Create-or-get the named :class:`CorruptCounter`, without waiting for its process to start: Ray
    registers a named actor's name when it is created, so a lookup by name finds it at once and calls
    queue until it is up.

    A named actor that is not detached lives as long as a handle to it does: create it in the driver (as
    :func:`build_train_dataset` does), not in a short-lived worker, and keep the handle.
    """
    return CorruptCounter.options(
        name=name, get_if_exists=True, scheduling_strategy=on_this_node(), **RESTARTABLE
    ).remote()


def corrupt_count(name: str = DEFAULT_CORRUPT_COUNTER, split: str | None = None) -> int:
    """Distinct corrupt rows skipped so far under counter ``name`` (of ``split`` only, when given)."""
    return int(ray.get(get_corrupt_counter(name).count.remote(split)))


def get_epoch_clock(name: str) -> ray.actor.ActorHandle:
    """Create-or-get the named :class:`EpochClock` (``.set.remote(epoch)``, ``.get.remote()``), without
    waiting for its process (see :func:`get_corrupt_counter`)."""
    return EpochClock.options(
        name=name, get_if_exists=True, scheduling_strategy=on_this_node(), **RESTARTABLE
    ).remote()


def pin_ray_data_singletons(*, wait: bool = True) -> None:
    """Create Ray Data's two cluster-wide detached actors (its stats actor and its autoscaling
    coordinator) now, on this process's node.

    Ray Data creates them on first use, pinned to the node of whichever process builds the first dataset.
    In a sweep that is a trial driver on an autoscaled worker node, and a detached actor there keeps the
    node from ever counting as idle: the autoscaler never removes it (found by tests/test_autoscale_ray.py).
    Called by the sweep's driver, which runs on the head, before any trial starts; both creators are
    get-if-exists, so the trials reuse these. Private Ray Data functions: if a Ray upgrade moves them, the
    sweep goes on with Ray's default placement. ``bamray train`` calls it with ``wait=False`` right after
    Ray starts, so the two processes start while the driver creates the MLflow run, not in the first
    batch's wait."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError as err:  # pragma: no cover - depends on the Ray version
        print(f"WARNING: Ray Data's helper actors not pinned to this node ({err})", flush=True)
        return
    handles = (get_or_create_stats_actor(), get_or_create_autoscaling_coordinator())
    if wait:
        ray.get([h.__ray_ready__.remote() for h in handles])


@ray.remote(num_cpus=0)
class EmbedStats:
    """What the actors of a ``bamray embed`` job did: rows written, corrupt rows skipped (by split and
    index, counted once), and each actor's rows and peak resident memory, so a user sees that a data set
    larger than the actors' memory streamed through them."""

    def __init__(self) -> None:
        self._rows = 0
        self._corrupt: set[tuple[str, int]] = set()
        self._actors: dict[str, dict[str, float]] = {}

    def add(self, actor: str, rows: int, corrupt: list[tuple[str, int]], peak_rss_mb: float) -> None:
        self._rows += int(rows)
        self._corrupt.update((str(s), int(i)) for s, i in corrupt)
        a = self._actors.setdefault(actor, {"rows": 0, "peak_rss_mb": 0.0})
        a["rows"] += int(rows)
        a["peak_rss_mb"] = max(a["peak_rss_mb"], float(peak_rss_mb))

    def summary(self) -> dict[str, Any]:
        return {"rows": self._rows, "corrupt": len(self._corrupt), "actors": dict(self._actors)}


#: what a training-stream map task imports before its first batch: the augmentation (torch, but not
#: torchvision: :mod:`data.tv_kernels`; with Ray Data about 3.3 s of CPU in a new process here, 6.6 s when it
#: imported torchvision) and the callable it is shipped as
MAP_TASK_MODULES = ("data.batch_maps", "data.augment", "ray.data")


@ray.remote(num_cpus=0)
def _import_modules(modules: Sequence[str]) -> int:
    for name in modules:
        importlib.import_module(name)
    return os.getpid()


def warm_task_workers(
    count: int, modules: Sequence[str] = MAP_TASK_MODULES, runtime_env: dict[str, Any] | None = None
) -> list[Any]:
    """Start ``count`` tasks that import ``modules`` into Ray's pooled worker processes, and return their
    refs without waiting.

    Ray hands a task an idle pooled process of the same job and runtime environment, the most recently
    used first, and keeps it across tasks (an actor always gets a new process). The per-epoch stream's map
    tasks (``data.map_compute: tasks``) then find torch and the augmentation already imported, and their first
    batch no longer waits for a new process's imports, the last link of a run's start-up chain. The imports
    happen while Ray Train starts its controller and worker, on CPU that the chain leaves idle.
    ``runtime_env`` must be what the map tasks will run with (see
    :func:`orchestrator.training.warm_start.train_runtime_env`): a process started under another one is never
    handed to them. The tasks ask no CPU, so they never hold back the workers' placement."""
    task = _import_modules.options(runtime_env=runtime_env) if runtime_env else _import_modules
    return [task.remote(tuple(modules)) for _ in range(max(int(count), 0))]


@ray.remote(num_cpus=0)
def _warm_from_here(count: int, modules: Sequence[str], runtime_env: dict[str, Any]) -> list[int]:
    return ray.get(warm_task_workers(count, modules, runtime_env))


def warm_task_workers_for_a_worker(
    count: int, runtime_env: dict[str, Any], modules: Sequence[str] = MAP_TASK_MODULES
) -> Any:
    """:func:`warm_task_workers` for the tasks that a Ray Train worker submits itself (a one-worker run's
    map tasks, :mod:`orchestrator.training.shards`); a ref to the warmed processes' pids, not waited for.

    Ray matches a pooled process by its runtime environment *as serialised text*. A task submitted by a
    process that has a runtime environment of its own (a Train worker) inherits it in the form Ray's core
    writes when it merges two environments (compact JSON, ``{"env_vars":{...}}``), while a task that the
    driver, which has none, submits with the same environment carries Python's form (``{"env_vars":
    {...}}``, with spaces): equal environments, different text, never matched. So the warming tasks are
    submitted from a task that runs under ``runtime_env`` and give it again: Ray's core merges the two
    and writes the worker's form. ``runtime_env`` must be the worker's (see
    :func:`orchestrator.training.warm_start.train_runtime_env`)."""
    task = _warm_from_here.options(runtime_env=runtime_env)
    return task.remote(max(int(count), 0), tuple(modules), runtime_env)
