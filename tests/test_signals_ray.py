"""Ctrl-C and SIGTERM stop `bamray train` cleanly at any moment (orchestrator/training/interrupt.py).

Each test runs ``python -m orchestrator train`` as its own process group (a terminal's Ctrl-C reaches the
whole group: the driver and every Ray process it started), with its own MLflow store, Ray Train storage
and ``RAY_TMPDIR``, on the tiny run of conftest.py with one worker. The session's processes are
found by that temp dir: on a command line (GCS, raylet, the watchdog) or open (workers and agents log
there), so other Rays on the machine are neither counted nor touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import tiny_train_settings

from orchestrator import checkpointing as ckpt
from orchestrator import tracking
from orchestrator.local_ray import session_processes
from orchestrator.training.loopback_ddp import STORE_PREFIX

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def work() -> Iterator[Path]:
    """Store, storage and Ray temp dir of one driver, in a short /tmp path (Ray's socket paths)."""
    d = Path(tempfile.mkdtemp(prefix="sg", dir="/tmp"))
    (d / "ray").mkdir()
    yield d
    for pid in _ray_processes(d):  # a failed test must not leave its Ray behind
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(d, ignore_errors=True)


class Driver:
    """``bamray train`` in its own process group; its output collected line by line as it comes."""

    def __init__(self, shards: Path, work: Path, epochs: int, *extra: str) -> None:
        overrides = tiny_train_settings(
            **{
                "data.path": shards,
                "optim.epochs": epochs,
                "train.workers": 1,
                "train.storage_path": work / "storage",
            }
        )
        self.uri = f"sqlite:///{work / 'mlflow.db'}"
        cmd = [sys.executable, "-m", "orchestrator", "train", "--tracking-uri", self.uri, *extra]
        if not extra:
            cmd += ["--config", "bam_fmnist"]
            for key, value in overrides.items():
                cmd += ["--set", f"{key}={value}"]
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        env.update(RAY_TMPDIR=str(work / "ray"), RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None, (
                f"exited {self.proc.returncode} before {text!r}:\n{self.output[-4000:]}"
            )
            assert time.monotonic() < deadline, f"no {text!r} in {timeout} s:\n{self.output[-4000:]}"
            time.sleep(0.1)

    def finish(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"still running {timeout} s after the signal:\n{self.output[-4000:]}")
        self._reader.join(timeout=10)
        return rc


def _ray_processes(work: Path) -> list[int]:
    """This driver's Ray (and its watchdog): processes with its ``RAY_TMPDIR`` on their command line or
    a file under it open; never this test process, which reads nothing there."""
    return session_processes(str(work / "ray"), frozenset({os.getpid()}))


def _wait_gone(root: Path, seconds: float = 20) -> list[int]:
    """The processes of the Ray whose temp dir is ``root`` still alive after up to ``seconds`` (ray.shutdown
    and a watchdog do not wait for them to exit)."""
    deadline = time.monotonic() + seconds
    while (left := session_processes(str(root), frozenset({os.getpid()}))) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _runs(uri: str) -> list:
    c = tracking.client(uri)
    return c.search_runs([e.experiment_id for e in c.search_experiments()])


def _assert_clean_exit(driver: Driver, rc: int, expected: int, work: Path) -> None:
    out = driver.output
    assert rc == expected, out[-4000:]
    assert "Traceback" not in out and "Exception ignored" not in out, out[-4000:]
    assert "SIGTERM received at time" not in out  # Ray's fatal-signal handler (a core dump)
    name = signal.Signals(expected - 128).name
    assert any(line.startswith(f"bamray: stopped by {name}") for line in driver.lines), out[-2000:]
    left = _wait_gone(work / "ray")
    assert not left, f"Ray processes left: {left}"


def test_ctrl_c_during_start_up_exits_130_and_stops_ray(tiny_shards, work):
    driver = Driver(tiny_shards, work, epochs=2)
    time.sleep(3.0)  # the CLI is importing and checking; Ray starts next
    os.killpg(driver.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    rc = driver.finish(timeout=60)
    _assert_clean_exit(driver, rc, 130, work)
    # Ray's start-up is finished before the signal is acted on, so usually no run exists yet
    runs = _runs(driver.uri) if (work / "mlflow.db").exists() else []
    assert all(r.info.status == "KILLED" for r in runs), [r.info.status for r in runs]


def test_sigterm_during_training_kills_the_run_keeps_its_checkpoint_and_resumes(tiny_shards, work):
    driver = Driver(tiny_shards, work, epochs=3)
    driver.wait_for("epoch 1/3: ", timeout=150)  # the epoch line, as the console shows it
    driver.proc.send_signal(signal.SIGTERM)  # a scheduler's or `kill`'s signal, to the driver only
    rc = driver.finish(timeout=60)
    _assert_clean_exit(driver, rc, 143, work)
    (run,) = _runs(driver.uri)
    run_id = run.info.run_id
    assert run.info.status == "KILLED"
    assert f"--resume {run_id}" in run.data.tags[tracking.TAG_FAILURE]
    assert f"bamray train --resume {run_id}" in driver.output
    checkpoints = sorted(p for p in (work / "storage").glob("*/checkpoint_*") if p.is_dir())
    assert checkpoints, "no checkpoint kept"
    assert ckpt.load_training_state(checkpoints[0])["epoch"] == 1

    # ... and known to Ray Train (registered before the abort): the resumed run starts after it

    resumed = Driver(tiny_shards, work, 3, "--resume", run_id)
    assert resumed.finish(timeout=240) == 0, resumed.output[-4000:]
    run = tracking.client(driver.uri).get_run(run_id)
    assert run.info.status == "FINISHED" and int(run.data.tags["bamray.start_epoch"]) >= 1


def test_ray_killed_under_the_run_fails_it_in_one_message_and_it_resumes(tiny_shards, work):
    """Every process of the run's Ray killed at once (what `ray stop --force` or a lost head node does):
    no traceback, the run FAILED with the command that continues it, and that command finishes it. Another
    local Ray runs beside it throughout (two runs on one machine): the run's Ray processes must look up
    their own (Ray Train's placement-group cleaner used to raise "Found multiple active Ray instances"),
    and killing this run's Ray leaves the other one alone."""
    from orchestrator.cli import EXIT_FAILED

    other_dir = work / "other"
    other = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from orchestrator.local_ray import start_local_ray; "
            f"start_local_ray(1, _temp_dir={str(other_dir)!r}); print('up', flush=True); time.sleep(600)",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "up"
        ddp_stores = set(Path(tempfile.gettempdir()).glob(f"{STORE_PREFIX}*"))
        driver = Driver(tiny_shards, work, epochs=3)
        driver.wait_for("epoch 1/3: ", timeout=150)
        mine = frozenset({os.getpid(), driver.proc.pid, other.pid})
        ray_pids = session_processes(str(work / "ray"), mine)
        assert len(ray_pids) > 5, ray_pids  # GCS, raylet, agents, the Train controller, the worker ...
        for pid in ray_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        rc = driver.finish(timeout=120)
        out = driver.output
        assert rc == EXIT_FAILED, out[-4000:]
        assert "Traceback" not in out and "multiple active Ray instances" not in out, out[-4000:]
        (run,) = _runs(driver.uri)
        run_id = run.info.run_id
        assert run.info.status == "FAILED"
        reason = run.data.tags[tracking.TAG_FAILURE]
        assert reason.startswith("Ray stopped under the run (") and f"--resume {run_id}" in reason, reason
        assert "FAILED (Ray stopped under the run" in out and f"bamray train --resume {run_id}" in out, out[
            -3000:
        ]
        assert other.poll() is None and session_processes(str(other_dir), mine), "the other Ray was touched"

        resumed = Driver(tiny_shards, work, 3, "--resume", run_id)
        assert resumed.finish(timeout=240) == 0, resumed.output[-4000:]
        assert "multiple active Ray instances" not in resumed.output, resumed.output[-4000:]
        assert tracking.client(driver.uri).get_run(run_id).info.status == "FINISHED"
        # the killed group's DDP FileStore (its owner file unlocked by the kill) was removed by the resumed
        # run's rank 0, which removed its own at the end
        assert not set(Path(tempfile.gettempdir()).glob(f"{STORE_PREFIX}*")) - ddp_stores
    finally:
        os.killpg(other.pid, signal.SIGINT)
        other.wait(timeout=60)
        for pid in _wait_gone(other_dir):
            os.kill(pid, signal.SIGKILL)
