"""Warming the pooled processes that the per-epoch stream's map tasks are handed: a warmed process is
given to the next task of the same runtime environment with its imports done, ``train_runtime_env`` is the
environment a Ray Train worker's tasks really run under, and the driver warms only for the stream that
uses pooled tasks."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import load_config
from orchestrator.training import warm_start

#: a standard-library module that nothing in a fresh Ray worker imports, so finding it loaded is proof
#: that the process was the warmed one
PROBE_MODULE = "xml.dom.minidom"


def _probe() -> Any:
    """A task (defined here, shipped by value) that reports its process and whether the probe module
    was already imported there."""
    import ray

    @ray.remote(num_cpus=0)
    def probe(module: str) -> dict[str, Any]:
        import os
        import sys

        return {"pid": os.getpid(), "loaded": module in sys.modules}

    return probe


def test_a_warmed_process_is_handed_to_the_next_task_of_its_runtime_env_only(ray_local):
    from data.run_actors import warm_task_workers

    env = {"env_vars": {"BAMRAY_WARM_TEST": "1"}}
    warmed = set(ray_local.get(warm_task_workers(1, modules=(PROBE_MODULE,), runtime_env=env)))
    probe = _probe()
    same = ray_local.get(probe.options(runtime_env=env).remote(PROBE_MODULE))
    assert same["pid"] in warmed and same["loaded"], same
    other = ray_local.get(
        probe.options(runtime_env={"env_vars": {"BAMRAY_WARM_TEST": "2"}}).remote(PROBE_MODULE)
    )
    assert other["pid"] not in warmed and not other["loaded"], other
    assert warm_task_workers(0, modules=(PROBE_MODULE,), runtime_env=env) == []


def test_ray_datas_map_tasks_under_ray_train_land_in_the_process_warmed_with_train_runtime_env(ray_local):
    """The map tasks of a ``datasets=`` stream are started by Train's split coordinator, under the
    controller's runtime environment: ``train_runtime_env`` must be that one to the byte (Ray matches the
    serialised text), or the warmed process is never handed to them."""
    import ray.data
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from data.run_actors import warm_task_workers

    env = warm_start.train_runtime_env()
    assert env is not None and env["env_vars"], "Ray Train 2.60 propagates at least its own settings"
    warmed = set(ray_local.get(warm_task_workers(1, modules=(PROBE_MODULE,), runtime_env=env)))
    work = Path(tempfile.mkdtemp(prefix="w", dir="/tmp"))

    def report(batch: dict[str, Any]) -> dict[str, Any]:
        import os
        import sys

        import numpy as np

        n = len(batch["id"])
        return {"pid": np.full(n, os.getpid()), "loaded": np.full(n, PROBE_MODULE in sys.modules)}

    def loop(config: dict[str, Any]) -> None:
        import ray.train

        rows = [
            {"pid": int(p), "loaded": bool(w)}
            for b in ray.train.get_dataset_shard("train").iter_batches(batch_format="numpy")
            for p, w in zip(b["pid"], b["loaded"], strict=True)
        ]
        Path(config["dir"], "seen.json").write_text(json.dumps(rows))

    try:
        TorchTrainer(
            loop,
            train_loop_config={"dir": str(work)},
            datasets={"train": ray.data.range(4, override_num_blocks=1).map_batches(report, batch_size=None)},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(storage_path=str(work), name="warm"),
        ).fit()
        seen = json.loads((work / "seen.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert len(seen) == 4, seen
    assert all(row["pid"] in warmed and row["loaded"] for row in seen), (seen, warmed)


def test_map_tasks_that_a_train_worker_submits_land_in_the_process_warmed_for_a_worker(ray_local):
    """A one-worker run's worker runs its dataset's executions itself (``orchestrator.training.shards``):
    its map tasks inherit the worker's runtime environment, which Ray writes in another form than the
    driver's tasks carry, so ``warm_task_workers`` warms a process they are never handed and
    ``warm_task_workers_for_a_worker`` one that they are."""
    import ray.data
    from ray.train import RunConfig, ScalingConfig

    from data.run_actors import warm_task_workers, warm_task_workers_for_a_worker
    from orchestrator.training.trainer import torch_trainer

    env = warm_start.train_runtime_env()
    assert env is not None
    driver_form = set(ray_local.get(warm_task_workers(1, modules=(PROBE_MODULE,), runtime_env=env)))
    worker_form = set(ray_local.get(warm_task_workers_for_a_worker(1, env, modules=(PROBE_MODULE,))))
    assert driver_form and worker_form and not driver_form & worker_form
    work = Path(tempfile.mkdtemp(prefix="w", dir="/tmp"))

    def report(batch: dict[str, Any]) -> dict[str, Any]:
        import os
        import sys

        import numpy as np

        n = len(batch["id"])
        return {"pid": np.full(n, os.getpid()), "loaded": np.full(n, PROBE_MODULE in sys.modules)}

    def loop(config: dict[str, Any]) -> None:
        rows = [int(p) for b in config["ds"].iterator().iter_batches(batch_format="numpy") for p in b["pid"]]
        Path(config["dir"], "seen.json").write_text(json.dumps(rows))

    try:
        torch_trainer(
            loop,
            train_loop_config={
                "dir": str(work),
                "ds": ray.data.range(4, override_num_blocks=1).map_batches(report, batch_size=None),
            },
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(storage_path=str(work), name="warm"),
        ).fit()
        seen = set(json.loads((work / "seen.json").read_text()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert seen == worker_form, (seen, worker_form, driver_form)


@pytest.mark.parametrize(
    ("overrides", "warmed", "for_a_worker"),
    [
        ({}, 1, False),
        ({"data.map_workers": 2}, 2, False),
        ({"train.workers": 1}, 1, True),
        ({"data.stream": "run"}, 0, False),
        ({"data.map_compute": "actors"}, 0, False),
    ],
)
def test_the_driver_warms_one_process_per_map_worker_only_for_the_per_epoch_task_stream(
    monkeypatch: pytest.MonkeyPatch, overrides: dict[str, Any], warmed: int, for_a_worker: bool
) -> None:
    """Several workers: for the split coordinator's tasks; one worker: for the tasks it submits itself."""
    import data.run_actors

    calls: list[tuple[str, int, dict[str, Any] | None]] = []
    monkeypatch.setattr(
        data.run_actors,
        "warm_task_workers",
        lambda count, runtime_env=None: calls.append(("driver", count, runtime_env)),
    )
    monkeypatch.setattr(
        data.run_actors,
        "warm_task_workers_for_a_worker",
        lambda count, runtime_env: calls.append(("worker", count, runtime_env)),
    )
    cfg = load_config("bam_fmnist", [f"{k}={v}" for k, v in overrides.items()])
    assert cfg.train.workers == overrides.get("train.workers", 2)
    warm_start.warm_map_workers(cfg)
    kind = "worker" if for_a_worker else "driver"
    assert [(k, count) for k, count, _ in calls] == ([(kind, warmed)] if warmed else [])
    assert all(env == warm_start.train_runtime_env() for _, _, env in calls)
