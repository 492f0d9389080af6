"""The ``bamray`` command line, run as a real subprocess (``python -m orchestrator``)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from orchestrator.config import config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]

# Prints whether Ray / MLflow were imported at all: a refused config must not even load them.
_PROBE = (
    "import sys; from orchestrator.cli import main; rc = main(sys.argv[1:]); "
    "print('IMPORTED', 'ray' in sys.modules, 'mlflow' in sys.modules); sys.exit(rc)"
)


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "BAMRAY_HOME": str(tmp_path),
            "RAY_USAGE_STATS_ENABLED": "0",
            # nothing listens there: any attempt to reach Ray would fail loudly or hang
            "RAY_ADDRESS": "127.0.0.1:1",
        }
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _bamray(
    tmp_path: Path, *args: str, timeout: float = 120, probe: bool = False
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", _PROBE, *args] if probe else [sys.executable, "-m", "orchestrator", *args]
    return subprocess.run(
        cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "args, field",
    [
        (["--set", "optim.lr=-1"], "optim.lr"),
        (["--set", "method.reg=0"], "method.reg"),
        (["--set", "data.local_crop_size=64"], "data.local_crop_size"),
        (["--set", "optim.nope=3"], "optim.nope"),
        (["--workers", "-2"], "train.workers"),
        (
            ["--set", "optim.batch_size=20000"],
            "optim.batch_size",
        ),  # no full batch from 10000 images x 2 workers
    ],
)
def test_config_errors_exit_2_fast_without_ray(tmp_path, args, field):
    if field == "optim.batch_size":
        # needs the shards' size: use a tiny prepared set so the check runs without auto-preparing 70k images
        _bamray(tmp_path, "data", "prepare", "fashion-mnist", "--limit", "100", timeout=120)
    proc = _bamray(tmp_path, "train", "--config", "bam_fmnist", *args, probe=True)
    assert proc.returncode == 2, proc.stderr
    assert field in proc.stderr, proc.stderr
    if field != "optim.batch_size":
        assert "IMPORTED False False" in proc.stdout  # neither Ray nor MLflow was even imported
    assert "Traceback" not in proc.stderr


def test_unknown_config_file_and_missing_data_exit_2(tmp_path):
    proc = _bamray(tmp_path, "train", "--config", "no_such_config", probe=True)
    assert proc.returncode == 2 and "--config" in proc.stderr and "bam_fmnist" in proc.stderr
    proc = _bamray(
        tmp_path, "train", "--config", "bam_fmnist", "--set", "data.dataset=cifar-none", probe=True
    )
    assert proc.returncode == 2, proc.stderr
    assert "bamray data prepare" in proc.stderr and "cifar-none" in proc.stderr
    assert "IMPORTED False False" in proc.stdout
    proc = _bamray(tmp_path, "data", "prepare", "fashion-mnist", "--src", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "apt-get install dataset-fashion-mnist" in proc.stderr
    proc = _bamray(tmp_path, "train", "--resume", "0123456789abcdef")
    assert proc.returncode == 2 and "--resume" in proc.stderr


def test_config_show_is_the_resolved_config(tmp_path):
    proc = _bamray(
        tmp_path,
        "config",
        "show",
        "--config",
        "bam_fmnist",
        "--set",
        "optim.lr=0.002",
        "--set",
        "model.backbone=resnet18",
    )
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    cfg = config_from_dict(shown)
    assert cfg.optim.lr == 0.002 and cfg.model.backbone == "resnet18"
    assert cfg.to_dict() == load_config("bam_fmnist", ["optim.lr=0.002", "model.backbone=resnet18"]).to_dict()
    proc = _bamray(tmp_path, "config", "list")
    assert proc.returncode == 0 and "bam_fmnist" in proc.stdout.split()


def test_config_show_marks_the_debug_section(tmp_path):
    proc = _bamray(tmp_path, "config", "show", "--config", "bam_fmnist", "--set", "debug.fail_at_step=3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    at = lines.index("debug:")
    assert lines[at - 1].startswith("# debug: fault injection for tests") and "MLflow" in lines[at - 1]
    assert "debug:" not in lines[:at] and "fail_at_step" not in "\n".join(lines[:at])  # last, set apart
    assert config_from_dict(yaml.safe_load(proc.stdout)).debug.fail_at_step == 3


def test_data_prepare_fashion_mnist_limit(tmp_path, fmnist_src):
    out = tmp_path / "shards"
    proc = _bamray(
        tmp_path,
        "data",
        "prepare",
        "fashion-mnist",
        "--limit",
        "64",
        "--out",
        str(out),
        "--src",
        str(fmnist_src),
    )
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"] == {"train": 64, "test": 64} and meta["num_classes"] == 10 and meta["channels"] == 1
    assert "nothing skipped" in proc.stdout and (out / "skipped.csv").exists()
    # default location: <project>/.bamray/data/fashion-mnist
    proc = _bamray(tmp_path, "data", "prepare", "fashion-mnist", "--limit", "10")
    assert proc.returncode == 0, proc.stderr
    assert (
        json.loads((tmp_path / ".bamray/data/fashion-mnist/meta.json").read_text())["counts"]["train"] == 10
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_store_on_localhost(tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "ui", "--port", str(port)],
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline, status = time.time() + 90, None
        while time.time() < deadline and status is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    status = r.status
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(1)
        assert status == 200, proc.stdout.read() if proc.poll() is not None else "no answer"
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=5", timeout=10
        ) as r:
            assert r.status == 200 and "experiments" in json.loads(r.read())
        assert (tmp_path / ".bamray" / "mlflow.db").exists()  # the embedded store of this project
    finally:
        proc.terminate()  # bamray ui forwards SIGTERM to the MLflow server
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever is left of the server's process group (uvicorn workers, huey) goes too
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_user_errors_exit_2_with_one_line_and_no_mlflow_run(tmp_path):
    """Every refusal a user can cause: exit 2, one line naming what to fix, no traceback (unless
    --verbose), in seconds, and no MLflow run left behind. Probes use a closed port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("optim:\n  lr: [1,\n")
    _bamray(tmp_path, "data", "prepare", "fashion-mnist", "--limit", "1000", timeout=120)  # data come first
    train = ("train", "--config", "bam_fmnist")
    cases = [
        ((*train, "--tracking-uri", f"http://127.0.0.1:{closed}"), "tracking.tracking_uri", {}),
        ((*train, "--workers", "100", "--set", "optim.batch_size=8"), "train.workers", {"RAY_ADDRESS": ""}),
        ((*train, "--gpus-per-worker", "1"), "train.gpus_per_worker", {"RAY_ADDRESS": ""}),
        ((*train, "--address", f"127.0.0.1:{closed}"), "train.address", {}),
        ((*train, "--set", f"train.storage_path={blocker}/x"), "train.storage_path", {"RAY_ADDRESS": ""}),
        ((*train, "--set", "optim=3"), "optim", {}),
        ((*train, "--set", "nosuch.field=1"), "nosuch", {}),
        (("train", "--config", str(bad_yaml)), "not valid YAML", {}),
        (("eval", "linear", "--run", "0123456789abcdef"), "--run", {}),
    ]
    # All at once: each case is mostly interpreter start-up, so the whole table costs one case's wall time.
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "orchestrator", *args],
            cwd=tmp_path,
            env={**_env(tmp_path), **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args, _, env in cases
    ]
    for (args, field, _), proc in zip(cases, procs):
        _, stderr = proc.communicate(timeout=90)
        assert proc.returncode == 2, (args, stderr)
        assert field in stderr and "Traceback" not in stderr, (args, stderr)
    # seconds, not the minutes of a hang (nine processes sharing this machine's cores)
    assert time.monotonic() - t0 < 60
    from mlflow import MlflowClient

    store = tmp_path / ".bamray" / "mlflow.db"
    if store.exists():  # the eval case may have created the (empty) store; no case created a run
        c = MlflowClient(f"sqlite:///{store}")
        assert not c.search_runs([e.experiment_id for e in c.search_experiments()])
    proc = _bamray(tmp_path, "--verbose", "train", "--config", "bam_fmnist", "--set", "optim=3")
    assert proc.returncode == 2 and "Traceback" in proc.stderr
