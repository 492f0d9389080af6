"""The autoscaler adding a node for a `bamray sweep` whose trials need CPUs the head does not have, the
trials training there, and the autoscaler removing the node once idle, on one machine.

Ray's own autoscaler test harness runs here: ``ray start --head --autoscaling-config`` with the
``fake_multinode`` provider (``RAY_FAKE_CLUSTER=1``), the real autoscaler whose "instances" are local
raylet processes. The worker node type is ``orchestrator/cluster/aws.yaml``'s own (its resources as
written, ``max_workers`` capped at 2; the GPU it declares is a logical resource here, the run asks none);
the head offers no CPUs, so nothing trains until the autoscaler adds a node.

Losing a node is not tested with this harness: its provider keeps a node killed outside it (as a spot VM
disappears) as "pending" forever and counts its CPUs, so no replacement is ever launched and Ray Train's
worker group start-up times out. A real cloud provider reports the instance gone. Node loss is tested
with ``ray.cluster_utils.Cluster`` instead (``tests/test_nodes_ray.py``).

Ray 2.60 turns token authentication on for a cluster started with ``ray start``; the harness's fake
nodes do not carry the token, so this cluster runs with ``RAY_AUTH_MODE=disabled`` for the length of the
test. It is not loopback-only: ``ray start`` on Linux binds the host's routable address whatever
``--node-ip-address`` says (``orchestrator/local_ray.py`` explains the switch bamray's own local Ray uses,
which a multi-node ``ray start`` refuses), so for those minutes its GCS is open on the host's network.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY_BATCH, TINY_N_TRAIN, free_port, ray_head, tiny_train_settings

from orchestrator import tracking
from orchestrator.config import load_config
from orchestrator.sweep import run_sweep

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SPE = TINY_N_TRAIN // TINY_BATCH  # steps per epoch of a 1-worker trial
NODE_TYPE = "ray.worker.gpu"  # aws.yaml's worker node type
IDLE_TIMEOUT_MIN = 0.1


def _autoscaling_config(port: int, path: Path) -> None:
    """aws.yaml's worker node type on the fake provider, behind a head without CPUs."""
    aws = yaml.safe_load((REPO / "orchestrator/cluster/aws.yaml").read_text())
    worker = aws["available_node_types"][NODE_TYPE]
    config = {
        "cluster_name": "bamray-fake",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{port}",
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            NODE_TYPE: {
                "resources": dict(worker["resources"]),
                "node_config": {},
                "min_workers": int(worker.get("min_workers", 0)),
                "max_workers": min(2, int(worker["max_workers"])),
            },
        },
        "head_node_type": "ray.head.default",
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands")},
        **{k: [] for k in ("worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "auth": {"ssh_user": "ubuntu"},
    }
    path.write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def cluster():
    """``(address, temp dir)`` of a running autoscaling cluster; this process is not connected to it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    port = free_port()
    config = Path(tempfile.mkdtemp(prefix="asc", dir="/tmp")) / "autoscaler.yaml"
    _autoscaling_config(port, config)
    auth = {"RAY_AUTH_MODE": "disabled"}
    env = {
        **os.environ,
        **auth,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "5",  # a lost node is replaced after 5 s, not 30
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    args = [f"--port={port}", "--num-cpus=0", f"--autoscaling-config={config}", "--include-dashboard=false"]
    address = f"127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)
    try:
        with ray_head(args, lambda: _connect_once(address), env, prefix="as") as temp_dir:
            yield address, temp_dir
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        config.unlink(missing_ok=True)
        config.parent.rmdir()


def _connect_once(address: str) -> None:
    import ray

    ray.init(address=address, log_to_driver=False, configure_logging=False)
    ray.shutdown()


def _worker_nodes() -> dict[str, bool]:
    """node id -> alive, for every node that offers CPUs (the head offers none)."""
    import ray

    return {
        n["NodeID"]: n["Alive"] for n in ray.nodes() if n["Resources"].get("CPU", 0) > 0 or not n["Alive"]
    }


def test_autoscaler_adds_a_node_for_a_sweep_and_removes_it_when_idle(cluster, tiny_shards, tmp_path):
    """Two trials at once (a grid over ``method.reg``), each a 1-worker Ray Train run of one epoch: every
    trial driver, Train worker and map task needs CPUs, the head has none, so all of them run on the node
    the autoscaler adds for them. The node must then be removed: it was not, before the sweep's driver
    pinned Ray Data's detached helper actors to the head (:func:`data.run_actors.pin_ray_data_singletons`)."""
    import ray

    address, temp_dir = cluster
    storage = Path(tempfile.mkdtemp(prefix="ass", dir="/tmp"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = tiny_train_settings(
        **{
            "data.path": tiny_shards,
            "train.storage_path": storage,
            "tracking.tracking_uri": uri,
            "train.workers": 1,
            "optim.epochs": 1,
            "optim.warmup_epochs": 0,
        }
    )
    cfg = load_config("bam_fmnist", [f"{k}={v}" for k, v in settings.items()])
    space = {"name": "reg", "params": {"method.reg": {"type": "grid", "values": [0.05, 0.1]}}}
    t0 = time.monotonic()
    out = run_sweep(
        cfg,
        space,
        trials=2,
        scheduler="fifo",
        max_concurrent=2,
        storage_path=str(storage),
        name="autoscaled",
        tracking_uri=uri,
        address=address,
    )
    wall = time.monotonic() - t0

    assert not out["interrupted"] and len(out["trials"]) == 2, out
    assert sorted(r["params"]["method.reg"] for r in out["trials"]) == [0.05, 0.1]
    c = tracking.client(uri)
    for row in out["trials"]:
        assert row["status"] == "completed" and row["epochs"] == 1, row
        run = c.get_run(row["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "train/loss")) == list(
            range(1, SPE + 1)
        )
    monitor = (Path(temp_dir) / "session_latest" / "logs" / "monitor.log").read_text()
    assert re.search(rf"Adding \d+ node\(s\) of type {re.escape(NODE_TYPE)}", monitor)  # aws.yaml's node type

    ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        nodes = _worker_nodes()
        assert len(nodes) >= 1  # the trials' node (the head has no CPUs, so they trained there)
        deadline = time.monotonic() + 120
        while any(_worker_nodes().values()) and time.monotonic() < deadline:
            time.sleep(1)
        assert not any(_worker_nodes().values()), f"idle nodes still up {IDLE_TIMEOUT_MIN} min after the run"
    finally:
        ray.shutdown()
    monitor = (Path(temp_dir) / "session_latest" / "logs" / "monitor.log").read_text()
    assert f"nodes of type {NODE_TYPE} (idle)" in monitor
    shutil.rmtree(storage, ignore_errors=True)
    print(f"autoscaled sweep: {wall:.0f} s", file=sys.stderr)
