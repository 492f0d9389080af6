"""Checks a job passes before it costs anything: before Ray starts (or right after connecting to a cluster)
and before any MLflow run is created.

Each check turns a request that can only fail slowly into a :class:`~trainers.options.ConfigError` naming
the field to fix, which the CLI prints as one line with exit code 2:

- resources: ``train.workers`` x ``train.cpus_per_worker`` / ``train.gpus_per_worker`` against what there
  is. Ray Train does not refuse an impossible request: it starts every worker it can place (100 workers
  on 2 cores took 14 GB of memory) and retries "worker group startup timed out" forever for a GPU that
  does not exist;
- the MLflow server: a TCP connect with a short timeout, because MLflow's HTTP retries times
  :func:`orchestrator.tracking.with_retry` hang for minutes on a dead address, printing nothing;
- the Ray address: the same TCP connect, before an MLflow run exists to be left behind;
- local directories (the SQLite store, ``train.storage_path``): created and written once, so a read-only
  path fails here rather than after Ray started and the run was created.

:func:`check_job` is what ``bamray train`` runs before anything starts; :func:`check_cluster_resources`
runs right after connecting to a cluster. A sweep runs both the same way, once for the per-trial config.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from trainers.options import ConfigError

#: seconds a TCP connect to the MLflow server or the Ray head may take before the job is refused
CONNECT_TIMEOUT_S = 3.0
#: the cluster config ``ray up`` leaves on the head node: its node types bound what the autoscaler can add
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml").expanduser()


# ---------------------------------------------------------------------------------------------- network
def check_reachable(host: str, port: int, field: str, what: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse with ``field`` named unless a TCP connection to ``host:port`` opens within ``timeout``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise ConfigError(
            field, f"cannot reach {what} at {host}:{port} ({reason} within {timeout:g} s); is it running?"
        ) from err


def check_tracking_uri(uri: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """An ``http(s)://`` MLflow server must accept a connection; an SQLite or file store's directory must
    be writable. Other schemes (``databricks``, database URIs) are left to MLflow."""
    parts = urlsplit(uri)
    field = "tracking.tracking_uri"
    if parts.scheme in ("http", "https"):
        if not parts.hostname:
            raise ConfigError(field, f"no host in {uri!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        check_reachable(parts.hostname, port, field, "the MLflow server", timeout)
    elif parts.scheme == "sqlite":
        from orchestrator.tracking import sqlite_path

        path = sqlite_path(uri)
        if path is not None:
            check_writable_dir(path.parent, field)
    elif parts.scheme in ("", "file"):
        check_writable_dir(Path(parts.path if parts.scheme else uri), field)


def ray_address(cfg: Any) -> tuple[str, str]:
    """``(address, field)``: ``train.address``, else ``RAY_ADDRESS``, else ``("", "")`` (a local Ray)."""
    if cfg.train.address:
        return cfg.train.address, "train.address"
    env = os.environ.get("RAY_ADDRESS", "")
    return (env, "RAY_ADDRESS") if env else ("", "")


def check_ray_address(address: str, field: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A ``host:port`` or ``ray://host:port`` address must accept a connection; ``auto`` / ``local`` are
    Ray's to resolve."""
    if not address or address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        port = parts.port
    except ValueError as err:
        raise ConfigError(field, f"bad port in {address!r}") from err
    if not parts.hostname or port is None:
        raise ConfigError(field, f"expected host:port or ray://host:port, got {address!r}")
    check_reachable(parts.hostname, port, field, "the Ray cluster", timeout)


# ---------------------------------------------------------------------------------------------- disk
def check_writable_dir(path: str | os.PathLike, field: str) -> None:
    """Create ``path`` if needed and write a file in it: the only test of writability that also holds
    for read-only mounts, ACLs and full disks."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".bamray-write-test-"):
            pass
    except OSError as err:
        raise ConfigError(field, f"cannot write to {str(path)!r}: {err.strerror or err}") from err


def check_storage_path(storage: str) -> None:
    """The Ray Train storage (absolute local path) must be writable; ``s3://`` / ``gs://`` are left to
    pyarrow, which needs credentials we do not probe."""
    from data.sources import is_uri

    if storage and not is_uri(storage):
        check_writable_dir(storage, "train.storage_path")


# ---------------------------------------------------------------------------------------------- resources
def required_resources(cfg: Any) -> dict[str, float]:
    """What the training workers ask for in all (0 workers = the loop in-process: one CPU, no GPU)."""
    workers = cfg.train.workers
    if workers == 0:
        return {"CPU": 1.0}
    need = {"CPU": workers * cfg.train.cpus_per_worker}
    if cfg.train.gpus_per_worker > 0:
        need["GPU"] = workers * cfg.train.gpus_per_worker
    return need


def stream_cpus(cfg: Any) -> float:
    """CPUs the training streams hold for the whole run: with ``data.stream: run`` each worker's map actors
    (``map_workers`` x ``map_cpus``); 0 with the per-epoch stream."""
    if cfg.data.stream != "run":
        return 0.0
    return max(cfg.train.workers, 1) * cfg.data.map_workers * cfg.data.map_cpus


def local_resources(cfg: Any) -> dict[str, float]:
    """This machine's CPUs and (only when asked for: importing CUDA costs time) GPUs."""
    have = {"CPU": float(os.cpu_count() or 1), "GPU": 0.0}
    if cfg.train.gpus_per_worker > 0:
        import torch

        have["GPU"] = float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0
    return have


def check_resources(cfg: Any, have: dict[str, float], where: str, *, streams: bool = True) -> None:
    """Refuse a request the workers cannot get from ``have`` (``where`` names it in the message).
    ``streams``: with ``data.stream: run`` count each worker's map actors too, which hold their CPUs for
    the whole run (a cluster without them would wait forever for the first batch); not for this machine's
    cores, which a local Ray oversubscribes with logical CPUs."""
    need = required_resources(cfg)
    t = cfg.train
    if need.get("GPU", 0.0) > have.get("GPU", 0.0) + 1e-9:
        raise ConfigError(
            "train.gpus_per_worker",
            f"{t.workers} worker(s) x {t.gpus_per_worker:g} GPU need {need['GPU']:g} GPU(s); {where} has "
            f"{have.get('GPU', 0.0):g}: lower train.gpus_per_worker (0 = CPU) or train.workers",
        )
    if need["CPU"] > have.get("CPU", 0.0) + 1e-9:
        raise ConfigError(
            "train.workers",
            f"{t.workers} worker(s) x {t.cpus_per_worker:g} CPU (train.cpus_per_worker) need "
            f"{need['CPU']:g} CPUs; {where} has {have.get('CPU', 0.0):g}: lower train.workers or "
            "train.cpus_per_worker",
        )
    d = cfg.data
    actors = stream_cpus(cfg)
    if streams and t.workers > 0 and actors and need["CPU"] + actors > have.get("CPU", 0.0) + 1e-9:
        raise ConfigError(
            "data.map_workers",
            f"data.stream: run gives each of the {t.workers} worker(s) {d.map_workers} map actor(s) x "
            f"{d.map_cpus:g} CPU (data.map_cpus) for the whole run: {actors:g} CPUs beside the workers' "
            f"{need['CPU']:g}; {where} has {have.get('CPU', 0.0):g}: lower data.map_workers or "
            "data.map_cpus, or use data.stream: epoch",
        )


def autoscaler_capacity(path: Path = BOOTSTRAP_CONFIG) -> dict[str, float] | None:
    """The most CPUs / GPUs a ``ray up`` cluster can reach: head plus every worker node type at its
    ``max_workers``, read from the cluster config the head keeps. None when there is none to read (a
    fixed cluster, or KubeRay, whose autoscaler reads its limits from Kubernetes)."""
    import yaml

    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    node_types = config.get("available_node_types") or {}
    total = {"CPU": 0.0, "GPU": 0.0}
    for name, node in node_types.items():
        count = 1 if name == config.get("head_node_type") else 0
        count += int(node.get("max_workers", 0) or 0)
        for key in total:
            total[key] += count * float((node.get("resources") or {}).get(key, 0.0))
    return total if node_types else None


def check_cluster_resources(cfg: Any) -> None:
    """Right after connecting: the request against the cluster's resources now, else against what its
    autoscaler can add (:func:`autoscaler_capacity`). When a cluster is short now and its limits are
    unknown, the job goes on with a warning: refusing it would break every autoscaling cluster whose
    worker nodes start at zero."""
    import ray

    have = {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    try:
        check_resources(cfg, have, "the Ray cluster")
        return
    except ConfigError as short_now:
        capacity = autoscaler_capacity()
        if capacity is not None:
            check_resources(cfg, capacity, "the cluster at its autoscaler's max_workers")
            return
        print(
            f"bamray: warning: {short_now.message.split(':')[0]} right now; waiting for the autoscaler to "
            "add nodes (Ctrl-C if this cluster does not autoscale)",
            file=sys.stderr,
            flush=True,
        )


def check_job(cfg: Any, tracking_uri: str, storage: str) -> None:
    """Everything that can be checked before Ray starts: the MLflow store, the Ray storage, the Ray
    address and, for a local Ray (started here or already initialised in this process), the resources."""
    check_tracking_uri(tracking_uri)
    check_storage_path(storage)
    if cfg.model.init_from:  # the weights must exist and fit the network before anything starts
        from orchestrator.downstream.init_from import init_weights

        init_weights(cfg)
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        check_cluster_resources(cfg)
        return
    address, field = ray_address(cfg)
    if address:
        check_ray_address(address, field)
    else:
        check_resources(cfg, local_resources(cfg), "this machine", streams=False)
