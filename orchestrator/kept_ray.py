"""``bamray ray up | down | status``: one local Ray kept between runs, which ``bamray train`` joins when it is
given no address.

Why: a run that starts its own Ray boots Ray's processes (GCS, raylet, dashboard head and agent,
runtime-env agent, log and autoscaler monitors: about 4.4 CPU-seconds here) and Ray Data's two helper
actors, and waits for them. ``python -m bench --only startup`` on 2026-12-04: launch to first step 17.0 s
with a Ray of its own, 13.3 s joining one that is already up. ``ray start --head`` is no substitute: it
binds its servers on every interface. This keeps bamray's own local Ray (loopback only, Ray's token
authentication, ended by a watchdog if its holder dies: :func:`orchestrator.local_ray.start_local_ray`),
held by a small detached process.

That process writes ``{"address", "pid", "cpus", "session_dir"}`` to :func:`state_path` once Ray is up;
``down`` sends it SIGTERM, and it shuts Ray down and removes the file. A file whose process is gone is
stale: ignored and removed. A run joins the kept Ray only when it has the logical CPUs the run would have
given its own Ray and the run asks for no GPU; otherwise it starts its own, as before, and says why.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainers.fileio import atomic_write, user_cache_dir

#: How long ``up`` waits for the keeper's Ray, and ``down`` for the keeper to end.
UP_TIMEOUT_S = 120.0
DOWN_TIMEOUT_S = 60.0
DEFAULT_CPUS = 4


@dataclass(frozen=True)
class KeptRay:
    address: str
    pid: int
    cpus: float
    session_dir: str


def state_path() -> Path:
    """Where the kept Ray's address lives (one per user and machine: bamray's user cache)."""
    return user_cache_dir() / "kept-ray.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process reuses the pid: not our keeper
        return False
    return True


def kept() -> KeptRay | None:
    """The kept Ray, or None (no file, a stale one, which is removed, or an unreadable one)."""
    path = state_path()
    try:
        state = json.loads(path.read_text())
        ray = KeptRay(
            str(state["address"]), int(state["pid"]), float(state["cpus"]), str(state["session_dir"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _alive(ray.pid):
        path.unlink(missing_ok=True)
        return None
    return ray


def address_for_run(cpus_needed: float, gpus: bool) -> str | None:
    """The kept Ray's address when a run of ``cpus_needed`` logical CPUs and no GPU fits it, else None
    (with a line saying why the run starts its own)."""
    ray = kept()
    if ray is None:
        return None
    if gpus or ray.cpus < cpus_needed:
        from orchestrator import console

        why = "asks for GPUs" if gpus else f"needs {cpus_needed:g} logical CPUs and it has {ray.cpus:g}"
        console.say(f"not joining the Ray kept by `bamray ray up` (the run {why}): starting one for this run")
        return None
    return ray.address


def join_for_run(cpus: float, train_cpus: float, gpus: bool) -> bool:
    """Connect this process to the kept Ray for a run that would give its own Ray ``cpus`` logical CPUs,
    ``train_cpus`` of them for its workers; True once joined. False, and a line saying why where a Ray is
    kept, when there is none, the run does not fit it, it does not answer, or another run holds the CPUs
    now (this one would wait for them without a word): the caller starts a Ray of its own. False as well
    when this process already holds a Ray (a notebook's, a test's): the run uses that one, and it is not
    this call's to shut down."""
    import ray

    if ray.is_initialized():
        return False
    address = address_for_run(cpus, gpus)
    if address is None:
        return False

    from orchestrator import console
    from orchestrator.local_ray import connect_or_start

    try:
        connect_or_start(address, int(cpus))
    except ConnectionError as err:
        console.say(f"the Ray kept by `bamray ray up` did not answer ({err}): starting one for this run")
        return False
    if has_room(train_cpus):
        console.say(f"joined the local Ray kept by `bamray ray up` ({address})")
        return True
    ray.shutdown()
    return False


def has_room(train_cpus: float) -> bool:
    """Whether the Ray this process is connected to has ``train_cpus`` CPUs free now; says so when not."""
    import ray

    free = float(ray.available_resources().get("CPU", 0.0))
    if free >= train_cpus:
        return True
    from orchestrator import console

    console.say(
        f"the Ray kept by `bamray ray up` has {free:g} CPUs free and the run needs {train_cpus:g} (another run "
        "holds them): starting one for this run"
    )
    return False


def up(cpus: int = DEFAULT_CPUS) -> KeptRay:
    """Start the keeper (detached: its own session, its output in a log beside the state file) and wait
    until its Ray is up; the one already kept if there is one."""
    current = kept()
    if current is not None:
        return current
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    log = path.with_suffix(".log")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.kept_ray", str(int(cpus))],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in this terminal does not reach it
            env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"),
        )
    deadline = time.monotonic() + UP_TIMEOUT_S
    while time.monotonic() < deadline:
        ray = kept()
        if ray is not None and ray.pid == proc.pid:
            return ray
        if proc.poll() is not None:
            raise RuntimeError(f"the kept Ray did not start (exit {proc.returncode}); its log: {log}")
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"the kept Ray did not start within {UP_TIMEOUT_S:.0f} s; its log: {log}")


def down() -> KeptRay | None:
    """Stop the kept Ray (None when there was none); returns once its keeper has ended."""
    ray = kept()
    if ray is None:
        return None
    os.kill(ray.pid, signal.SIGTERM)
    deadline = time.monotonic() + DOWN_TIMEOUT_S
    while _alive(ray.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(ray.pid):
        os.kill(ray.pid, signal.SIGKILL)  # its watchdog then ends what is left of the session
    state_path().unlink(missing_ok=True)
    return ray


def _keep(cpus: int) -> None:
    """The keeper: bamray's local Ray, its address in the state file, until SIGTERM / SIGINT."""
    import ray

    from orchestrator.local_ray import start_local_ray

    context = start_local_ray(cpus, log_to_driver=False)
    stop: list[bool] = []
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, so that they are ours
        signal.signal(sig, lambda *_: stop.append(True))
    info: dict[str, Any] = context.address_info
    state = {
        "address": info["gcs_address"],
        "pid": os.getpid(),
        "cpus": cpus,
        "session_dir": info["session_dir"],
    }
    atomic_write(state_path(), lambda tmp: Path(tmp).write_text(json.dumps(state)))
    print(f"kept Ray at {state['address']} ({cpus} logical CPUs), session {state['session_dir']}", flush=True)
    try:
        while not stop:
            time.sleep(0.5)
    finally:
        ray.shutdown()
        with_pid = kept()
        if with_pid is None or with_pid.pid == os.getpid():
            state_path().unlink(missing_ok=True)


if __name__ == "__main__":
    _keep(int(sys.argv[1]))
