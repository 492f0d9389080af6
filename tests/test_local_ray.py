"""The local Ray that `bamray train` / `bamray sweep` start: no job-wide runtime environment, so the
processes Ray pre-starts serve the run's first actors, and no dashboard, so bamray's trainer leaves out
Ray Train's dashboard-only placement-group cleaner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from orchestrator.local_ray import session_processes

REPO = Path(__file__).resolve().parents[1]


def test_a_local_rays_first_actors_take_the_processes_ray_prestarted(tmp_path):
    """Ray pre-starts idle worker processes for the first driver; with a job-wide ``runtime_env`` (a worker
    set-up hook, once) no actor could use them and each started a process of its own (about 0.9 s of
    CPU each, twice, in a run's start-up). Without one, an actor created once they are up is one of them."""
    script = textwrap.dedent("""
        import os, shutil, tempfile, time, ray
        from orchestrator.local_ray import session_processes, start_local_ray
        temp_dir = tempfile.mkdtemp(prefix="lr", dir="/tmp")  # short: Ray's socket paths
        ctx = start_local_ray(2, _temp_dir=temp_dir, log_to_driver=False)
        assert ray.get_runtime_context().get_runtime_env_string() == "{}"

        def idle():
            found = set()
            for pid in session_processes(ctx.address_info["session_dir"], frozenset({os.getpid()})):
                try:
                    if open(f"/proc/{pid}/cmdline", "rb").read().startswith(b"ray::IDLE"):
                        found.add(pid)
                except OSError:
                    pass
            return found

        deadline = time.monotonic() + 60
        while not idle() and time.monotonic() < deadline:
            time.sleep(0.2)
        before = idle()

        @ray.remote(num_cpus=0)
        class Probe:
            def pid(self):
                return os.getpid()

        print("PRESTARTED", len(before), "ACTOR_IN_THEM", ray.get(Probe.remote().pid.remote()) in before)
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=REPO
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ACTOR_IN_THEM True" in out.stdout and "PRESTARTED 0" not in out.stdout, out.stdout[-2000:]


def test_the_trainer_leaves_out_the_cleaner_without_a_dashboard_and_the_datasets_callback_when_told(
    ray_local, monkeypatch
):
    """On a dashboard-less Ray (the suite's, as bamray's own) the trainer has Ray Train's default callbacks
    minus ``PlacementGroupCleanerCallback``; minus ``DatasetsCallback`` too (its ``DatasetManager`` would
    boot for nothing) only when the caller says its workers need no Ray Data context from it, since it also
    sets the driver's context in workers that get no datasets (a multi-worker ``data.stream: run`` run
    without k-NN sets). The private names it relies on still exist in this Ray."""
    import ray.data
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from orchestrator.training.trainer import dashboard_url, torch_trainer, trainer_class

    # Ray's TorchTrainer built torch-free (test_imports.test_the_driver_hands_ray_train_the_run_without_torch)
    base = trainer_class()

    assert dashboard_url() is None
    kwargs = {"run_config": RunConfig(name="cb", storage_path="/tmp")}
    with_data = dict(kwargs, datasets={"train": ray.data.range(4)})

    def kinds(trainer: TorchTrainer) -> list[type]:
        return [type(c) for c in trainer._create_default_callbacks()]

    theirs = kinds(TorchTrainer(lambda: None, **kwargs))
    assert PlacementGroupCleanerCallback in theirs and DatasetsCallback in theirs
    ours = torch_trainer(lambda: None, **kwargs)
    assert isinstance(ours, base) and type(ours) is not base
    no_cleaner = [c for c in theirs if c is not PlacementGroupCleanerCallback]
    assert kinds(ours) == no_cleaner
    assert kinds(torch_trainer(lambda: None, **with_data)) == no_cleaner
    told = torch_trainer(lambda: None, datasets_callback=False, **kwargs)
    assert kinds(told) == [c for c in no_cleaner if c is not DatasetsCallback]
    with pytest.raises(ValueError, match="datasets callback"):
        torch_trainer(lambda: None, datasets_callback=False, **with_data)
    # where a dashboard answers, the cleaner stays: Ray Train's own trainer unless told otherwise
    from orchestrator.training import trainer

    monkeypatch.setattr(trainer, "dashboard_url", lambda: "127.0.0.1:8265")
    assert type(torch_trainer(lambda: None, **with_data)) is base
    assert type(torch_trainer(lambda: None, **kwargs)) is base
    told = torch_trainer(lambda: None, datasets_callback=False, **kwargs)
    assert kinds(told) == [c for c in theirs if c is not DatasetsCallback]


def keep_local_ray(env: dict[str, str]) -> subprocess.Popen:
    """A process holding a local Ray (bamray's: loopback only) until a line reaches its stdin; it prints
    ``GCS <address>`` once Ray is up."""
    script = (
        "import shutil, sys, tempfile, ray\n"
        "from orchestrator.local_ray import start_local_ray\n"
        "d = tempfile.mkdtemp(prefix='bk', dir='/tmp')\n"
        "c = start_local_ray(4, _temp_dir=d, log_to_driver=False)\n"
        "print('GCS', c.address_info['gcs_address'], flush=True)\n"
        "sys.stdin.readline()\n"
        "ray.shutdown()\n"
        "shutil.rmtree(d, ignore_errors=True)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )


def test_another_process_joins_a_local_ray_by_its_address(tmp_path):
    """A Ray that bamray started listens on 127.0.0.1 only, with Ray's token authentication: a second
    process given its address (``train.address``) joins it on loopback and sends the token, where a plain
    ``ray.init(address=...)`` looks for it at the machine's routable address and is refused."""
    joiner = textwrap.dedent("""
        import sys, ray
        from orchestrator.local_ray import connect_or_start
        assert connect_or_start(sys.argv[1], num_cpus=1)  # joined, not started: 4 CPUs are the keeper's
        print("JOINED", ray.cluster_resources()["CPU"], ray.nodes()[0]["NodeManagerAddress"], flush=True)
        ray.shutdown()
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    kept = keep_local_ray(env)
    try:
        address = next(line.split()[1] for line in kept.stdout if line.startswith("GCS"))
        assert address.startswith("127.0.0.1:")
        out = subprocess.run(
            [sys.executable, "-c", joiner, address],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env=env,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert "JOINED 4.0 127.0.0.1" in out.stdout, out.stdout[-2000:]
    finally:
        kept.communicate("\n", timeout=60)


def test_loopback_mode_is_restored_after_init():
    """Ray's single-machine switch is flipped for ``ray.init`` only: a later ``ray.init(address=...)`` in
    the same process must see this machine's routable address again."""
    from ray._private import ray_constants

    from orchestrator.local_ray import _loopback_node

    before = ray_constants.ENABLE_RAY_CLUSTER
    with pytest.raises(RuntimeError), _loopback_node():
        assert ray_constants.ENABLE_RAY_CLUSTER is False
        raise RuntimeError("ray.init failed")
    assert ray_constants.ENABLE_RAY_CLUSTER == before


# A stand-in driver for the watchdog, no Ray: a "GCS" (the session dir on its command line) and an
# "agent" (a file in the session dir open, SIGTERM ignored, as a stuck agent) in sessions of their own,
# so that only the watchdog can end them.
FAKE_DRIVER = textwrap.dedent("""
    import os, subprocess, sys, time
    from orchestrator.local_ray import _start_watchdog
    session = sys.argv[1]
    gcs = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", session + "/gcs"],
                           start_new_session=True)
    agent = subprocess.Popen(
        [sys.executable, "-c", "import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "f = open(os.environ['AGENT_LOG'], 'w'); print('up', flush=True); time.sleep(300)"],
        env={**os.environ, "AGENT_LOG": session + "/agent.log"}, stdout=subprocess.PIPE, text=True,
        start_new_session=True)
    agent.stdout.readline()
    log = open(session + "/python-core-driver.log", "w")  # as Ray's driver: its log stays open
    _start_watchdog(session)
    print(gcs.pid, agent.pid, flush=True)
    time.sleep(300)
""")


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while any(_running(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _watchdog_of(driver: int) -> int:
    """The driver's watchdog child, once it runs its script (a freshly forked child shows the driver's
    command line)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                if parent == driver and b"local_ray.py" in Path(f"/proc/{entry}/cmdline").read_bytes():
                    return int(entry)
            except (OSError, IndexError):
                continue
        time.sleep(0.1)
    raise AssertionError("no watchdog started")


@pytest.fixture
def fake_driver(tmp_path):
    session = tmp_path / "session_fake"
    session.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", FAKE_DRIVER, str(session)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    gcs, agent = (int(x) for x in proc.stdout.readline().split())
    yield proc, gcs, agent, str(session)
    proc.kill()
    proc.wait()
    for pid in (gcs, agent):
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


def test_the_watchdog_ends_the_session_of_a_killed_driver(fake_driver):
    proc, gcs, agent, session = fake_driver
    watchdog = _watchdog_of(proc.pid)
    assert sorted(session_processes(session)) == sorted([proc.pid, gcs, agent])
    time.sleep(1)  # the watchdog has taken note of the "GCS"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _gone_within([gcs, agent], 15), "the watchdog left the session running"
    assert _gone_within([watchdog], 5)


def test_the_watchdog_leaves_when_the_session_ends(fake_driver):
    """After a ``ray.shutdown`` the driver lives on (the test suite, a second run): its watchdog cleans
    up what is left and exits instead of waiting for the driver."""
    proc, gcs, agent, session = fake_driver
    watchdog = _watchdog_of(proc.pid)
    time.sleep(1)
    os.kill(gcs, signal.SIGKILL)
    assert _gone_within([watchdog, agent], 15)
    time.sleep(0.5)
    assert proc.poll() is None, "the watchdog ended its own driver"
