"""The one way bamray builds a Ray Train ``TorchTrainer`` (training runs, sweep trials, fine-tuning).

Four departures from a plain ``TorchTrainer(...)``:

* **no torch in the driver.** ``ray.train.torch`` imports torch (about 2.7 s of CPU here), and
  ``TorchTrainer.__init__`` imports it for its default config even when given one. Ray Train 2.60's
  ``TorchTrainer`` is its ``DataParallelTrainer`` plus a default torch backend and a torch controller for
  local mode (0 workers): :func:`trainer_class` is the same three things built torch-free, so the driver of
  a run (and a sweep's trial) hands Ray Train the run without importing torch, which only the workers
  use. Measured: the driver was blocked on that import for about a second before submitting the run, and
  its CPU competed with Ray's start and the controller's on 2 cores;
* the loopback DDP backend (:func:`orchestrator.training.loopback_ddp.torch_config`);
* **no placement-group cleaner on a Ray without a dashboard.** Ray Train 2.60 starts a detached
  ``PlacementGroupCleaner`` actor per run that asks the dashboard's State API once a second whether the
  Train controller is still alive, to remove the workers' placement group should the controller die
  while its job lives on. Without a dashboard (every local Ray that bamray starts) it cannot get an
  answer: it warned once a second for a whole run, and where two local Rays ran on one machine its
  look-up found both and raised. It is also one more process to boot before the first step (about 2.5 s
  of CPU here, while the controller starts the worker on the same 2 cores). Where it cannot work it is
  left out. The placement group is still removed: it belongs to the driver's job, which Ray cleans up
  when the driver ends (a `bamray train` ends when its controller does), and a sweep's trials have
  their own reaper (:mod:`orchestrator.reaper`).

* **no datasets callback where the caller says its workers need none** (``datasets_callback=False``).
  Ray Train's ``DatasetsCallback`` starts a ``DatasetManager`` actor for every worker group even when
  there is no dataset to hand out, a process booting beside the worker for nothing, and sets the
  driver's Ray Data context in the workers. A one-worker training run carries its datasets and that
  context in its plan (:mod:`orchestrator.training.shards`) and fine-tuning reads no Ray Data, so both
  leave it out; a multi-worker ``data.stream: run`` run without k-NN sets has no datasets either, but its
  workers build their streams under the driver's context, so it keeps the callback.

Leaving them out overrides ``TorchTrainer._create_default_callbacks``, private to Ray Train;
when a Ray upgrade renames it or the callbacks, the trainer keeps Ray's defaults and
``tests/test_local_ray.py`` fails. Importing this module imports nothing of Ray (the CLI refuses a bad
config before Ray is imported).
"""

from __future__ import annotations

import functools
from typing import Any


def dashboard_url() -> str | None:
    """The connected Ray cluster's dashboard URL (where its State API is served), None where it runs none.
    Ray registers the URL once the dashboard's HTTP server is up; a Ray started without a dashboard
    registers none (its address entry, which it writes anyway, points at a port nobody listens on)."""
    from ray._private.services import get_webui_url_from_internal_kv

    return get_webui_url_from_internal_kv() or None


@functools.cache
def trainer_class() -> type:
    """Ray Train's ``TorchTrainer`` as its ``DataParallelTrainer`` with a torch backend config (by default
    the loopback one; ``backend`` gloo, nccl where the workers have GPUs, as ``TorchTrainer`` sets it) and
    local mode's torch controller, without importing torch (see the module docstring). Where Ray Train v2
    is off, Ray's own ``TorchTrainer``."""
    from ray.train.v2._internal.constants import is_v2_enabled

    if not is_v2_enabled():  # pragma: no cover - Train v1 (RAY_TRAIN_V2_ENABLED=0)
        from ray.train.torch import TorchTrainer

        return TorchTrainer
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from orchestrator.training import loopback_ddp

    class BamrayTorchTrainer(DataParallelTrainer):  # type: ignore[misc, valid-type]
        """``TorchTrainer`` of Ray Train 2.60, torch-free where it is built."""

        def __init__(self, train_loop_per_worker: Any, *, torch_config: Any = None, **kwargs: Any) -> None:
            config = torch_config or loopback_ddp.torch_config()
            if not config.backend:
                scaling = kwargs.get("scaling_config")
                config.backend = "nccl" if scaling is not None and scaling.use_gpu else "gloo"
            super().__init__(train_loop_per_worker, backend_config=config, **kwargs)

        def _get_local_controller(self) -> Any:
            from ray.train.v2._internal.execution.local_mode.torch import LocalTorchController

            return LocalTorchController(experiment_name=self.run_config.name, datasets=self.datasets)

    return BamrayTorchTrainer


@functools.cache
def _lean_trainer(cleaner: bool, datasets_callback: bool) -> type | None:
    """:func:`trainer_class` without Ray Train's placement-group cleaner (unless ``cleaner``) and without
    its datasets callback (unless ``datasets_callback``); None where Ray moved what it needs."""
    TorchTrainer = trainer_class()

    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:  # pragma: no cover - depends on the Ray version
        return None
    if not hasattr(TorchTrainer, "_create_default_callbacks"):  # pragma: no cover - Ray version
        return None

    class LeanTorchTrainer(TorchTrainer):  # type: ignore[misc, valid-type]
        """Ray Train's defaults minus what the run cannot use (see the module's docstring)."""

        def _create_default_callbacks(self) -> list[Any]:
            return [c for c in super()._create_default_callbacks() if self._keeps(c)]

        def _keeps(self, callback: Any) -> bool:
            if isinstance(callback, PlacementGroupCleanerCallback):
                return cleaner
            return datasets_callback or not isinstance(callback, DatasetsCallback)

    return LeanTorchTrainer


def torch_trainer(train_fn: Any, *, datasets_callback: bool = True, **kwargs: Any) -> Any:
    """``TorchTrainer(train_fn, **kwargs)`` with the loopback DDP backend (unless ``torch_config`` is
    given) and without the placement-group cleaner where the cluster has no dashboard. Ray must be
    initialised.

    ``datasets_callback=False`` (only with no ``datasets``): also without Ray Train's datasets callback, for
    workers that take no Ray Data context from the driver through it (they read no Ray Data, or, as a
    one-worker run's, get the datasets and the context in their plan). Besides starting the
    ``DatasetManager`` it sets the driver's ``DataContext`` in every worker, which a worker that builds
    its own stream (``data.stream: run``) relies on."""
    from orchestrator.training import loopback_ddp

    if not datasets_callback and kwargs.get("datasets"):
        raise ValueError("a trainer given datasets needs Ray Train's datasets callback")
    kwargs.setdefault("torch_config", loopback_ddp.torch_config())
    cleaner = dashboard_url() is not None
    lean = None if cleaner and datasets_callback else _lean_trainer(cleaner, datasets_callback)
    return (lean or trainer_class())(train_fn, **kwargs)
