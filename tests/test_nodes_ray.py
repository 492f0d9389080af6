"""Losing a whole node in the middle of a 2-worker `bamray train` run, on one machine.

``ray.cluster_utils.Cluster`` runs a real multi-node Ray as local processes: a head with no CPUs (the
driver, Ray Train's controller and bamray's helper actors live there) and two worker nodes of 2 CPUs, so
every training worker and every Ray Data task runs on a worker node. The tiny run of conftest.py asks
1.5 CPUs a worker, so each worker node holds exactly one of the two workers. Every rank waits at a step
of epoch 2 (``debug.hold_at_step``), right after the checkpoint taken at that step
(``train.checkpoint_every_steps``) is registered; the test adds a fresh node (as an autoscaler would) and removes one
of the two with all its processes (as when a spot VM disappears). Ray Train must restart the worker group
from that checkpoint, inside epoch 2, on the nodes now alive, and the run must finish with every step's and every
epoch's metrics exactly once.

What this found: Ray Data's read tasks asked 1 CPU each, which a node with a 1.5-CPU worker never has
free, so the run waited forever for its first batch (reads now ask ``data.map_cpus``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import TINY_BATCH, TINY_N_TRAIN, tiny_train_settings

from orchestrator import checkpointing as ckpt
from orchestrator import tracking
from orchestrator.config import load_config
from orchestrator.local_ray import IDLE_WORKER_KEEP_MS
from orchestrator.metric_names import mlflow_key
from orchestrator.training.driver import run_training
from orchestrator.training.scratch import OWNER_SUFFIX
from orchestrator.training.worker import CHECKPOINT_SCRATCH

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SPE = TINY_N_TRAIN // (TINY_BATCH * 2)  # steps per epoch with 2 workers
HOLD_AT = SPE + 2  # the middle of epoch 2
NODE = {"num_cpus": 2, "object_store_memory": 150 * 2**20}
#: Ray notices a lost node within about 2 s instead of 15 (its defaults: a check every 3 s, 5 misses). And
#: the cluster keeps idle worker processes as bamray's cluster files do (``IDLE_WORKER_KEEP_MS``): each
#: worker node's CPUs are all held, where Ray's default restarts a process per Ray Data task (this run took
#: 5.2 min, a k-NN evaluation a minute).
HEAD_SYSTEM_CONFIG = {
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 4,
    "idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS,
}


@pytest.fixture
def storage():
    """Ray Train storage in a short /tmp path (socket / path length limits)."""
    d = Path(tempfile.mkdtemp(prefix="nls", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _tiny_cfg(shards: Path, storage: Path, uri: str, **extra):
    """The tiny run with 1.5 CPUs a worker: one worker per 2-CPU node."""
    settings = tiny_train_settings(
        **{
            "data.path": shards,
            "train.cpus_per_worker": 1.5,
            "train.storage_path": storage,
            "tracking.tracking_uri": uri,
            **extra,
        }
    )
    return load_config("bam_fmnist", [f"{k}={v}" for k, v in settings.items()])


def _assert_each_metric_once(uri: str, out: dict) -> None:
    c = tracking.client(uri)

    def steps(key: str) -> list[int]:
        return sorted(m.step for m in c.get_metric_history(out["run_id"], mlflow_key(key)))

    assert c.get_run(out["run_id"]).info.status == "FINISHED"
    assert steps("loss") == list(range(1, 2 * SPE + 1))
    assert steps("knn_top1") == [SPE, 2 * SPE] and steps("epoch_loss") == [SPE, 2 * SPE]
    state = ckpt.load_training_state(out["checkpoint"])
    assert state["epoch"] == 2 and state["engine"]["step"] == 2 * SPE


# ================================================================================================ node loss
@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="nl", dir="/tmp")
    c = Cluster(
        initialize_head=True,
        shutdown_at_exit=False,  # else add_node sets a SIGTERM handler: the test adds one from a thread
        head_node_args={
            **NODE,
            "num_cpus": 0,
            "include_dashboard": False,
            "temp_dir": temp_dir,
            "_system_config": HEAD_SYSTEM_CONFIG,
        },
    )
    for _ in range(2):
        c.add_node(**NODE)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, configure_logging=False)
    yield c
    ray.shutdown()
    c.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _checkpoint_registered(storage: Path) -> bool:
    """Ray Train's controller has the checkpoint of step ``HOLD_AT`` as its latest (it collects the workers'
    reports once per poll, so a checkpoint on disk is not yet one a restarted group starts from)."""
    for path in storage.rglob("checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(path.read_text()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):  # being rewritten
            continue
        if (latest.get("metrics") or {}).get("step") == HOLD_AT:
            return True
    return False


def _replace_a_node_once_held(cluster, storage: Path, log: list[str], timeout: float = 300) -> None:
    """Wait until both ranks hold at ``HOLD_AT`` and the epoch-1 checkpoint is registered, then add a fresh
    node and kill one of the two worker nodes."""
    deadline = time.monotonic() + timeout
    while len(list(storage.rglob(".hold_at_step.rank*"))) < 2 or not _checkpoint_registered(storage):
        if time.monotonic() > deadline:
            log.append("the workers never reached the hold step")
            return
        time.sleep(0.2)
    try:
        victim = next(iter(cluster.worker_nodes))
        cluster.add_node(**NODE)  # the replacement first: the restart must not wait for it
        log.append(victim.node_id)
        cluster.remove_node(victim, allow_graceful=False)
    except Exception as err:  # noqa: BLE001 - reported by the test, not lost in this thread
        log.append(f"{type(err).__name__}: {err}")


def test_losing_a_node_mid_epoch_resumes_on_a_new_node_with_each_metric_once(
    cluster, tiny_shards, storage, tmp_path
):
    import ray

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _tiny_cfg(
        tiny_shards,
        storage,
        uri,
        **{"train.max_failures": 1, "train.checkpoint_every_steps": HOLD_AT, "debug.hold_at_step": HOLD_AT},
    )
    killed: list[str] = []
    killer = threading.Thread(target=_replace_a_node_once_held, args=(cluster, storage, killed), daemon=True)
    killer.start()
    out = run_training(cfg)
    killer.join(timeout=60)

    assert len(killed) == 1 and len(killed[0]) == 56, killed  # a node id: the node was lost mid-run
    assert out["status"] == "FINISHED", out.get("reason")
    nodes = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
    assert nodes[killed[0]] is False and sum(nodes.values()) == 3  # head, the survivor, the new node
    # the new worker group resumed from the checkpoint taken at the hold step, inside epoch 2
    assert (out["worker_result"]["start_epoch"], out["worker_result"]["start_step"]) == (1, HOLD_AT)
    assert tracking.client(uri).get_run(out["run_id"]).data.tags["bamray.start_step"] == str(HOLD_AT)
    # every metric is there once
    _assert_each_metric_once(uri, out)
    # no checkpoint scratch dir outlives its process (a killed rank's is removed by the next checkpoint)
    assert not list(Path(tempfile.gettempdir()).glob(f"{CHECKPOINT_SCRATCH}*{OWNER_SUFFIX}"))
