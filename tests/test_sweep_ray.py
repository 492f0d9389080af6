"""Sweeps: real Ray Tune around real Ray Train runs on real Fashion-MNIST images, real MLflow (SQLite in
tmp_path). ASHA must stop the clearly bad trials, the MLflow lineage (parent + children, statuses,
best config, results artifacts) must be complete, and an interrupted sweep must resume without rerunning
its finished trial. The first tests need no cluster (argument checks, classification, searchers)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from pathlib import Path

import pytest
import yaml

import orchestrator.sweep
from orchestrator.config import load_config
from orchestrator.fault_injection import INTERRUPT_SWEEP_ENV as INTERRUPT_ENV
from orchestrator.metric_names import mlflow_key
from orchestrator.sweep import report, run_sweep, tune_setup
from orchestrator.sweep.lineage import TAG_RAY_RUN_PREFIX, trial_outcome
from orchestrator.sweep.settings import METRIC, MODE, SweepSettings
from orchestrator.sweep.settings import sweep_space as load_space
from trainers.options import ConfigError

GOOD_LR, BAD_LRS = 2e-3, (10.0, 8.0)  # optim.lr allows (0, 10]
EPOCHS = 2


# ================================================================================================ no cluster
def tiny_cfg(data_path: str = "", epochs: int = EPOCHS, *extra: str):
    """BAM on 200 images: batch 32, 1 worker with half a CPU (2 trials + Ray Data fit in 4 logical CPUs)."""
    overrides = [
        "optim.batch_size=32",
        "train.workers=1",
        "train.cpus_per_worker=0.5",
        "data.map_cpus=0.5",
        "method.top_k_sink=0",
        f"optim.epochs={epochs}",
        "method.proj_hidden_dim=128",
        "method.proj_out_dim=64",
        "data.local_crops=2",
        "optim.warmup_epochs=0",
        "train.max_failures=2",
        "tracking.experiment=sweep-test",
        "eval.knn_k=10",
        "eval.embedding_map=pca",
        "method.teacher=false",
        "model.backbone=vit_tiny_patch16_224",
        "model.patch_size=4",
        "model.backbone_kwargs={depth: 2}",
        *extra,
    ]
    if data_path:
        overrides.append(f"data.path={data_path}")
    return load_config("bam_fmnist", overrides)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"search": "optuna"}, "--search"),  # PBT picks the next params itself
        ({"perturbation_interval": EPOCHS}, "--perturbation-interval"),  # no epoch left to continue after it
        ({"perturbation_interval": 0}, "--perturbation-interval"),
        ({"quantile_fraction": 0.0}, "--quantile-fraction"),
        ({"quantile_fraction": 0.75}, "--quantile-fraction"),
    ],
)
def test_bad_pbt_arguments_are_config_errors(kwargs, field):
    with pytest.raises(ConfigError) as err:
        run_sweep(tiny_cfg(), "bam_sinkhorn", trials=2, scheduler="pbt", **kwargs)
    assert err.value.field == field


@pytest.mark.parametrize(
    "key, spec",
    [
        ("method.proj_out_dim", {"type": "choice", "values": [32, 64]}),  # weights change shape
        (
            "data.global_crop_size",
            {"type": "choice", "values": [16, 28]},
        ),  # the data a checkpoint was trained on
    ],
)
def test_pbt_refuses_params_that_break_weight_cloning(key, spec):
    with pytest.raises(ConfigError) as err:
        run_sweep(tiny_cfg(), {"name": "x", "params": {key: spec}}, trials=2, scheduler="pbt")
    assert err.value.field == f"space.{key}" and "cannot perturb" in str(err.value)


def test_pbt_interval_must_land_on_checkpoints():
    with pytest.raises(ConfigError) as err:
        run_sweep(
            tiny_cfg("", 4, "train.checkpoint_freq=2"),
            "bam_sinkhorn",
            trials=2,
            scheduler="pbt",
            perturbation_interval=1,
        )
    assert err.value.field == "--perturbation-interval" and "checkpoint_freq=2" in str(err.value)


def test_pbt_mutations_and_explore_stay_in_the_space():
    space = load_space(
        {
            "name": "m",
            "params": {
                "method.reg": {"type": "loguniform", "low": 0.02, "high": 0.2},
                "method.num_sink_iter": {"type": "choice", "values": [1, 3, 5]},
                "optim.lr": {"type": "grid", "values": [1e-3, 2e-3]},
            },
        },
        tiny_cfg(),
    )
    mutations = tune_setup.pbt_mutations(space)
    assert mutations["method.num_sink_iter"] == [1, 3, 5] and mutations["optim.lr"] == [1e-3, 2e-3]
    assert 0.02 <= mutations["method.reg"].sample() <= 0.2  # a Tune domain PBT resamples from
    explore = tune_setup.pbt_explore(space)
    assert explore({"method.reg": 0.2 * 1.2, "method.num_sink_iter": 5, "optim.lr": 2e-3}) == {
        "method.reg": 0.2,
        "method.num_sink_iter": 5,
        "optim.lr": 2e-3,
    }  # x1.2 past the top is clipped
    assert explore({"method.reg": 0.02 * 0.8})["method.reg"] == 0.02
    assert explore({"method.reg": 0.05})["method.reg"] == 0.05


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"search": "bayes"}, "--search"),
        ({"scheduler": "hyperband"}, "--scheduler"),
        ({"trials": 0}, "--trials"),
        ({"max_concurrent": 0}, "--max-concurrent"),
        ({"reduction_factor": 1.0}, "--reduction-factor"),
    ],
)
def test_bad_sweep_arguments_are_config_errors(kwargs, field):
    with pytest.raises(ConfigError) as err:
        run_sweep(tiny_cfg(), "bam_sinkhorn", **kwargs)
    assert err.value.field == field


def test_workers_per_trial_revalidates_the_space():
    """top_k_sink=128 is fine at 2 workers x 32 x 2 targets = 128 targets but not at 1 worker (64): the
    space (no clip rule here) is checked against the config with the sweep's worker count."""
    space = {"name": "k", "params": {"method.top_k_sink": {"type": "choice", "values": [0, 128]}}}
    cfg = tiny_cfg("", EPOCHS, "train.workers=2")
    load_space(space, cfg)
    with pytest.raises(ConfigError, match=r"\[0, 64\]"):
        run_sweep(cfg, space, trials=1, workers_per_trial=1)


@pytest.mark.parametrize(
    "extra, kwargs, space, field",
    [
        (["train.workers=0"], {}, "bam_sinkhorn", "train.workers"),
        ([], {"workers_per_trial": 0}, "bam_sinkhorn", "--workers-per-trial"),
        (
            [],
            {},
            {"name": "w", "params": {"train.workers": {"type": "choice", "values": [0, 1]}}},
            "space.train.workers",
        ),
    ],
)
def test_trials_without_train_workers_are_refused_before_ray(extra, kwargs, space, field):
    """With 0 workers Ray Train runs the loop in the trial's own process, where Ray Tune refuses Ray Train's
    API: every trial used to fail after Ray had started. Now it is a config error naming the field."""
    import ray

    with pytest.raises(ConfigError) as err:
        run_sweep(tiny_cfg("", EPOCHS, *extra), space, trials=1, **kwargs)
    assert err.value.field == field and "[1, 1024]" in str(err.value)
    assert not ray.is_initialized()


def test_a_time_budget_is_refused_in_a_sweep_before_ray():
    """Trials are compared at equal epochs; a budget would let each trial pick its own length."""
    import ray

    with pytest.raises(ConfigError) as err:
        run_sweep(tiny_cfg("", EPOCHS, "train.time_budget_min=5"), "bam_sinkhorn", trials=1)
    assert err.value.field == "train.time_budget_min" and not ray.is_initialized()


def test_a_trial_that_cannot_fit_is_refused_before_ray_and_before_the_parent_run(tiny_data, tmp_path):
    """100 workers on this machine: refused by the preflight naming train.workers, no Ray, no MLflow run."""
    import os

    import ray

    if ray.is_initialized():
        pytest.skip("a Ray of another test is up in this process: the check then reads its resources")
    workers = 2 * (os.cpu_count() or 1) + 1
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ConfigError) as err:
        run_sweep(
            tiny_cfg(tiny_data, EPOCHS, f"train.workers={workers}"),
            "bam_sinkhorn",
            trials=1,
            tracking_uri=uri,
            storage_path=str(tmp_path / "ray_results"),
        )
    assert err.value.field == "train.workers" and "CPUs" in str(err.value)
    assert not ray.is_initialized()
    assert not (tmp_path / "ray_results" / "bam-fmnist-bam_sinkhorn").exists()
    if (tmp_path / "mlflow.db").exists():
        client = _mlflow(uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        assert not experiments or list(client.search_runs(experiments)) == []


@pytest.mark.parametrize(
    "status, epochs, target, outcome",
    [
        ("TERMINATED", 3, 3, "completed"),
        ("TERMINATED", 1, 3, "stopped_early"),
        ("ERROR", 1, 3, "failed"),
        ("ERROR", 3, 3, "failed"),
        ("RUNNING", 2, 3, "unfinished"),
        ("PENDING", 0, 3, "unfinished"),
    ],
)
def test_trial_outcome(status, epochs, target, outcome):
    assert trial_outcome(status, {"epoch": epochs}, target) == outcome


def test_grid_repeats_reach_the_requested_trials():
    space = load_space(
        {
            "name": "g",
            "params": {
                "seed": {"type": "grid", "values": [0, 1]},
                "method.reg": {"type": "loguniform", "low": 0.01, "high": 0.3},
            },
        },
        tiny_cfg(),
    )
    assert tune_setup.num_samples(space, 4, "random") == 2  # 2 repeats of a 2-point grid
    assert tune_setup.num_samples(space, 5, "random") == 3
    assert tune_setup.num_samples(space, 1, "grid") == 1
    assert tune_setup.num_samples(space, 5, "optuna") == 5  # no grid for Optuna: grid params are categorical
    settings = SweepSettings(name="x", trials=4, search="random")
    assert tune_setup.expected_trials(space, settings) == 4
    settings = dataclasses.replace(settings, trials=3)  # rounds up to whole passes over the grid
    assert tune_setup.expected_trials(space, settings) == 4


def test_optuna_searcher_suggests_inside_the_space():
    """The optuna path: Ray's OptunaSearch (with optuna 5) converts our Tune domains and samples them."""
    settings = SweepSettings(name="x", trials=3, search="optuna", seed=0)
    searcher = tune_setup.search_alg(settings)
    space = load_space("bam_sinkhorn", tiny_cfg())
    assert searcher.set_search_properties("knn_top1", "max", space.to_tune("optuna"))
    for i in range(3):
        cfg = searcher.suggest(f"t{i}")
        assert 0.01 <= cfg["method.reg"] <= 0.3 and 0.03 <= cfg["method.temperature"] <= 0.5
        assert cfg["method.num_sink_iter"] in (1, 2, 3, 5, 10) and cfg["method.top_k_sink"] in (0, 32, 64)


def test_results_table_and_best():
    rows = [
        {
            "trial_id": "a",
            "status": "completed",
            "epochs": 3,
            "knn_top1": 60.0,
            "metric": 60.0,
            "rankme": None,
            "stop_reason": None,
            "params": {"optim.lr": 0.002},
            "mlflow_run_id": "r1",
        },
        {
            "trial_id": "b",
            "status": "stopped_early",
            "epochs": 1,
            "knn_top1": 70.0,
            "metric": 70.0,
            "rankme": None,
            "stop_reason": None,
            "params": {"optim.lr": 10.0},
            "mlflow_run_id": "r2",
        },
        {
            "trial_id": "c",
            "status": "failed",
            "epochs": 0,
            "knn_top1": None,
            "metric": None,
            "rankme": None,
            "stop_reason": None,
            "params": {"optim.lr": 1.0},
            "mlflow_run_id": None,
        },
    ]
    # a stopped trial's early score is not comparable with a finished one: the completed trial wins
    assert report.best_row(rows)["trial_id"] == "a"
    assert report.best_row(rows, "min")["trial_id"] == "a"  # completed trials first, whatever the mode
    table = list(csv.reader(io.StringIO(report.results_csv(rows, ["optim.lr"]))))
    assert table[0] == [
        "trial_id",
        "status",
        "epochs",
        "knn_top1",
        "rankme",
        "optim.lr",
        "stop_reason",
        "mlflow_run_id",
    ]
    assert [r[0] for r in table[1:]] == ["a", "b", "c"] and table[3][3] == ""
    md = report.results_markdown(rows, ["optim.lr"]).splitlines()
    assert md[0].startswith("| trial | status") and "| b | stopped_early | 1 | 70.00 | 10 |" in md


def test_cli_registers_sweep_with_a_handler():
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    orchestrator.sweep.add_sweep_parser(sub)
    args = parser.parse_args(
        [
            "sweep",
            "--config",
            "bam_fmnist",
            "--space",
            "bam_sinkhorn",
            "--trials",
            "3",
            "--scheduler",
            "fifo",
            "--search",
            "grid",
            "--set",
            "optim.lr=1e-3",
        ]
    )
    assert args.func is orchestrator.sweep.cmd_sweep and args.trials == 3 and args.search == "grid"
    assert args.set == ["optim.lr=1e-3"]


@pytest.mark.parametrize(
    "grace, rf, max_t",
    [(1, 2, 2), (1, 2, 8), (1, 2, 9), (2, 3, 20), (1, 4, 64), (3, 2, 3), (1, 1.5, 10), (1, 1.1, 6)],
)
def test_asha_rungs_are_where_the_scheduler_decides(grace, rf, max_t):
    """The workers wait for Tune's decision at these epochs: they must be exactly the epochs where the ASHA
    that :func:`tune_setup.scheduler` builds judges a trial (its last one, ``max_t``, ends the run anyway). Asked of
    the scheduler itself: one fresh trial per epoch count, reporting that many epochs."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    settings = SweepSettings(name="x", trials=1, scheduler="asha", grace_period=grace, reduction_factor=rf)
    decided = []
    for epoch in range(1, max_t):
        asha = tune_setup.scheduler(settings, max_t)
        asha.set_search_properties(METRIC, MODE)  # as Tuner(metric=, mode=) does
        trials = [Trial("t", stub=True, trial_id=f"t{i}") for i in range(2)]
        for t in trials:
            asha.on_trial_add(None, t)
        # t0 scores 100 at every epoch; t1 scores 0 only at `epoch`: stopped there iff a rung is there
        for e in range(1, epoch + 1):
            asha.on_trial_result(None, trials[0], {"epoch": e, "knn_top1": 100.0})
        stops = [
            asha.on_trial_result(None, trials[1], {"epoch": e, "knn_top1": 100.0 if e < epoch else 0.0})
            for e in range(1, epoch + 1)
        ]
        if stops[-1] == TrialScheduler.STOP:
            decided.append(epoch)
    assert tune_setup.asha_rungs(grace, rf, max_t) == decided
    assert tune_setup.asha_rungs(1, 2, 8) == [1, 2, 4] and tune_setup.asha_rungs(1, 1.5, 6) == [
        1,
        2,
        3,
        4,
    ]  # by hand


# ================================================================================================ real Ray
def _live_placement_groups() -> list[str]:
    from ray.util.placement_group import placement_group_table

    return [k for k, v in placement_group_table().items() if v["state"] != "REMOVED"]


@pytest.mark.ray
def test_reaper_removes_a_dead_owners_placement_group_and_keeps_a_live_ones(ray_local):
    """Tune kills a stopped trial's actor, which takes its Train controller down but not the worker
    placement group (Train's own cleaner needs the dashboard). The reaper must remove the group of the
    dead owner, and only that one."""
    import time

    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from orchestrator.reaper import start_reaper

    @ray.remote(num_cpus=0)
    class Owner:
        def hello(self) -> int:
            return 1

    doomed, alive = Owner.remote(), Owner.remote()
    pg_doomed, pg_alive = placement_group([{"CPU": 0.5}]), placement_group([{"CPU": 0.5}])
    ray.get([pg_doomed.ready(), pg_alive.ready(), doomed.hello.remote(), alive.hello.remote()])
    reaper = start_reaper(interval_s=0.2)
    ray.get([reaper.register.remote(doomed, pg_doomed), reaper.register.remote(alive, pg_alive)])
    time.sleep(1.0)  # several rounds with both owners alive: nothing is touched
    assert placement_group_table(pg_doomed)["state"] == "CREATED"
    ray.kill(doomed)
    deadline = time.monotonic() + 20
    while placement_group_table(pg_doomed)["state"] != "REMOVED" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert placement_group_table(pg_doomed)["state"] == "REMOVED"
    assert placement_group_table(pg_alive)["state"] == "CREATED"
    assert ray.get(reaper.removed.remote()) == [pg_doomed.id.hex()]
    assert ray.get(reaper.settle.remote(timeout_s=1.0)) == 1  # the live owner is still watched
    remove_placement_group(pg_alive)
    ray.kill(reaper)
    ray.kill(alive)


@pytest.mark.ray
def test_epoch_gate_holds_until_released_through_the_epoch(ray_local):
    """A worker waiting at epoch 2 stays blocked while the driver has only released epoch 1, goes on once
    epoch 3 is released (release opens every epoch up to it), and a later wait at an open epoch is free.
    When the gate's owner dies (Tune stopped the trial), the waiting worker gets an error, not a hang."""
    import ray

    from orchestrator.epoch_gate import EpochGate

    gate = EpochGate.remote()
    waiting = gate.wait.remote(2)
    ray.get(gate.release.remote(1))
    ready, _ = ray.wait([waiting], timeout=0.5)
    assert ready == []
    assert ray.get(gate.release.remote(3)) == 3
    assert ray.get(waiting, timeout=10) == 3
    assert ray.get(gate.wait.remote(1), timeout=10) == 3
    assert ray.get(gate.release.remote(2)) == 3  # a late or repeated release never closes an epoch

    blocked = gate.wait.remote(4)
    ray.kill(gate)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(blocked, timeout=20)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> str:
    from data.sources import prepare_fashion_mnist

    out = tmp_path_factory.mktemp("fmnist") / "shards"
    prepare_fashion_mnist(out, limit=200)
    return str(out)


def _mlflow(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())


def _tune_trial_state(exp: Path, trial_id: str) -> dict:
    """A trial's status and last result from Tune's own experiment state (what Tuner.restore reads)."""
    from ray.tune import ExperimentAnalysis

    [trial] = [t for t in ExperimentAnalysis(str(exp)).trials if t.trial_id == trial_id]
    return {"status": trial.status, "last_result": dict(trial.last_result)}


def _history(client, run_id: str, key: str) -> list:
    """A metric's points in step order (MLflow does not promise any order)."""
    return sorted(client.get_metric_history(run_id, mlflow_key(key)), key=lambda m: (m.step, m.timestamp))


def _children(client, parent) -> dict:
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    return {r.data.tags["bamray.trial_id"]: r for r in runs}


@pytest.mark.ray
@pytest.mark.slow
def test_asha_sweep_stops_bad_trials_and_records_lineage(ray_local, tiny_data, tmp_path):
    """3 trials, one at a time, 2 epochs: the good lr first, then lr = 10, 8. ASHA's only rung (epoch 1,
    keep the top half) compares each arrival with the median of the k-NN values already there, so the
    lr=10 trial (recorded: good, itself) is certainly stopped; the lr=8 one is stopped unless it beats
    lr=10, which the test allows (it checks each trial's epochs against its status).

    Why one at a time and a single good trial: with 2 good seeds run 2 at a time, the second good trial to
    reach the rung is stopped whenever it lands below the first (CI saw exactly that). Only "the first
    arrival is good, the next one clearly bad" is deterministic.

    Why lr=10 and no teacher: measured on these 200 images (k-NN top-1 after epoch 1, init 43.5 %), AdamW
    steps of ~1.25 wreck the student's features (17.5 % vs 41.5 % at lr 2e-3), while a TINY lr is no worse
    than random init (42-44 %), and with BAM's EMA teacher (the evaluated network, momentum 0.995) six steps
    barely move the evaluated weights (40.0 vs 42.5 %): neither would make the ordering certain."""
    space_file = tmp_path / "lr.yaml"
    space_file.write_text(
        yaml.safe_dump(
            {
                "name": "lr_good_bad",
                "description": "a good and two destructive learning rates",
                "params": {"optim.lr": {"type": "grid", "values": [GOOD_LR, *BAD_LRS]}},
            },
            sort_keys=False,
        )
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_sweep(
        tiny_cfg(tiny_data),
        str(space_file),
        trials=3,
        scheduler="asha",
        search="random",
        max_concurrent=1,
        storage_path=str(tmp_path / "ray"),
        name="asha-test",
        tracking_uri=uri,
        grace_period=1,
        reduction_factor=2,
        seed=0,
        collapse_threshold=0.0,  # the lr=8 / 10 trials' wrecked features must be judged by ASHA alone here
    )

    rows = {r["trial_id"]: r for r in out["trials"]}
    assert len(rows) == 3 and not out["interrupted"]
    by_lr = {r["params"]["optim.lr"]: r for r in rows.values()}
    assert sorted(by_lr) == sorted([GOOD_LR, *BAD_LRS]), out["trials"]
    assert by_lr[GOOD_LR]["status"] == "completed" and by_lr[GOOD_LR]["epochs"] == EPOCHS, out["trials"]
    assert by_lr[BAD_LRS[0]]["status"] == "stopped_early" and by_lr[BAD_LRS[0]]["epochs"] == 1, out["trials"]
    for r in rows.values():  # each later bad trial either stopped at the rung or ran to the end
        assert (r["status"], r["epochs"]) in {("completed", EPOCHS), ("stopped_early", 1)}, r
    stopped = sum(r["status"] == "stopped_early" for r in rows.values())
    assert out["total_trial_epochs"] == sum(r["epochs"] for r in rows.values()) == 3 * EPOCHS - stopped
    assert out["best_config"]["optim.lr"] == GOOD_LR
    assert out["best_metric"] == by_lr[GOOD_LR]["knn_top1"]
    assert all(0.0 <= r["knn_top1"] <= 100.0 for r in rows.values())

    client = _mlflow(uri)
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED"
    p = parent.data.params
    assert (p["space"], p["scheduler"], p["search"], p["trials"]) == ("lr_good_bad", "asha", "random", "3")
    assert float(p["best.optim.lr"]) == GOOD_LR
    assert parent.data.metrics["eval/best_knn_top1"] == pytest.approx(out["best_metric"])
    assert parent.data.metrics["trials_stopped_early"] == stopped
    assert parent.data.metrics["total_trial_epochs"] == 3 * EPOCHS - stopped
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "results.md", "knn_vs_params.png", "space.yaml", "base_config.yaml"} <= artifacts
    assert "parallel_coordinates.png" in artifacts
    local = Path(client.download_artifacts(parent.info.run_id, "results.csv", str(tmp_path / "dl")))
    table = list(csv.DictReader(local.open()))
    assert sorted(r["trial_id"] for r in table) == sorted(rows)
    from PIL import Image

    png = Image.open(client.download_artifacts(parent.info.run_id, "knn_vs_params.png", str(tmp_path / "dl")))
    assert png.size[0] >= 400 and png.size[1] >= 200

    children = _children(client, parent)
    assert set(children) == set(rows)
    for trial_id, run in children.items():
        row = rows[trial_id]
        assert float(run.data.params["optim.lr"]) == row["params"]["optim.lr"]
        assert run.data.tags["bamray.sweep"] == "asha-test"
        assert not [k for k in run.data.params if k.startswith("debug.")]  # fault injection is no run param
        knn = _history(client, run.info.run_id, "knn_top1")
        if row["status"] == "completed":
            assert run.info.status == "FINISHED" and run.data.tags["bamray.trial_status"] == "completed"
            assert len(knn) == EPOCHS  # one point per epoch, curves written by the rank-0 worker
            assert knn[-1].value == pytest.approx(row["knn_top1"])
            assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"final", "config.yaml"}
            # each trial's pictures, one per evaluation epoch (the rank-0 worker logs them by step)
            images = [
                a.path for a in client.list_artifacts(run.info.run_id, "images") if a.path.endswith(".png")
            ]
            assert sum("/embedding_map+step+" in p for p in images) == EPOCHS, images
        else:
            assert run.info.status == "KILLED" and run.data.tags["bamray.trial_status"] == "stopped_early"
            # the workers waited at the rung for Tune's decision: nothing past epoch 1 was trained or logged
            assert len(knn) == 1
            assert max(m.step for m in _history(client, run.info.run_id, "loss")) == knn[0].step
    # each trial's Ray Train run lives beside the Tune experiment, named after the trial
    train_dirs = sorted(p.name for p in (tmp_path / "ray" / "asha-test").glob("train-*"))
    assert train_dirs == sorted(f"train-{t}" for t in rows)
    # the stopped trials' Train runs gave their CPUs back (their worker placement groups were leaked before
    # orchestrator.reaper, and the next sweep on this cluster waited for them forever)
    assert _live_placement_groups() == []


@pytest.mark.ray
@pytest.mark.slow
def test_pbt_clones_the_better_trial_into_the_worse_one(ray_local, tiny_data, tmp_path):
    """2 trials (good lr, lr=10) side by side, 3 epochs, synchronous PBT every 2 epochs: at epoch 2 the
    worse trial must continue from a copy of the better trial's epoch-2 checkpoint (a new Train run whose
    workers load it), the better one from its own; both finish all 3 epochs, each in its own MLflow run."""
    space = {"name": "lr_pbt", "params": {"optim.lr": {"type": "grid", "values": [GOOD_LR, BAD_LRS[0]]}}}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_sweep(
        tiny_cfg(tiny_data, 3),
        space,
        trials=2,
        scheduler="pbt",
        search="random",
        max_concurrent=2,
        storage_path=str(tmp_path / "ray"),
        name="pbt-test",
        tracking_uri=uri,
        perturbation_interval=2,
        quantile_fraction=0.5,
        seed=0,
        collapse_threshold=0.0,  # lr=10 wrecks the features (they may read as collapsed): cloning is tested here
    )
    rows = {r["trial_id"]: r for r in out["trials"]}
    assert len(rows) == 2 and not out["interrupted"]
    assert all(r["status"] == "completed" and r["epochs"] == 3 for r in rows.values()), out["trials"]
    assert out["total_trial_epochs"] == 6

    client = _mlflow(uri)
    parent = client.get_run(out["parent_run_id"])
    assert parent.data.params["scheduler"] == "pbt" and parent.data.params["perturbation_interval"] == "2"
    children = _children(client, parent)
    assert set(children) == set(rows)
    starts = {}  # trial -> [(from_epoch, trial whose checkpoint it started from)]
    for trial_id, run in children.items():
        assert run.info.status == "FINISHED"
        runs = [json.loads(v) for k, v in run.data.tags.items() if k.startswith(TAG_RAY_RUN_PREFIX)]
        starts[trial_id] = sorted((r["from_epoch"], _donor(r["init_checkpoint"], rows)) for r in runs)
        knn = _history(client, run.info.run_id, "knn_top1")
        assert len(knn) == 3  # one point per epoch, none repeated across the restart
        assert knn[-1].value == pytest.approx(rows[trial_id]["knn_top1"])
    # who started with which lr: the child runs' params (written once, at the start). The results table
    # holds each trial's LAST params, and an exploited trial's lr is the donor's, explored (for a grid
    # param: the same value, its neighbour, or a resample), so it may equal the good trial's.
    by_lr = {float(run.data.params["optim.lr"]): trial_id for trial_id, run in children.items()}
    good, bad = by_lr[GOOD_LR], by_lr[BAD_LRS[0]]
    assert starts[good] == [(0, None), (2, good)], starts  # paused at the sync point, resumed from its own
    assert starts[bad] == [(0, None), (2, good)], starts  # exploited: the good trial's weights
    lr_curve = _history(client, children[bad].info.run_id, "param.optim.lr")
    assert sorted(m.step for m in lr_curve) == [0, 2]  # the params it ran with, from each start epoch
    by_step = {m.step: m.value for m in lr_curve}
    assert by_step[0] == BAD_LRS[0] and by_step[2] in (GOOD_LR, BAD_LRS[0])  # the space's grid values only
    assert rows[bad]["params"]["optim.lr"] == pytest.approx(by_step[2])
    assert (tmp_path / "ray" / "pbt-test" / "pbt_global.txt").exists()  # Tune's own record of the exploit


def _donor(path: str | None, rows: dict) -> str | None:
    """The trial whose Tune checkpoint directory ``path`` is (Tune's ``trial_<id>/checkpoint_*``)."""
    if path is None:
        return None
    [trial_id] = [t for t in rows if f"trial_{t}" in Path(path).parts]
    return trial_id


@pytest.mark.ray
@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(
    ray_local, tiny_data, tmp_path, monkeypatch
):
    """The test hook interrupts the sweep (SIGUSR1, Tune's Ctrl-C path) once one trial has ended; resume
    runs the other one and leaves the finished one alone: same Tune results, same MLflow curve length,
    one child run per trial."""
    space = {"name": "seeds", "params": {"seed": {"type": "grid", "values": [0, 1]}}}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = str(tmp_path / "ray")
    cfg = tiny_cfg(tiny_data, 2)
    monkeypatch.setenv(INTERRUPT_ENV, "1")
    first = run_sweep(
        cfg,
        space,
        trials=2,
        scheduler="fifo",
        search="random",
        max_concurrent=1,
        storage_path=storage,
        name="resume-test",
        tracking_uri=uri,
    )
    assert first["interrupted"]
    done = [r for r in first["trials"] if r["status"] == "completed"]
    assert len(done) == 1, first["trials"]
    finished_id = done[0]["trial_id"]
    exp = Path(storage) / "resume-test"
    # the finished trial's Ray Train run: one checkpoint per epoch (names carry their creation time)
    ckpts = _checkpoints(exp / f"train-{finished_id}")
    assert len(ckpts) == 2
    state_before = _tune_trial_state(exp, finished_id)
    assert state_before["status"] == "TERMINATED" and state_before["last_result"]["epoch"] == 2

    client = _mlflow(uri)
    parent = client.get_run(first["parent_run_id"])
    assert parent.info.status == "KILLED" and parent.data.tags["bamray.sweep_status"] == "interrupted"
    knn_before = _history(client, _children(client, parent)[finished_id].info.run_id, "knn_top1")
    assert len(knn_before) == 2

    # a new sweep under the same name is refused: it would silently mix two experiments
    with pytest.raises(ConfigError, match="--resume resume-test"):
        run_sweep(cfg, space, trials=2, storage_path=storage, name="resume-test", tracking_uri=uri)

    monkeypatch.delenv(INTERRUPT_ENV)
    second = run_sweep(None, None, storage_path=storage, name="resume-test", resume=True)
    assert not second["interrupted"] and second["parent_run_id"] == first["parent_run_id"]
    statuses = {r["trial_id"]: r["status"] for r in second["trials"]}
    assert len(statuses) == 2 and set(statuses.values()) == {"completed"}, second["trials"]
    assert _checkpoints(exp / f"train-{finished_id}") == ckpts
    state_after = _tune_trial_state(exp, finished_id)
    for key in ("timestamp", "time_total_s", "knn_top1", "epoch"):  # the same result, not a re-run
        assert state_after["last_result"][key] == state_before["last_result"][key]
    assert len(list(exp.glob("trial_*"))) == 2 and len(list(exp.glob("train-*"))) == 2

    parent = client.get_run(first["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = _children(client, parent)
    assert set(children) == set(statuses)  # one child per trial: the resumed trial re-opened its run
    assert all(r.info.status == "FINISHED" for r in children.values())
    knn_after = _history(client, children[finished_id].info.run_id, "knn_top1")
    assert [(m.step, m.value) for m in knn_after] == [(m.step, m.value) for m in knn_before]
    assert second["total_trial_epochs"] == 4
    assert os.path.exists(exp / "bamray_sweep.json")
