"""torch.distributed on one machine without a socket beyond 127.0.0.1.

Ray Train's torch backend has rank 0 start torch's rendezvous ``TCPStore``, and the store listens on every
interface (``::``): torch has no option to bind it to one address. Gloo's connections between ranks
listen on the address the host name resolves to, usually a routable one. On a single-node run both are
needless exposure, which a local ``bamray train`` otherwise avoids (:mod:`orchestrator.local_ray`).

So when every worker of the group is on one node, :class:`LoopbackTorchConfig`'s backend rendezvouses
through a ``FileStore`` in that node's temp directory (no listening socket at all) and points gloo and
NCCL at the loopback interface (``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``, unless already set). A
group spread over several nodes gets Ray's own set-up unchanged. The decision is taken at every group
start, so a group restarted on other nodes after a failure is set up for where it now runs.

It replaces Ray's ``_TorchBackend.on_start`` with the same steps and reuses two of its private helpers
(``_set_torch_distributed_env_vars``, ``_setup_torch_process_group``); ``tests/test_loopback_ray.py``
fails if Ray renames them.
"""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from typing import Any

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


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def torch_config() -> Any:
    """The ``TorchConfig`` every bamray ``TorchTrainer`` gets (see the module docstring)."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class LoopbackTorchBackend(_TorchBackend):
        store: str | None = None

        def on_start(self, worker_group: Any, backend_config: Any) -> None:
            import ray
            from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group

            nodes = set(worker_group.execute(_node_id))
            if len(nodes) != 1 or backend_config.backend not in ("gloo", "nccl"):
                self.store = None
                return super().on_start(worker_group, backend_config)
            self.store = os.path.join(tempfile.gettempdir(), f"{STORE_PREFIX}{uuid.uuid4().hex}")
            worker_group.execute(_use_loopback)
            worker_group.execute(_set_torch_distributed_env_vars)
            ray.get(
                [
                    worker_group.execute_single_async(
                        rank,
                        _setup_torch_process_group,
                        backend=backend_config.backend,
                        world_rank=rank,
                        world_size=len(worker_group),
                        init_method=f"file://{self.store}",
                        timeout_s=backend_config.timeout_s,
                    )
                    for rank in range(len(worker_group))
                ]
            )

        def on_shutdown(self, worker_group: Any, backend_config: Any) -> None:
            super().on_shutdown(worker_group, backend_config)
            if self.store is not None:
                try:
                    worker_group.execute_single(0, _remove, self.store)
                except Exception:  # noqa: BLE001 - a worker already gone leaves a file in /tmp, nothing more
                    pass

    class LoopbackTorchConfig(TorchConfig):
        @property
        def backend_cls(self) -> type:
            return LoopbackTorchBackend

    return LoopbackTorchConfig()
