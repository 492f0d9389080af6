"""Cluster submission through the real Ray job server: `ray start --head` with the dashboard on 127.0.0.1,
then a label-free 2-trial sweep on unlabelled images submitted with JobSubmissionClient (project uploaded
as runtime_env working_dir), which must stop its collapsed trial and end SUCCEEDED with its MLflow lineage
in place, and a `bamray submit` CLI round trip.

The job server is part of the Ray dashboard, which needs `ray[default]` (aiohttp_cors, grpcio, opencensus,
prometheus_client, ...). Without those packages `ray start --include-dashboard=true` fails with "Cannot
include dashboard with missing packages": the test is then skipped with the import error as its reason.

Teardown never runs `ray stop` (it would kill every Ray instance of this user on the machine, including
other test sessions'): the head runs with `--block` in its own session and is terminated by pid.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import free_port, ray_head, write_unlabelled_tree

from orchestrator import submit
from orchestrator.sweep.collapse import TAG_STOP_REASON, TAG_STOPPED

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the job's `python`
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.pop("RAY_ADDRESS", None)
    return env


def _dashboard_dependency_error(env: dict[str, str]) -> str | None:
    probe = subprocess.run(
        [sys.executable, "-c", "import ray.dashboard.optional_deps"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return None if probe.returncode == 0 else (probe.stderr.strip().splitlines() or ["?"])[-1]


@pytest.fixture(scope="module")
def job_server():
    env = _env()
    missing = _dashboard_dependency_error(env)
    if missing:
        pytest.skip(
            f"the Ray job server (dashboard) needs ray[default]; `ray start --include-dashboard=true` "
            f"fails here with 'Cannot include dashboard with missing packages' ({missing})"
        )
    dash_port = free_port()
    args = ["--num-cpus=4", "--include-dashboard=true", "--dashboard-host=127.0.0.1"]
    args += [
        f"--dashboard-port={dash_port}",
        f"--port={free_port()}",
        f"--ray-client-server-port={free_port()}",
    ]
    args += [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]
    args += [f"--object-store-memory={300 * 2**20}"]
    address = f"http://127.0.0.1:{dash_port}"
    with ray_head(args, lambda: submit.job_client(address).list_jobs(), env, prefix="rj"):
        yield address


@pytest.fixture(scope="module")
def own_images(tmp_path_factory, fmnist_src) -> str:
    """A user's own unlabelled photos: 120 Fashion-MNIST images in a nested PNG/JPEG tree with notes."""
    from data.sources import prepare_image_folder

    tmp = tmp_path_factory.mktemp("own")
    write_unlabelled_tree(tmp / "photos", fmnist_src, 120)
    prepare_image_folder(tmp / "photos", tmp / "shards", name="photos", labelled=False, val_fraction=0.2)
    return str(tmp / "shards")


LF_EPOCHS, HEALTHY_WD, COLLAPSING_WD = 3, 0.04, 4000.0


def test_submitted_label_free_sweep_stops_the_collapsed_trial(job_server, own_images, tmp_path):
    """A label-free sweep submitted as a Ray job, on unlabelled images: Tune optimises RankMe; the trial
    whose encoder collapses is stopped after two low evaluations (its workers wait for the verdict there, so
    its curves end at that epoch), tagged ``stopped: collapse`` and counted on the parent run, while the healthy trial runs its whole budget; the job ends SUCCEEDED with its MLflow
    lineage in place.

    The collapsing configuration: a weight decay so large that AdamW's decoupled decay (lr x wd = 1 per step
    at lr 2e-3 x 32 / 256 and wd 4000) sets every decayed weight to 0 in one step, so every image maps to
    the same vector (measured: std_norm 0.64 -> 0.0, RankMe 21 -> 1.0). It stands for any run whose
    features die: the check reads the features, not the cause. No teacher, so the evaluated network is the
    student."""
    space = tmp_path / "wd.yaml"
    wd = {"type": "grid", "values": [HEALTHY_WD, COLLAPSING_WD]}
    space.write_text(yaml.safe_dump({"name": "wd", "params": {"optim.weight_decay": wd}}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["sweep", "--config", "bam_fmnist", "--space", str(space), "--trials", "2", "--scheduler", "fifo"]
    args += ["--search", "grid", "--max-concurrent", "2", "--metric", "rankme", "--mode", "max"]
    args += ["--storage-path", str(tmp_path / "ray"), "--name", "job-sweep", "--tracking-uri", uri]
    for kv in (
        "optim.batch_size=32",
        f"optim.epochs={LF_EPOCHS}",
        "optim.warmup_epochs=0",
        f"optim.weight_decay_end={HEALTHY_WD}",
        "train.workers=1",
        "train.cpus_per_worker=0.5",
        "data.map_cpus=0.5",
        "data.global_crop_size=16",
        "data.local_crop_size=8",
        "method.top_k_sink=0",
        "method.teacher=false",
        "method.proj_hidden_dim=64",
        "method.proj_out_dim=32",
        "model.backbone=vit_tiny_patch16_224",
        "model.patch_size=4",
        "model.backbone_kwargs={depth: 2}",
        f"data.path={own_images}",
        "tracking.experiment=submit-test",
    ):
        args += ["--set", kv]
    job_id = submit.submit_job(args, job_server)
    status = submit.wait_for_job(job_server, job_id, timeout_s=900)
    logs = submit.job_client(job_server).get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "best rankme" in logs and "1 trial(s) stopped as collapsed" in logs and "k-NN skipped" in logs

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    [parent] = client.search_runs(
        [client.get_experiment_by_name("submit-test").experiment_id],
        filter_string="tags.`bamray.role` = 'sweep'",
    )
    assert parent.info.status == "FINISHED" and parent.data.params["metric"] == "rankme"
    assert parent.data.metrics["trials_stopped_collapse"] == 1
    assert "spearman_rankme_knn" not in parent.data.metrics  # nothing to correlate without labels
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    by_wd = {float(c.data.params["optim.weight_decay"]): c for c in children}
    good, bad = by_wd[HEALTHY_WD], by_wd[COLLAPSING_WD]
    assert bad.data.tags[TAG_STOPPED] == "collapse" and TAG_STOPPED not in good.data.tags
    reason = re.fullmatch(
        r"collapse: std_norm (\S+) < 0.05 for 2 evaluations in a row \(epoch 2\)",
        bad.data.tags[TAG_STOP_REASON],
    )
    assert reason is not None and float(reason.group(1)) < 1e-4, bad.data.tags[TAG_STOP_REASON]
    assert bad.data.tags["bamray.trial_status"] == "stopped_early" and good.info.status == "FINISHED"
    good_steps = [m.step for m in client.get_metric_history(good.info.run_id, "train_signals/rankme")]
    assert len(good_steps) == LF_EPOCHS
    # the workers waited for Tune's verdict after epoch 2: the stopped trial's curves end there
    assert [m.step for m in client.get_metric_history(bad.info.run_id, "train_signals/rankme")] == good_steps[
        :2
    ]
    assert (
        bad.data.metrics["train_signals/rankme"] == pytest.approx(1.0, abs=0.05)
        and good.data.metrics["train_signals/rankme"] > 3.0
    )
    assert parent.data.metrics["best_rankme"] == pytest.approx(good.data.metrics["train_signals/rankme"])
    assert "eval/knn_top1" not in good.data.metrics  # no labels, no k-NN
    assert {
        "train_signals/std_norm",
        "train_signals/align",
        "train_signals/uniform",
        "train_signals/rankme_proj",
        "train_signals/epoch_bam_target_entropy",
    } <= set(good.data.metrics)


def test_bamray_submit_cli_round_trip(job_server, capsys):
    from orchestrator.cli import main

    assert main(["submit", "--address", job_server, "--", "config", "list"]) == 0
    out = capsys.readouterr().out
    assert "submitted job" in out and "bam_fmnist" in out and "SUCCEEDED" in out
    assert (
        main(
            [
                "submit",
                "--address",
                job_server,
                "--no-wait",
                "--job-id",
                "bamray-nowait-1",
                "--",
                "config",
                "show",
                "--config",
                "bam_fmnist",
            ]
        )
        == 0
    )
    assert submit.wait_for_job(job_server, "bamray-nowait-1", timeout_s=300) == "SUCCEEDED"
    # a job that fails (bad config -> exit code 2) is reported as FAILED by the CLI's exit code
    assert (
        main(["submit", "--address", job_server, "--", "config", "show", "--config", "no_such_config"]) == 1
    )
