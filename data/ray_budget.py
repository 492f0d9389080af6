"""A Ray Data execution's CPU budget from its first scheduling step instead of a second later.

Ray Data 2.60 sizes an execution by the resources its autoscaling coordinator (a detached actor) reserves
for it, and reads them without blocking: the first read of an execution only sends the question and
returns nothing, and the executor reads again a second later (``ResourceManager.
GLOBAL_LIMITS_UPDATE_INTERVAL_S``). So every execution (each epoch of the per-epoch stream, each k-NN
evaluation set, each ``bamray embed`` job) spends its first second on a budget of 0 CPUs, where only the
one task that Ray Data grants a starved operator may run: one map task at a time, whatever the CPUs
(measured 2026-12-02, the README's *Where the core goes*).

:func:`wait_for_first_reservation` makes the first read of each execution wait for the coordinator's
answer, at most :data:`FIRST_READ_TIMEOUT_S` (a round trip to an actor that is already up: the driver
starts it, :func:`data.run_actors.pin_ray_data_singletons`); every later read stays as Ray wrote it, and an
answer that is still empty is returned as it is. It patches one private method, so it is applied where
bamray's executions run: :mod:`data.batch_maps` calls it on import, and every process that runs a bamray
pipeline imports that module (the driver or bench building the dataset; Ray Train's split coordinator or a
one-worker run's worker unpickling its callables). A Ray without that method is left alone.
"""

from __future__ import annotations

import functools
from typing import Any

import ray

#: the longest the first read of an execution waits for the coordinator's answer (seconds)
FIRST_READ_TIMEOUT_S = 2.0
_PATCHED = "_bamray_first_read_waits"  # on the class: applied once per process
_WAITED = "_bamray_waited"  # on an instance: one coordinator client per execution, it waits once


def wait_for_first_reservation() -> bool:
    """Patch Ray Data's coordinator client (see the module docstring); True when it is (or was) patched."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            DefaultAutoscalingCoordinator as client,
        )
    except ImportError:  # pragma: no cover - depends on the Ray version
        return False
    if getattr(client, _PATCHED, False):
        return True
    original = getattr(client, "get_reserved_resources", None)
    if original is None:  # pragma: no cover - another Ray
        return False

    @functools.wraps(original)
    def get_reserved_resources(self: Any) -> Any:
        reserved = original(self)
        if reserved or self.__dict__.get(_WAITED):
            return reserved
        self.__dict__[_WAITED] = True
        pending = getattr(self, "_pending_reserved_resources", None)
        if pending is None:
            return reserved
        ray.wait([pending], timeout=FIRST_READ_TIMEOUT_S)
        return original(self)  # collects the answer, and sends the next question as Ray's own read does

    client.get_reserved_resources = get_reserved_resources
    setattr(client, _PATCHED, True)
    return True
