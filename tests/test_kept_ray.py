"""``bamray ray up | down | status`` (:mod:`orchestrator.kept_ray`): a local Ray kept between runs, which
``bamray train`` joins when it fits the run, and which ``down`` ends with every process of its session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import tiny_train_settings

from orchestrator import kept_ray
from orchestrator.local_ray import session_processes


def _state(cache: Path, **fields: object) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    state = {"address": "127.0.0.1:1", "pid": os.getpid(), "cpus": 4, "session_dir": "/nowhere", **fields}
    (cache / "kept-ray.json").write_text(json.dumps(state))


def test_a_run_joins_the_kept_ray_only_when_it_fits(tmp_path, monkeypatch, capsys):
    """The kept Ray's logical CPUs must cover what the run would give its own Ray, and a GPU run starts its
    own (the kept one was started without asking for GPUs); a state file whose process is gone is stale."""
    monkeypatch.setenv("BAMRAY_CACHE_DIR", str(tmp_path))
    assert kept_ray.kept() is None and kept_ray.address_for_run(4, False) is None
    _state(tmp_path)  # "kept" by this very process: alive
    assert kept_ray.address_for_run(4, False) == "127.0.0.1:1"
    assert kept_ray.address_for_run(5, False) is None
    assert "needs 5 logical CPUs and it has 4" in capsys.readouterr().out
    assert kept_ray.address_for_run(2, True) is None
    assert "asks for GPUs" in capsys.readouterr().out
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    _state(tmp_path, pid=int(gone.stdout))
    assert kept_ray.kept() is None and not (tmp_path / "kept-ray.json").exists()


def test_bamray_ray_up_keeps_a_ray_that_train_joins_and_down_ends_it(tmp_path, tiny_shards):
    cache = tmp_path / "cache"
    env = dict(os.environ, BAMRAY_CACHE_DIR=str(cache), RAY_USAGE_STATS_ENABLED="0")
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)

    def bamray(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "orchestrator", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    assert bamray("ray", "status").stdout.strip() == "no local Ray is kept"
    up = bamray("ray", "up", "--cpus", "4")
    assert up.returncode == 0, up.stderr[-3000:]
    state = json.loads((cache / "kept-ray.json").read_text())
    try:
        assert state["address"].startswith("127.0.0.1:") and state["cpus"] == 4
        assert bamray("ray", "up").stdout == up.stdout  # the same Ray again, not a second one
        settings = tiny_train_settings(
            **{
                "train.workers": 1,
                "optim.epochs": 1,
                "optim.warmup_epochs": 0,
                "data.path": str(tiny_shards),
                "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                "train.storage_path": str(tmp_path / "ray_results"),
            }
        )
        sets = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
        train = bamray("train", "--config", "bam_fmnist", *sets, timeout=600)
        out = train.stdout + train.stderr
        assert train.returncode == 0, out[-4000:]
        assert f"joined the local Ray kept by `bamray ray up` ({state['address']})" in out
        assert ": FINISHED" in out
        # the run disconnected; the kept Ray lives on
        assert f"process {state['pid']}" in bamray("ray", "status").stdout
    finally:
        down = bamray("ray", "down")
    assert down.stdout.strip() == f"stopped the local Ray at {state['address']}", down.stderr[-2000:]
    assert not (cache / "kept-ray.json").exists()
    deadline = time.monotonic() + 15  # the keeper's watchdog ends what ray.shutdown left
    while session_processes(state["session_dir"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert session_processes(state["session_dir"]) == []
    assert bamray("ray", "down").stdout.strip() == "no local Ray is kept"


def test_a_kept_ray_whose_cpus_another_run_holds_is_left_for_a_ray_of_the_runs_own(ray_local, capsys):
    """Joined, the kept Ray must have the run's CPUs free now: with another run holding them this one would
    wait for them without a word, so it says why and starts a Ray of its own instead."""

    @ray_local.remote(num_cpus=3)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    ray_local.get(holder.ready.remote())
    deadline = time.monotonic() + 10  # the resource view follows the actor's placement
    while ray_local.available_resources().get("CPU", 0.0) > 1.0 and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        assert kept_ray.has_room(1.0)
        assert not kept_ray.has_room(2.0)
        assert "has 1 CPUs free and the run needs 2 (another run holds them)" in capsys.readouterr().out
    finally:
        ray_local.kill(holder)


def test_a_process_that_already_holds_a_ray_keeps_it(ray_local, tmp_path, monkeypatch, capsys):
    """A run in a process that holds a Ray (a notebook's, this test's) uses that one: it must not report
    joining the kept Ray, nor claim the Ray as its own to shut down at the end (``join_for_run`` True)."""
    monkeypatch.setenv("BAMRAY_CACHE_DIR", str(tmp_path))
    _state(tmp_path)  # a kept Ray that would fit the run
    assert kept_ray.address_for_run(4, False) == "127.0.0.1:1"
    assert kept_ray.join_for_run(4, 1.0, False) is False
    assert "joined" not in capsys.readouterr().out
    assert ray_local.is_initialized()
