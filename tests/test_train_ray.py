"""`bamray train` end to end on a real local Ray cluster with a real MLflow SQLite store.

Tiny but real: a 2-block ViT-Tiny (patch 4) on 16-px crops of 256 Fashion-MNIST images (plus one
corrupt PNG row injected into the shards), batch 32, 2 epochs. In-process runs reuse the module's Ray
(``ray_local``); the concurrency and killed-driver tests run ``python -m orchestrator train`` as separate
driver processes connected to the same cluster.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_BATCH, TINY_N_TEST, TINY_N_TRAIN, append_corrupt_row, tiny_train_settings
from safetensors.torch import save_model

from orchestrator import checkpointing as ckpt
from orchestrator import tracking
from orchestrator.config import load_config
from orchestrator.metric_names import mlflow_key
from orchestrator.training import midepoch
from orchestrator.training.driver import run_training
from orchestrator.training.loopback_ddp import STORE_PREFIX
from orchestrator.training.scratch import OWNER_SUFFIX
from orchestrator.training.worker import CHECKPOINT_SCRATCH
from trainers.options import flatten

pytestmark = pytest.mark.ray

N_TRAIN, N_TEST, BATCH = TINY_N_TRAIN, TINY_N_TEST, TINY_BATCH


def _overrides(shards: Path, storage: Path, uri: str, workers: int = 2, **extra) -> list[str]:
    base = tiny_train_settings(
        **{
            "data.path": str(shards),
            "train.workers": workers,
            "train.storage_path": str(storage),
            "tracking.tracking_uri": uri,
            "eval.linear_epochs": 5,
            "method.momentum": 0.995,
            **extra,
        }
    )
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def shards(tiny_shards) -> Path:
    """The tiny run's shards plus one undecodable PNG row (index N_TRAIN) in an extra train part."""
    append_corrupt_row(tiny_shards, "train", N_TRAIN, label=3)
    return tiny_shards


@pytest.fixture(scope="module")
def storage():
    """Ray Train storage in a short /tmp path (socket / path length limits)."""
    d = tempfile.mkdtemp(prefix="bt", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def _history(c, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in c.get_metric_history(run_id, mlflow_key(key)))


def _steps(c, run_id: str, key: str) -> list[int]:
    return [s for s, _ in _history(c, run_id, key)]


@pytest.fixture(scope="module")
def finished_run(ray_local, shards, storage, tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlf') / 'mlflow.db'}"
    cfg = load_config("bam_fmnist", _overrides(shards, storage, uri))
    out = run_training(cfg)
    return cfg, out


def test_two_worker_run_is_tracked_end_to_end(finished_run):
    cfg, out = finished_run
    assert out["status"] == "FINISHED", out.get("reason")
    c = tracking.client(out["tracking_uri"])
    run = c.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    # every resolved config value is a param, except the debug section's fault injection; tags carry
    # commit, versions, method
    assert set(run.data.params) == set(cfg.run_params())
    assert set(flatten(cfg.to_dict())) - set(run.data.params) == {
        "debug.fail_at_step",
        "debug.nan_at_step",
        "debug.hold_at_step",
    }
    assert run.data.params["optim.batch_size"] == str(BATCH) and run.data.params["train.workers"] == "2"
    assert run.data.tags["method"] == "bam" and run.data.tags["version.ray"] == "2.60.0"
    assert run.data.tags["git_commit"] != "unknown" and run.data.tags["bamray.start_epoch"] == "0"

    spe = N_TRAIN // (BATCH * 2)  # 4 steps per epoch: the corrupt row is dropped, not padded in
    assert _steps(c, out["run_id"], "loss") == list(range(1, 2 * spe + 1))
    assert all(np.isfinite(v) for _, v in _history(c, out["run_id"], "loss"))
    for key in ("lr", "weight_decay", "teacher_momentum", "images_per_sec", "epoch"):
        assert _steps(c, out["run_id"], key) == list(range(1, 2 * spe + 1)), key
    # schedules: lr warms up over epoch 1 (linear from 0), teacher momentum rises towards 1
    lrs = [v for _, v in _history(c, out["run_id"], "lr")]
    assert lrs[0] == 0.0 and lrs[spe] == pytest.approx(cfg.optim.lr * BATCH * 2 / 256, rel=1e-6)
    moms = [v for _, v in _history(c, out["run_id"], "teacher_momentum")]
    assert moms[0] == pytest.approx(0.995) and all(b >= a for a, b in zip(moms, moms[1:]))

    # one k-NN per epoch, computed over the whole (all-gathered) bank: well above chance (10 %)
    knn = _history(c, out["run_id"], "knn_top1")
    assert [s for s, _ in knn] == [spe, 2 * spe]
    assert all(20.0 < v <= 100.0 for _, v in knn)
    assert [v for _, v in _history(c, out["run_id"], "knn_top5")] >= [v for _, v in knn]
    # the corrupt row was counted, and the run went on
    assert _history(c, out["run_id"], "data_corrupt_skipped")[-1] == (2 * spe, 1.0)
    # raw pixels through the same distributed k-NN, once, on the very same bank: equal to a single-process
    # k-NN on the same images decoded from the original IDX files
    assert _history(c, out["run_id"], "knn_pixels_top1") == [
        (spe, pytest.approx(_idx_pixel_knn(cfg), abs=1e-9))
    ]
    assert out["worker_result"]["knn_pixels_top1"] == pytest.approx(_idx_pixel_knn(cfg), abs=1e-9)

    # the label-free signals beside the k-NN, on its evaluation epochs; the backbone's figures were computed
    # over the two workers' all-gathered shares: equal to one process on the whole sample, final backbone
    for key in (
        "rankme",
        "std_norm",
        "align",
        "uniform",
        "rankme_proj",
        "std_norm_proj",
        "epoch_bam_target_entropy",
    ):
        assert [s for s, _ in _history(c, out["run_id"], key)] == [spe, 2 * spe], key
    assert run.data.params["data.channels"] == "1"  # the data set's own, logged as the run used it
    with tempfile.TemporaryDirectory() as tmp:
        backbone, rcfg = ckpt.load_backbone(c.download_artifacts(out["run_id"], "final", tmp))
    assert rcfg.data.channels == 1 and rcfg.data.mean == pytest.approx(
        (0.2860,), abs=0.01
    )  # the meta's (256 images)
    alone = _signals_alone(backbone, rcfg)
    for key in ("rankme", "std", "std_norm", "align", "uniform"):
        assert _history(c, out["run_id"], key)[-1][1] == pytest.approx(alone[key], rel=1e-4, abs=1e-6), key
    # BAM's entropies: every step, and their epoch means over the workers (nats, at most log of the columns)
    assert _steps(c, out["run_id"], "bam_target_entropy") == list(range(1, 2 * spe + 1))
    ent = [v for _, v in _history(c, out["run_id"], "epoch_bam_target_entropy")]
    assert all(0.0 < v <= np.log(BATCH * 2 * 2) for v in ent)

    names = {a.path for a in c.list_artifacts(out["run_id"], "final")}
    assert names == {"final/backbone.safetensors", "final/config.yaml"}
    assert {a.path for a in c.list_artifacts(out["run_id"], "best_knn")} == {
        "best_knn/backbone.safetensors",
        "best_knn/config.yaml",
    }
    assert [a.path for a in c.list_artifacts(out["run_id"], "crops")] == ["crops/first_batch.png"]
    assert c.get_metric_history(out["run_id"], "eval/best_knn_top1")[0].value == max(v for _, v in knn)

    # the final checkpoint: loadable with weights_only, points back at the MLflow run
    state = ckpt.load_training_state(out["checkpoint"])
    assert (
        state["epoch"] == 2 and state["engine"]["step"] == 2 * spe and state["mlflow_run_id"] == out["run_id"]
    )
    assert ckpt.load_rng_state(out["checkpoint"], 0) is not None and ckpt.load_rng_state(out["checkpoint"], 1)


def _signals_alone(backbone, cfg) -> dict[str, float]:
    """The label-free signals of ``backbone`` on the run's fixed sample, in one process (world size 1)."""
    from orchestrator.training.online_eval import SignalSample, label_free_signals

    method = type("M", (), {"eval_backbone": lambda self: backbone, "signal_head": lambda self: None})()
    return label_free_signals(method, cfg, SignalSample(cfg, rank=0, world=1), torch.device("cpu"))


def _idx_pixel_knn(cfg) -> float:
    """Raw-pixel k-NN of the first N_TRAIN / N_TEST Fashion-MNIST images at the run's clean view size."""
    import gzip

    from data.augment import clean_transform
    from trainers.evaluation.knn import raw_pixel_baseline

    src = Path(os.environ.get("BAMRAY_FMNIST_SRC", "/usr/share/datasets/fashion-mnist"))

    def read(prefix: str, n: int):
        with gzip.open(src / f"{prefix}-images-idx3-ubyte.gz") as f:
            x = np.frombuffer(f.read(16 + n * 784), np.uint8, offset=16).reshape(n, 1, 28, 28)
        with gzip.open(src / f"{prefix}-labels-idx1-ubyte.gz") as f:
            y = np.frombuffer(f.read(8 + n), np.uint8, offset=8).astype(np.int64)
        views = torch.stack(
            [clean_transform(torch.from_numpy(v.copy()), cfg.data.global_crop_size) for v in x]
        )
        return views, torch.from_numpy(y)

    (xb, yb), (xq, yq) = read("train", N_TRAIN), read("t10k", N_TEST)
    return raw_pixel_baseline(xb, yb, xq, yq, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)


def test_time_budget_plans_the_epochs_and_fits_the_schedules(ray_local, shards, storage, tmp_path):
    """A budget shorter than one epoch: the run stops after 1 of its 3 epochs, and the checkpoint
    remembers the plan (a resumed run keeps it). The plan is made once epoch 1 is timed, so epoch 1 ran on
    the 3-epoch schedule (the refit itself is checked in test_time_budget.py)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        "bam_fmnist",
        _overrides(
            shards,
            storage,
            uri,
            **{
                "optim.epochs": 3,
                "train.time_budget_min": 0.001,
                "optim.warmup_epochs": 0.5,
                "optim.min_lr": "1.0e-5",
            },
        ),
    )
    out = run_training(cfg)
    assert out["status"] == "FINISHED", out.get("reason")
    spe = N_TRAIN // (BATCH * 2)
    c = tracking.client(uri)
    assert _steps(c, out["run_id"], "loss") == list(range(1, spe + 1))
    assert _steps(c, out["run_id"], "knn_top1") == [spe]
    lrs = [v for _, v in _history(c, out["run_id"], "lr")]
    peak = cfg.optim.lr * BATCH * 2 / 256
    # warm-up over half the epoch, then the start of the 3-epoch cosine (step 3 of its 10: 0.976 x peak)
    assert lrs[0] == 0.0 and lrs[spe // 2] == pytest.approx(peak, rel=1e-6)
    cosine = 1e-5 + (peak - 1e-5) * (1 + np.cos(np.pi * (spe - 1 - spe // 2) / (3 * spe - spe // 2))) / 2
    assert lrs[-1] == pytest.approx(cosine, rel=1e-6)
    (train_time,) = [v for _, v in _history(c, out["run_id"], "train_time_s")]
    assert 0 < train_time == pytest.approx(out["worker_result"]["train_time_s"])
    state = ckpt.load_training_state(out["checkpoint"])
    assert (
        state["epoch"] == 1
        and state["extra"]["planned_epochs"] == 1
        and state["config"]["optim"]["epochs"] == 1
    )


def test_every_evaluation_epoch_logs_its_pictures_and_the_run_its_description(finished_run, tmp_path):
    """A ViT BAM run evaluated at both epochs: attention maps, embedding map and BAM's P / Q at each, by
    step (MLflow's image series), each a decodable PNG; system metrics and the one-line description."""
    from PIL import Image

    _, out = finished_run
    c = tracking.client(out["tracking_uri"])
    run_id, spe = out["run_id"], N_TRAIN // (BATCH * 2)
    pngs = [a.path for a in c.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    for key in ("attention", "embedding_map", "bam_targets"):
        steps = sorted(
            int(p.split("+step+")[1].split("+")[0]) for p in pngs if p.startswith(f"images/{key}+")
        )
        assert steps == [spe, 2 * spe], (key, pngs)
    local = c.download_artifacts(run_id, next(p for p in pngs if "/attention+" in p), str(tmp_path))
    assert Image.open(local).size[0] > 200
    run = c.get_run(run_id)
    assert "system/cpu_utilization_percentage" in run.data.metrics
    # the UI sections charts by the name's prefix: k-NN, then loss / lr, then the signals, the rest flat
    groups = {k.split("/")[0] for k in run.data.metrics if "/" in k}
    assert groups == {"eval", "train", "train_signals", "system"}, sorted(run.data.metrics)
    assert {"eval/knn_top1", "eval/knn_pixels_top1", "train/loss", "train/lr"} <= set(run.data.metrics)
    assert "train_signals/epoch_bam_target_entropy" in run.data.metrics and "knn_top1" not in run.data.metrics
    description = run.data.tags["mlflow.note.content"]
    assert (
        description.startswith("bam on ")
        and f"k-NN top-1 {run.data.metrics['eval/knn_top1']:.2f} %" in description
    )
    assert (
        c.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    )


def test_exported_backbone_rebuilds_and_linear_eval_cli_logs(finished_run, tmp_path):
    import mlflow.artifacts

    cfg, out = finished_run
    local = mlflow.artifacts.download_artifacts(
        run_id=out["run_id"], artifact_path="final", dst_path=str(tmp_path), tracking_uri=out["tracking_uri"]
    )
    model, rcfg = ckpt.load_backbone(local)
    assert rcfg.model.backbone == cfg.model.backbone
    with torch.no_grad():
        feats = model(torch.zeros(2, 1, 16, 16))
    assert feats.shape == (2, model.num_features)

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "eval",
            "linear",
            "--run",
            out["run_id"],
            "--tracking-uri",
            out["tracking_uri"],
            "--epochs",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    c = tracking.client(out["tracking_uri"])
    top1 = c.get_metric_history(out["run_id"], "eval/linear_top1")
    assert len(top1) == 1 and 10.0 < top1[0].value <= 100.0  # 10 classes: chance is 10 %
    assert len(c.get_metric_history(out["run_id"], "eval/linear_val_top1")) == 5
    assert top1[0].value == max(m.value for m in c.get_metric_history(out["run_id"], "eval/linear_val_top1"))

    # an exported directory instead of a run id (as every downstream command takes): probed, nothing logged
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "eval", "linear", "--run", str(local), "--epochs", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    value = float(proc.stdout.split("linear_top1 = ")[1].split(" %")[0])
    assert 10.0 < value <= 100.0 and "logged to" not in proc.stdout, proc.stdout
    assert len(c.get_metric_history(out["run_id"], "eval/linear_top1")) == 1


@pytest.mark.parametrize("stream", ["epoch", "run"])
def test_worker_failure_resumes_inside_the_epoch_from_a_step_checkpoint(
    ray_local, shards, storage, tmp_path, stream
):
    """Checkpoints every 5 steps and on a termination notice (a file that exists from the start, so each
    worker group sees it at its first step); rank 0 fails after step 7, in epoch 2 after the step-5 checkpoint.
    The restarted group resumes at step 5, inside epoch 2, and that epoch still trains on every sample once.
    Both training streams: Ray Data split per epoch, and each worker's one execution for the run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spe = N_TRAIN // (BATCH * 2)  # 4
    notice = tmp_path / "terminating"
    notice.write_text("spot instance interruption\n")
    settings = {
        "debug.fail_at_step": 7,
        "train.max_failures": 1,
        "train.checkpoint_every_steps": 5,
        "train.preemption_notice": str(notice),
        "data.stream": stream,
    }
    ddp_stores = set(Path(tempfile.gettempdir()).glob(f"{STORE_PREFIX}*"))
    out = run_training(load_config("bam_fmnist", _overrides(shards, storage, uri, **settings)))
    assert out["status"] == "FINISHED", out.get("reason")
    assert (Path(out["ray_run_dir"]) / ".fail_at_step.fired").read_text().startswith("fired at step 7")
    assert (out["worker_result"]["start_epoch"], out["worker_result"]["start_step"]) == (1, 5)
    c = tracking.client(uri)
    # every step and every epoch metric exactly once, although steps 6-7 ran twice
    assert _steps(c, out["run_id"], "loss") == list(range(1, 2 * spe + 1))
    assert _steps(c, out["run_id"], "knn_top1") == [spe, 2 * spe]
    assert _steps(c, out["run_id"], "epoch_loss") == [spe, 2 * spe]
    # the notice checkpointed after the first step of each worker group: step 1, and step 6 after the restart
    assert _history(c, out["run_id"], "preemption_notice") == [(1, 1.0), (6, 1.0)]
    tags = c.get_run(out["run_id"]).data.tags
    assert (tags["bamray.start_epoch"], tags["bamray.start_step"]) == ("1", "5")
    state = ckpt.load_training_state(out["checkpoint"])
    assert state["epoch"] == 2 and state["engine"]["step"] == 2 * spe
    # epoch 2 = 1 step before the checkpoint + 3 after the resume, on each of the 2 ranks: all 256 samples,
    # none twice (the resumed stream left out the 64 the checkpoint had recorded)
    samples = midepoch.load_samples(out["checkpoint"])
    if stream == "epoch":
        assert sorted(samples.tolist()) == list(range(N_TRAIN))
    else:  # plans rows before decoding: 2 x 128 of the 257 rows (the corrupt one stood in for if met)
        assert len(set(samples.tolist())) == len(samples) == N_TRAIN and max(samples) <= N_TRAIN
    # no checkpoint scratch dir outlives its process (a killed rank's is removed by the next checkpoint),
    # and no DDP FileStore stays (a killed group's: tests/test_signals_ray.py)
    assert not list(Path(tempfile.gettempdir()).glob(f"{CHECKPOINT_SCRATCH}*{OWNER_SUFFIX}"))
    assert not set(Path(tempfile.gettempdir()).glob(f"{STORE_PREFIX}*")) - ddp_stores


def test_nan_loss_fails_the_run_and_keeps_the_last_good_checkpoint(ray_local, shards, storage, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spe = N_TRAIN // (BATCH * 2)
    nan_at = spe + 1
    cfg = load_config(
        "bam_fmnist",
        _overrides(shards, storage, uri, **{"debug.nan_at_step": nan_at, "train.max_failures": 2}),
    )
    out = run_training(cfg)
    assert out["status"] == "FAILED"
    c = tracking.client(uri)
    run = c.get_run(out["run_id"])
    assert run.info.status == "FAILED"
    assert (
        "non-finite loss" in run.data.tags[tracking.TAG_FAILURE]
        and f"step {nan_at}" in run.data.tags[tracking.TAG_FAILURE]
    )
    assert _history(c, out["run_id"], "nan_detected") == [(nan_at, 1.0)]
    # not retried: one attempt, steps logged up to the NaN step and never again
    assert out["worker_result"]["start_epoch"] == 0
    assert _steps(c, out["run_id"], "loss") == list(range(1, nan_at + 1))
    assert not c.list_artifacts(out["run_id"], "final")
    # the epoch-1 checkpoint is still there, loadable, with finite weights
    state = ckpt.load_training_state(out["checkpoint"])
    assert state["epoch"] == 1 and state["engine"]["step"] == spe
    assert all(torch.isfinite(t).all() for t in state["engine"]["method"].values() if t.is_floating_point())


def _driver_env(ray_local, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "RAY_USAGE_STATS_ENABLED": "0"})
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra or {})
    return env


def _train_cmd(overrides: list[str], *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "orchestrator", "train", *extra]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def test_two_concurrent_runs_share_one_fresh_store(ray_local, shards, storage, tmp_path):
    """Two drivers start at the same moment on a fresh SQLite store (schema creation race) and log at
    the same time: both FINISHED, no metric missing or doubled, no 'database is locked'."""
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    ov = _overrides(shards, storage, uri, workers=1, **{"optim.epochs": 1})
    procs = [
        subprocess.Popen(
            _train_cmd(ov, "--config", "bam_fmnist"),
            env=_driver_env(ray_local),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
        assert "database is locked" not in log
    c = tracking.client(uri)
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    spe = N_TRAIN // BATCH
    for r in runs:
        assert _steps(c, r.info.run_id, "loss") == list(range(1, spe + 1))
        assert _steps(c, r.info.run_id, "knn_top1") == [spe]
        assert set(r.data.params) == set(load_config("bam_fmnist", ov).run_params())


def test_resume_after_killed_driver_continues_the_same_run(ray_local, shards, storage, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ov = _overrides(shards, storage, uri, workers=1)
    first = subprocess.run(
        _train_cmd(ov, "--config", "bam_fmnist"),
        capture_output=True,
        text=True,
        timeout=600,
        env=_driver_env(ray_local, {"BAMRAY_TEST_EXIT_DRIVER_AFTER_EPOCHS": "1"}),
    )
    assert first.returncode == 17, (first.stdout + first.stderr)[
        -4000:
    ]  # killed after the epoch-1 checkpoint
    c = tracking.client(uri)
    (run,) = c.search_runs([e.experiment_id for e in c.search_experiments()])
    run_id = run.info.run_id
    assert run.info.status == "RUNNING"  # nobody marked it: the driver died
    spe = N_TRAIN // BATCH
    assert _steps(c, run_id, "knn_top1") == [spe]

    # --resume without --config: the run's own config.yaml artifact; Ray/MLflow locations on the line
    second = subprocess.run(
        [sys.executable, "-m", "orchestrator", "train", "--resume", run_id, "--tracking-uri", uri],
        capture_output=True,
        text=True,
        timeout=600,
        env=_driver_env(ray_local),
    )
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    # the console: our lines once each, none of Ray's chatter, which is in the run's log artifact instead
    shown = second.stdout + second.stderr
    for chatter in (
        "TrainingReport",
        "Execution plan",
        "Setting up process group",
        "PYTHON worker processes",
    ):
        assert chatter not in shown, chatter
    assert shown.count("epoch 2/2: ") == 1 and "[bamray]" not in shown
    assert "k-NN top-1   raw pixels" in shown and f"Run {run_id}: FINISHED" in shown
    assert len(shown.splitlines()) <= 25, shown
    import mlflow.artifacts

    log = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="logs/console.log", dst_path=str(tmp_path / "log"), tracking_uri=uri
        )
    )
    assert "Execution plan" in log.read_text() and "epoch 2/2: " in log.read_text()
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    assert [r.info.run_id for r in runs] == [run_id]  # one MLflow run, continued
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["bamray.start_epoch"] == "1"  # Ray Train resumed from the epoch-1 checkpoint
    assert _steps(c, run_id, "knn_top1") == [spe, 2 * spe]
    assert _steps(c, run_id, "loss") == list(range(1, 2 * spe + 1))
    assert {a.path for a in c.list_artifacts(run_id, "final")} == {
        "final/backbone.safetensors",
        "final/config.yaml",
    }


def test_resume_of_a_finished_run_does_nothing(finished_run):
    """`--resume` of a FINISHED run: says so, exits 0, starts no Ray and logs nothing twice."""
    _, out = finished_run
    c = tracking.client(out["tracking_uri"])
    before = {k: _history(c, out["run_id"], k) for k in ("best_knn_top1", "train_wall_time_s")}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "train", "--resume", out["run_id"]]
        + ["--tracking-uri", out["tracking_uri"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "already FINISHED" in proc.stdout and "Started a local Ray" not in proc.stderr
    assert {k: _history(c, out["run_id"], k) for k in before} == before
    assert c.get_run(out["run_id"]).info.status == "FINISHED"


def _actor_classes() -> dict[str, str]:
    """Every actor the connected Ray has had, by id: its class name (from the GCS; no dashboard needed)."""
    import ray._private.state

    return {a: info["ActorClassName"] for a, info in ray._private.state.actors().items()}


def test_init_from_starts_a_new_run_from_exported_weights(ray_local, finished_run, shards, tmp_path):
    """`--init-from`: a new run (new MLflow run, new schedule) whose backbone starts from exported weights
    (here the finished run's, moved well off the init). At an lr of 1e-9 its own export equals them; the
    run's own seed would have given other weights."""
    import mlflow.artifacts

    from orchestrator.training.data_prep import prepare_data
    from trainers.build import build_method

    _, out = finished_run
    uri = out["tracking_uri"]
    settings = {"optim.lr": 1e-9, "optim.min_lr": 0.0, "optim.epochs": 1, "eval.knn_freq": 0}
    overrides = _overrides(shards, tmp_path / "ray", uri, workers=1, **settings)
    cfg, _ = prepare_data(load_config("bam_fmnist", overrides))
    fresh = build_method(cfg, device="cpu", steps_per_epoch=1, batch_size=BATCH).eval_backbone()
    local = mlflow.artifacts.download_artifacts(
        run_id=out["run_id"], artifact_path="final", dst_path=str(tmp_path / "src"), tracking_uri=uri
    )
    source, _ = ckpt.load_backbone(local)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(source, str(Path(local) / ckpt.BACKBONE_FILE))

    before = set(_actor_classes())
    new = run_training(load_config("bam_fmnist", [*overrides, f"model.init_from={local}"]))
    assert new["status"] == "FINISHED" and new["run_id"] != out["run_id"]
    # one worker iterates its training and k-NN datasets itself: Ray Train's dataset actors never start
    started_classes = [c for a, c in _actor_classes().items() if a not in before]
    assert "RayTrainWorker" in started_classes and "TrainController" in started_classes, started_classes
    assert not {"DatasetManager", "SplitCoordinator"} & set(started_classes), started_classes
    # its corrupt-row counter and epoch clock are one actor process
    assert started_classes.count("RunLedger") == 1, started_classes
    assert tracking.client(uri).get_run(new["run_id"]).data.params["model.init_from"] == local
    started, _ = ckpt.load_backbone(
        mlflow.artifacts.download_artifacts(
            run_id=new["run_id"], artifact_path="final", dst_path=str(tmp_path / "new"), tracking_uri=uri
        )
    )
    far = 0.0
    for key, value in source.state_dict().items():
        torch.testing.assert_close(started.state_dict()[key], value, rtol=0, atol=1e-5)
        far = max(far, float((fresh.state_dict()[key] - value).abs().max()))
    assert far > 0.1  # without --init-from the run would have started there
