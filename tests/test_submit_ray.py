"""Cluster submission through the real Ray job server: `ray start --head` with the dashboard on 127.0.0.1,
then a 1-trial sweep submitted with JobSubmissionClient (project uploaded as runtime_env working_dir),
which must end SUCCEEDED with its MLflow lineage in place, and a `bamray submit` CLI round trip.

The job server is part of the Ray dashboard, which needs `ray[default]` (aiohttp_cors, grpcio, opencensus,
prometheus_client, ...). Without those packages `ray start --include-dashboard=true` fails with "Cannot
include dashboard with missing packages": the test is then skipped with the import error as its reason.

Teardown never runs `ray stop` (it would kill every Ray instance of this user on the machine, including
other test sessions'): the head runs with `--block` in its own session and is terminated by pid.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import free_port, ray_head

from orchestrator import submit

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
def tiny_data(tmp_path_factory) -> str:
    from data.sources import prepare_fashion_mnist

    out = tmp_path_factory.mktemp("fmnist") / "shards"
    prepare_fashion_mnist(out, limit=200)
    return str(out)


def test_submitted_sweep_succeeds_with_lineage(job_server, tiny_data, tmp_path):
    space = tmp_path / "seeds.yaml"
    space.write_text(yaml.safe_dump({"name": "seeds", "params": {"seed": {"type": "grid", "values": [0]}}}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "sweep",
        "--config",
        "bam_fmnist",
        "--space",
        str(space),
        "--trials",
        "1",
        "--scheduler",
        "fifo",
        "--max-concurrent",
        "1",
        "--storage-path",
        str(tmp_path / "ray"),
        "--name",
        "job-sweep",
        "--tracking-uri",
        uri,
    ]
    for kv in (
        "optim.batch_size=32",
        "train.workers=1",
        "train.cpus_per_worker=0.5",
        "data.map_cpus=0.5",
        "method.top_k_sink=0",
        "optim.epochs=1",
        "method.proj_hidden_dim=128",
        "method.proj_out_dim=64",
        "data.local_crops=2",
        "model.backbone=vit_tiny_patch16_224",
        "model.patch_size=4",
        "model.backbone_kwargs={depth: 2}",
        f"data.path={tiny_data}",
        "tracking.experiment=submit-test",
    ):
        args += ["--set", kv]
    job_id = submit.submit_job(args, job_server)
    status = submit.wait_for_job(job_server, job_id, timeout_s=900)
    logs = submit.job_client(job_server).get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "best knn_top1" in logs

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    [parent] = client.search_runs(
        [client.get_experiment_by_name("submit-test").experiment_id],
        filter_string="tags.`bamray.role` = 'sweep'",
    )
    assert parent.info.status == "FINISHED" and parent.data.params["trials"] == "1"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 1 and all(c.info.status == "FINISHED" for c in children)
    assert all("knn_top1" in c.data.metrics for c in children)


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
