"""Where a training worker's Ray Data iterators come from: Ray Train's ``get_dataset_shard``, or, in a
one-worker run, the datasets themselves, iterated in the worker's own process.

Why the one-worker path exists (``bench/``'s start-up section; ``README.md``, *Where the core goes*): a
dataset given to Ray Train as ``datasets=`` reaches the worker through two more processes that boot one
after the other once the worker has started. Ray Train 2.60's controller creates a ``DatasetManager``
actor after the worker group is up (a new process: about 3.3 s here, on 2 cores), and that actor creates
a ``SplitCoordinator`` per dataset when the worker first asks for its shard (another new process, 2.5 s),
which then runs the Ray Data execution and hands its blocks on. Timed from Ray's own logs in a 1-worker
`bamray train`: the worker ready at 16.7 s after launch, the first step at 28.1 s, 7 s of it in that
chain. With one worker there is nothing to split, so the plan carries the datasets and the worker runs
each execution itself (``Dataset.iterator()``, what Ray Train gives a worker for a dataset it does not
split): the same rows, their views seeded by ``(seed, epoch, index)`` as everywhere (the order of the
blocks is Ray Data's, unordered on either path). The trainer then leaves out Ray Train's datasets
callback, whose ``DatasetManager`` would otherwise boot for nothing, and the plan carries the driver's Ray
Data context, which that callback would have set in the worker
(:func:`orchestrator.training.trainer.torch_trainer`).

Several workers keep Ray Train's path: the split coordinator is what deals one execution's blocks to the
ranks in equal shares, and Ray Train builds a new one for every worker group, which is what a group that
restarts after a failure needs (a coordinator that outlived its group would count the dead ranks' calls
at its epoch barrier).
"""

from __future__ import annotations

from typing import Any


def in_worker(workers: int) -> bool:
    """Whether a run of ``workers`` Ray Train workers has its workers iterate the datasets themselves."""
    return workers == 1


class Shards:
    """One worker's iterators by dataset name (``train``, ``knn_train``, ``knn_val``).

    ``datasets`` None: Ray Train's ``get_dataset_shard`` (the datasets were given to the trainer). Else the
    worker's own iterators over them, one per name, kept like Ray Train keeps its shards; ``data_context``
    (the driver's Ray Data context) becomes this process's, as Ray Train's datasets callback does for its
    workers."""

    def __init__(self, datasets: dict[str, Any] | None, data_context: Any = None) -> None:
        self.datasets = datasets
        self._iterators: dict[str, Any] = {}
        if datasets is not None and data_context is not None:
            from ray.data import DataContext

            DataContext._set_current(data_context)

    def __call__(self, name: str) -> Any:
        if self.datasets is None:
            import ray.train

            return ray.train.get_dataset_shard(name)
        if name not in self._iterators:
            if name not in self.datasets:
                raise KeyError(f"no dataset {name!r} in this run (it has {sorted(self.datasets)})")
            self._iterators[name] = self.datasets[name].iterator()
        return self._iterators[name]
