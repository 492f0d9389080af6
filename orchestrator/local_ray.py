"""The local Ray that ``bamray train`` / ``bamray sweep`` start when no cluster address is given.

Kept free of heavy imports: this file runs as the watchdog script (``python -I local_ray.py``, see
:func:`_watch`), so importing it must cost nothing.

Two properties of a local Ray that plain ``ray.init()`` lacks:

* **Loopback only.** ``ray.init()`` on Linux binds the GCS, the raylet, every worker's and actor's gRPC
  server (``*``), the metrics servers (``0.0.0.0``) and the agents (the machine's routable address) beyond
  this machine, although nothing outside it ever talks to a single-node Ray. Ray has a loopback mode
  (the node address is 127.0.0.1 and every server follows it), but only behind the start-up switch it
  uses on macOS and Windows; ``_node_ip_address="127.0.0.1"`` alone is rewritten to the routable address.
* **Dies with the driver.** When the driver is killed (SIGKILL, OOM), the GCS, raylet and workers follow
  within seconds, but the DashboardAgent and RuntimeEnvAgent notice the dead raylet, then block for 60 s
  trying to report it to the (equally dead) GCS, listening all the while. A watchdog process cleans up
  every process of the session once the driver is gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

#: The one address a local Ray binds to.
LOOPBACK = "127.0.0.1"
#: How often the watchdog checks that the driver is alive, and how long processes get between SIGTERM
#: and SIGKILL once it is not.
_WATCH_INTERVAL_S = 0.5
_TERM_GRACE_S = 3.0


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """Ray's single-machine mode for the duration of ``ray.init``: with it off, Ray takes 127.0.0.1 as
    this node's address (instead of rewriting it to a routable one) and every process it starts binds
    there. It is a module constant read from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when Ray is imported,
    which has happened long before, hence set here and restored afterwards: a later ``ray.init(address=...)``
    in the same process must find the cluster's view of this machine again. The started processes only
    need the address they are given on their command lines."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


#: Ray Train 2.60's switch for its PreemptionWatcher actor (ray.train.v2._internal.constants)
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"

#: How long a node's raylet keeps an idle worker process beyond its soft limit before ending it (Ray's
#: ``idle_worker_killing_time_threshold_ms``, 1 s by default; set per node through this variable, or for a
#: whole cluster in the head's system config). The soft limit is the node's *unallocated* CPUs, so on a node
#: whose CPUs are all held (training workers asking the node's CPUs, or trials packed onto it) Ray ends every
#: Ray Data map task's process a second after the task: the next task starts a new process that imports
#: torch again. Measured on a 3-node local cluster (2 CPUs a node, a 1.5-CPU training worker on each, as in
#: ``tests/test_nodes_ray.py``): a tiny 2-epoch run took 185 s, its first k-NN evaluation 61 s and its second
#: epoch's first batch 35 s, with 14 processes started one after another; keeping them 60 s: 51-58 s,
#: 1.9-3.1 s and 0.4-0.5 s. The cluster files set it on every node; a minute bounds what idle processes
#: hold, and covers the gaps between a stream's tasks and between an epoch's stream and its k-NN sets.
IDLE_WORKER_KEEP_ENV = "RAY_idle_worker_killing_time_threshold_ms"
IDLE_WORKER_KEEP_MS = 60_000


def start_local_ray(num_cpus: int, **kwargs: Any) -> Any:
    """``ray.init`` of a local, dashboard-less Ray (the dashboard is a server we do not need here) that
    listens on 127.0.0.1 only and whose processes a watchdog ends when this process dies without shutting
    Ray down. Returns ``ray.init``'s context.

    No job-wide ``runtime_env``: Ray pre-starts idle worker processes when the first driver connects, and
    only tasks and actors of the job's own runtime environment can use them; with one set, those
    processes boot for nothing while Ray Data's and the run's helper actors each start another."""
    import ray

    kwargs.setdefault("_node_ip_address", LOOPBACK)
    # Ray Train's watcher of cloud preemption notices is one more actor process per run: one machine that
    # is preempted takes the whole local Ray with it, so there is nothing for it to watch here
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    with _loopback_node():
        context = ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            **kwargs,
        )
    _start_watchdog(context.address_info["session_dir"])
    return context


def _start_watchdog(session_dir: str) -> None:
    """Run this file as a detached process that outlives this one by a few seconds (see :func:`_watch`).
    ``-I`` and no Ray import: it starts in milliseconds. Its own session and /dev/null for every stream, so
    a Ctrl-C in the terminal does not reach it and a caller reading this process's output is not kept
    waiting for it."""
    import subprocess

    subprocess.Popen(
        [sys.executable, "-I", os.path.abspath(__file__), str(os.getpid()), session_dir],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def session_processes(
    session_dir: str, exclude: frozenset[int] = frozenset(), open_files: bool = True
) -> list[int]:
    """PIDs of this user's processes that belong to the Ray session in ``session_dir``: its path on their
    command line (GCS, raylet, monitors) or, with ``open_files``, a file under it open (every worker and
    agent logs there; their command lines are rewritten to ``ray::...``)."""
    prefix = session_dir.rstrip("/") + "/"
    uid = os.getuid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        proc = f"/proc/{entry}"
        try:
            if os.stat(proc).st_uid != uid:
                continue
            with open(f"{proc}/cmdline", "rb") as f:
                if prefix.encode() in f.read():
                    found.append(int(entry))
                    continue
            if not open_files:
                continue
            for fd in os.listdir(f"{proc}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"{proc}/fd/{fd}").startswith(prefix):
                        found.append(int(entry))
                        break
        except OSError:  # exited meanwhile, or not ours to look into
            continue
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def _watch(driver_pid: int, session_dir: str) -> None:
    """Wait until the driver died or its Ray session ended, then end what is left of the session: SIGTERM,
    and SIGKILL after :data:`_TERM_GRACE_S` for what is still there. After a clean ``ray.shutdown``
    nothing is left and this just exits (so a long-lived process starting many local Rays, the test
    suite, does not collect watchdogs). The driver is our parent; once it dies we are re-parented, so a
    changed parent PID is its death (a pipe would stay open in any child the driver forked). The
    session has ended once its GCS, raylet and monitors (the processes named by their command lines)
    are all gone."""
    me = frozenset({os.getpid(), driver_pid})  # the driver holds its Ray log open: never ours to end
    core = session_processes(session_dir, me, open_files=False)
    while os.getppid() == driver_pid and any(_alive(pid) for pid in core):
        time.sleep(_WATCH_INTERVAL_S)
    pids = session_processes(session_dir, me)
    if not pids:
        return
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + _TERM_GRACE_S
    while time.monotonic() < deadline:
        time.sleep(0.2)
        pids = session_processes(session_dir, me)
        if not pids:
            return
    _signal_all(pids, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running: a zombie (exited, not yet reaped by the driver) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def send_token_when_one_exists() -> None:
    """Authenticate like ``ray start`` does. Ray >= 2.5x turns token authentication on for clusters
    started where a token exists (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN[_PATH]``), but a plain client
    process only sends the token when ``RAY_AUTH_MODE=token``: without this every request to such a
    cluster fails ("Authentication token is missing or incorrect"). An explicit ``RAY_AUTH_MODE`` is
    respected."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token auth helpers: nothing to do
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def connect_or_start(address: str | None, num_cpus: int, num_gpus: int | None = None) -> bool:
    """The one way bamray gets a Ray: reuse an initialised one; else ``address`` / ``RAY_ADDRESS`` (a cluster,
    or a submitted job's); else :func:`start_local_ray` with ``num_cpus`` logical CPUs (and ``num_gpus``).
    Returns True when this call connected or started Ray, so the caller knows to shut it down."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    from orchestrator.console import quiet_driver_loggers, route_ray_output

    quiet_driver_loggers()
    if address:
        # a Ray that bamray started on this machine listens on 127.0.0.1 only: join it the way it was
        # started, or Ray rewrites the address to the machine's routable one, where nothing listens
        host = address.split("://")[-1].rsplit(":", 1)[0]
        send_token_when_one_exists()
        with _loopback_node() if host in (LOOPBACK, "localhost") else contextlib.nullcontext():
            ray.init(address=address)
    else:
        start_local_ray(num_cpus, **({"num_gpus": num_gpus} if num_gpus is not None else {}))
    route_ray_output()
    return True


if __name__ == "__main__":
    _watch(int(sys.argv[1]), sys.argv[2])
