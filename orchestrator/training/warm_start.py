"""Warm Ray's pooled worker processes before a run's first map task needs one.

Ray hands a task an idle pooled process of the same job and the same runtime environment (matched as
serialised text), the most recently used first, and keeps it across tasks; an actor always gets a new
process. The per-epoch stream's map tasks are started by Ray Train's split coordinator under the
controller's runtime environment (in a one-worker run by the worker itself, under the same environment
written in another form, :func:`data.run_actors.warm_task_workers_for_a_worker`), so a process warmed
under exactly that environment while Train starts is the one the first map task is handed, with torch and
torchvision already imported. Torch-free, like the rest of what the driver imports before Ray Train takes
the run (``tests/test_imports.py``).
"""

from __future__ import annotations

from typing import Any

from orchestrator.config import ExperimentConfig


def train_runtime_env() -> dict[str, Any] | None:
    """The runtime environment Ray Train 2.60 gives its controller, and through it the split coordinator
    of ``datasets=`` and the Ray Data map tasks that it starts: the job's own plus the environment
    variables Train propagates from the driver. Built as Train builds it, so that it serialises to the
    same text (a Train worker's own tasks are serialised otherwise and are not matched). Private to Ray
    Train (``TrainController``'s options); None when a Ray upgrade moved it."""
    try:
        from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR as WARN
        from ray.train.v2._internal.constants import (
            DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
            get_env_vars_to_propagate,
        )
    except ImportError:  # pragma: no cover - depends on the Ray version
        return None
    env_vars = get_env_vars_to_propagate()
    env_vars.setdefault(WARN, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
    return {"env_vars": env_vars}


def warm_map_workers(cfg: ExperimentConfig) -> None:
    """Pre-import the augmentation in the pooled processes that the per-epoch stream's map tasks will be
    handed (:func:`data.run_actors.warm_task_workers`, or ``warm_task_workers_for_a_worker`` where the one
    worker submits them, one per ``data.map_workers``; no CPU asked, no wait). The one-execution stream
    and an actor pool start their own processes: nothing is warmed."""
    env = train_runtime_env()
    if env is None or cfg.data.stream != "epoch" or cfg.data.map_compute != "tasks":
        return
    from data.run_actors import warm_task_workers, warm_task_workers_for_a_worker
    from orchestrator.training.shards import in_worker

    if in_worker(cfg.train.workers):  # the worker submits the map tasks: they inherit its environment
        warm_task_workers_for_a_worker(cfg.data.map_workers, env)
    else:  # the split coordinator does, under the controller's
        warm_task_workers(cfg.data.map_workers, runtime_env=env)
