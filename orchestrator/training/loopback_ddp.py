"""torch.distributed on one machine without a socket beyond 127.0.0.1.

Ray Train's torch backend has rank 0 start torch's rendezvous ``TCPStore``, and the store listens on every
interface (``::``): torch has no option to bind it to one address. Gloo's connections between ranks
listen on the address the host name resolves to, usually a routable one. On a single-node run both are
needless exposure, which a local ``bamray train`` otherwise avoids (:mod:`orchestrator.local_ray`).

So when every worker of the group is on one node, :class:`LoopbackTorchConfig`'s backend rendezvouses
through a ``FileStore`` in that node's temp directory (no listening socket at all; owned by rank 0, so that
a killed group's file is removed by the next group on the node) and points gloo and
NCCL at the loopback interface (``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``, unless already set). A
group spread over several nodes gets Ray's own set-up unchanged. The decision is taken at every group
start, so a group restarted on other nodes after a failure is set up for where it now runs.

It does ``_TorchBackend.on_start``'s steps and reuses three of Ray's private helpers
(``_set_torch_distributed_env_vars``, ``_setup_torch_process_group``, ``_shutdown_torch``), imported only
in the workers; ``tests/test_loopback_ray.py`` fails if Ray renames them. The config and backend are
torch-free here (``TorchConfig``'s module imports torch), so Ray Train's controller, which unpickles them,
starts without importing torch.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from ray.train.backend import Backend, BackendConfig

from orchestrator.training import scratch

STORE_PREFIX = "bamray-ddp-"


def loopback_interface() -> str:
    """The loopback interface's name (``lo`` on Linux, ``lo0`` on macOS)."""
    names = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    return names[0] if names else "lo"


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _use_loopback() -> None:
    iface = loopback_interface()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
    os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)


#: the FileStore paths this process (a group's rank 0) holds, with their owner locks (see _claim_store)
_CLAIMED: dict[str, int] = {}


def _claim_store() -> str:
    """Rank 0: a FileStore path in this node's temp dir, owned by this process (:mod:`.scratch`): torch
    removes the file when the group closes normally, but a group Ray kills leaves it behind; the next
    group's rank 0 on the node removes those whose owner is gone."""
    fd, path = scratch.claim(STORE_PREFIX)
    _CLAIMED[path] = fd
    return path


def _release_store(path: str) -> None:
    fd = _CLAIMED.pop(path, None)
    if fd is not None:
        scratch.release(fd, path)


def _set_env_vars() -> None:
    from ray.train.torch.config import _set_torch_distributed_env_vars

    _set_torch_distributed_env_vars()


def _setup_process_group(**kwargs: Any) -> None:
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(**kwargs)


def _shutdown(destroy_process_group: bool) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy_process_group)


class CudaDeviceContext:
    """What ``TorchConfig.train_func_context`` does around the train function (the worker's CUDA device
    becomes the current one), with torch imported only in the worker."""

    def __enter__(self) -> None:
        import torch

        if torch.cuda.is_available():
            import ray.train.torch

            device = ray.train.torch.get_device()
            if device.type == "cuda":
                torch.cuda.set_device(device)

    def __exit__(self, *exc: object) -> bool:
        return False


class LoopbackTorchBackend(Backend):
    """Ray's ``_TorchBackend`` set-up with a socketless rendezvous on one node (see the module docstring).
    Defined here, torch-free, because Ray Train's controller unpickles the backend config and imports what
    its class's module imports: ``ray.train.torch.config`` would make it import torch (4-6 s of a run's
    start on 2 cores, in the chain before the workers are created) for no use of its own."""

    share_cuda_visible_devices: bool = True

    def __init__(self) -> None:  # once a process: Ray's backends are singletons, reset at every on_start
        self.store: str | None = None
        self.ray_backend: Backend | None = None  # a group spread over nodes: Ray's own set-up

    def on_start(self, worker_group: Any, backend_config: LoopbackTorchConfig) -> None:
        import ray

        nodes = set(worker_group.execute(_node_id))
        self.store = self.ray_backend = None
        if len(nodes) != 1 or backend_config.backend not in ("gloo", "nccl"):
            from ray.train.torch.config import _TorchBackend

            self.ray_backend = _TorchBackend()
            return self.ray_backend.on_start(worker_group, backend_config)
        self.store = worker_group.execute_single(0, _claim_store)
        worker_group.execute(_use_loopback)
        worker_group.execute(_set_env_vars)
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    _setup_process_group,
                    backend=backend_config.backend,
                    world_rank=rank,
                    world_size=len(worker_group),
                    init_method=f"file://{self.store}",
                    timeout_s=backend_config.timeout_s,
                )
                for rank in range(len(worker_group))
            ]
        )

    def on_shutdown(self, worker_group: Any, backend_config: LoopbackTorchConfig) -> None:
        if self.ray_backend is not None:
            return self.ray_backend.on_shutdown(worker_group, backend_config)
        import ray
        from ray.exceptions import GetTimeoutError
        from ray.train.constants import (
            DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
            TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
        )

        timeout = float(
            os.environ.get(
                TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S
            )
        )
        try:
            ray.get(worker_group.execute_async(_shutdown, len(worker_group) > 1), timeout=timeout)
        except GetTimeoutError:  # as Ray's: a stuck process group only delays the workers' exit
            logging.getLogger(__name__).warning("torch process group shutdown timed out after %s s", timeout)
        finally:
            if self.store is not None:
                try:
                    worker_group.execute_single(0, _release_store, self.store)
                except Exception:  # noqa: BLE001 - a worker already gone leaves a file in /tmp, nothing more
                    pass


@dataclass
class LoopbackTorchConfig(BackendConfig):
    """``ray.train.torch.TorchConfig``'s fields and behaviour, without importing torch where it is
    unpickled (Ray Train's controller). ``TorchTrainer`` fills ``backend`` (gloo, or nccl on GPUs)."""

    backend: str | None = None
    init_method: str = "env"
    timeout_s: int = 1800

    @property
    def backend_cls(self) -> type[LoopbackTorchBackend]:
        return LoopbackTorchBackend

    @property
    def train_func_context(self) -> type[CudaDeviceContext]:
        return CudaDeviceContext

    @property
    def framework(self) -> Any:
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "init_method": self.init_method, "timeout_s": self.timeout_s}


def torch_config() -> LoopbackTorchConfig:
    """The backend config every bamray ``TorchTrainer`` gets (see the module docstring)."""
    return LoopbackTorchConfig()
