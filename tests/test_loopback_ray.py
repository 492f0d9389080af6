"""The local Ray that `bamray train` starts listens on loopback only, and no process of it outlives a
killed driver.

Each test runs the driver in a fresh interpreter (the suite's own Ray, conftest, must not be the one
under test) that gets Ray the way `bamray train` does (``connect_or_start`` without an address) with its
own ``RAY_TMPDIR``. A session's processes are identified independently of the code under test: every
process of a local Ray descends from the driver (GCS, raylet, monitors; the agents and workers from the
raylet), so the driver's process tree is the session; the processes with the session dir on their
command line or open are added for the check after a kill, when the tree is gone. Other Rays on the
machine (other tests) are neither counted nor touched.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.local_ray import session_processes

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]

# The driver: Ray as `bamray train` gets it, a task and an actor (so worker processes listen too), with
# `train DIR` also a 2-worker TorchTrainer built as bamray builds it that holds after an all-reduce (so
# torch.distributed's rendezvous and gloo's connections are up); then wait to be killed or told to stop.
DRIVER = textwrap.dedent("""
    import sys, threading, time
    from pathlib import Path
    import ray
    from orchestrator.local_ray import connect_or_start
    assert connect_or_start(None, 2)

    @ray.remote
    def task():
        return 1

    @ray.remote(num_cpus=0)
    class Actor:
        def ping(self):
            return 2

    actor = Actor.remote()
    assert ray.get([task.remote(), actor.ping.remote()]) == [1, 2]
    if sys.argv[1:2] == ["train"]:
        from ray.train import RunConfig, ScalingConfig
        from orchestrator.training.trainer import torch_trainer

        work = Path(sys.argv[2])

        def loop(config):
            import torch, torch.distributed as dist
            t = torch.ones(1)
            dist.all_reduce(t)
            Path(config["dir"], f"ready{dist.get_rank()}").write_text(str(t.item()))
            while not Path(config["dir"], "stop").exists():
                time.sleep(0.2)

        trainer = torch_trainer(
            loop,
            train_loop_config={"dir": str(work)},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(storage_path=str(work), name="lb"),
        )
        fit = threading.Thread(target=trainer.fit, daemon=True)
        fit.start()
        deadline = time.monotonic() + 120
        while not all((work / f"ready{r}").exists() for r in (0, 1)):
            assert time.monotonic() < deadline and fit.is_alive(), "the workers never met"
            time.sleep(0.2)
    print("SESSION", ray.get_runtime_context().get_session_name(), flush=True)
    sys.stdin.readline()  # until the test closes stdin (or kills us)
    if sys.argv[1:2] == ["train"]:
        (work / "stop").write_text("")
        fit.join(60)
    ray.shutdown()
""")


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of ``pid``, or None once it is gone (or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else (int(fields[1]), int(fields[19]))


def _descendants(root: int) -> dict[int, int]:
    """Every process below ``root``: pid -> start time (a pid is only the same process with the same
    start time)."""
    children: dict[int, list[int]] = {}
    started: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            children.setdefault(st[0], []).append(int(entry))
            started[int(entry)] = st[1]
    found: dict[int, int] = {}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = started[child]
            todo.append(child)
    return found


def _still_running(procs: dict[int, int]) -> list[int]:
    return [pid for pid, start in procs.items() if (st := _stat(pid)) is not None and st[1] == start]


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()[:120]
    except OSError:
        return "?"


def listening_sockets(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, local address, port) of every TCP socket in LISTEN state that one of ``pids`` holds, from
    /proc/net/tcp and tcp6 (what ``ss -ltnp`` reads), mapped to processes through their fds' inodes."""
    inode_pid: dict[str, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inode_pid[link[8:-1]] = pid
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inode_pid:  # 0A: TCP_LISTEN
                continue
            hex_ip, hex_port = local.split(":")
            raw = bytes.fromhex(hex_ip)
            # /proc prints the address as 32-bit words in host byte order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.append((inode_pid[inode], socket.inet_ntop(family, raw), int(hex_port, 16)))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)  # [::ffff:127.0.0.1], how gRPC binds a dual-stack socket
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


@contextlib.contextmanager
def _driver(*args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """A running driver and its Ray session dir; afterwards nothing of it is left running."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="lb", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))
    with open(ray_tmp / "driver.err", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, *[a.replace("{tmp}", str(ray_tmp)) for a in args]],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=REPO,
            env=env,
        )
    tree: dict[int, int] = {}
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("SESSION "), (ray_tmp / "driver.err").read_text()[-3000:]
        session_dir = str(next(ray_tmp.rglob(line.split()[1])))
        tree = _descendants(proc.pid)
        yield proc, session_dir
    finally:
        if proc.poll() is None:
            tree.update(_descendants(proc.pid))
            proc.kill()
        proc.wait()
        for pid in _still_running(tree):  # a failed test must not leave its Ray behind
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture
def driver() -> Iterator[tuple[subprocess.Popen, str]]:
    with _driver() as running:
        yield running


def test_the_socket_reader_sees_a_socket_on_all_interfaces():
    """The check below can fail: a socket on 0.0.0.0 in this process is found and is not loopback."""
    with socket.socket() as wide, socket.socket() as narrow:
        wide.bind(("0.0.0.0", 0))
        narrow.bind(("127.0.0.1", 0))
        wide.listen()
        narrow.listen()
        mine = {(addr, port) for pid, addr, port in listening_sockets({os.getpid()})}
        assert ("0.0.0.0", wide.getsockname()[1]) in mine
        assert ("127.0.0.1", narrow.getsockname()[1]) in mine
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.0.2.2")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")


def test_a_local_ray_listens_on_loopback_only(driver):
    proc, session_dir = driver
    pids = {proc.pid, *_descendants(proc.pid), *session_processes(session_dir)}
    sockets = listening_sockets(pids)
    titles = {pid: _title(pid) for pid, _, _ in sockets}
    # GCS, raylet, driver and workers all serve gRPC: an empty list means the reader found nothing.
    assert any("gcs_server" in t for t in titles.values()) and any("raylet" in t for t in titles.values())
    assert proc.pid in titles
    wide = [(addr, port, titles[pid]) for pid, addr, port in sockets if not is_loopback(addr)]
    assert not wide, f"listening beyond loopback: {wide}"


def test_distributed_training_on_a_local_ray_listens_on_loopback_only():
    """Ray's own torch set-up has rank 0's rendezvous store listen on every interface (``::``) and gloo on
    the host name's address; bamray's torch config keeps a one-node group on a FileStore and loopback,
    and leaves Ray Train's controller free of torch. On this dashboard-less Ray the trainer starts no
    placement-group cleaner (:mod:`orchestrator.training.trainer`)."""
    from orchestrator.training import loopback_ddp

    stores = set(Path(tempfile.gettempdir()).glob(f"{loopback_ddp.STORE_PREFIX}*"))
    with _driver("train", "{tmp}") as (proc, session_dir):
        work = Path("/tmp", Path(session_dir).relative_to("/tmp").parts[0])  # the driver's "{tmp}"
        assert (work / "ready0").read_text() == (work / "ready1").read_text() == "2.0"  # the all-reduce ran
        pids = {proc.pid, *_descendants(proc.pid), *session_processes(session_dir)}
        sockets = listening_sockets(pids)
        titles = {pid: _title(pid) for pid, _, _ in sockets}
        assert sum("RayTrainWorker" in t for t in titles.values()) >= 2, titles  # the workers were read
        wide = [(addr, port, titles[pid]) for pid, addr, port in sockets if not is_loopback(addr)]
        assert not wide, f"listening beyond loopback: {wide}"
        assert set(Path(tempfile.gettempdir()).glob(f"{loopback_ddp.STORE_PREFIX}*")) - stores  # a FileStore
        # and the controller, which unpickles the torch config, never imported torch (a start-up cost)
        controllers = [p for p in pids if "TrainController" in _title(p)]
        assert controllers, {p: _title(p) for p in pids}
        assert not any("libtorch" in Path(f"/proc/{p}/maps").read_text() for p in controllers)
        assert all(
            "libtorch" in Path(f"/proc/{p}/maps").read_text()
            for p, _, _ in sockets
            if "RayTrainWorker" in titles[p]
        )
        # Ray Train's cleaner (a detached actor, "ray::PlacementGroupCleaner") was not started
        actors = [_title(p) for p in pids if _title(p).startswith("ray::")]
        assert any("TrainController" in t for t in actors) and not any(
            "PlacementGroup" in t for t in actors
        ), actors
    # Ray's private helpers the backend reuses are still there
    from ray.train.torch import config as ray_torch_config

    assert callable(ray_torch_config._setup_torch_process_group)
    assert callable(ray_torch_config._set_torch_distributed_env_vars)
    assert callable(ray_torch_config._shutdown_torch)


def test_no_process_of_a_local_ray_outlives_its_killed_driver(driver):
    proc, session_dir = driver
    tree = _descendants(proc.pid)
    titles = " | ".join(_title(pid) for pid in tree)
    assert "raylet" in titles and "ray::DashboardAgent" in titles and "ray::RuntimeEnvAgent" in titles
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while True:
        left = set(_still_running(tree)) | set(session_processes(session_dir))
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left, f"still running 30 s after the driver was killed: {[_title(p) for p in left]}"
