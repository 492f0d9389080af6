"""Removes the worker placement group of a Ray Train run whose Tune trial was torn down.

Why this exists: a Tune scheduler (ASHA, PBT) stops a trial by killing its actor, which takes the Ray
Train controller it started down with it, but not the controller's worker placement group: placement
groups live as long as the *job*. Ray Train V2 ships a ``PlacementGroupCleaner`` for exactly this, but it
asks the dashboard's State API whether the controller is alive, and where Ray runs without a dashboard
(``bamray sweep`` on a local Ray, the tests) that question always fails and the group is never removed.
Each stopped trial then keeps its CPUs reserved until the sweep ends, and a sweep with more trials than
free CPUs hangs waiting for them (or a PBT sweep after an ASHA sweep on the same cluster).

The reaper asks the trial actor itself: one ``num_cpus=0`` actor per sweep, owned by the sweep's driver,
pings every registered trial actor; once a ping says the actor died, it removes the placement groups
registered for it. Public Ray APIs only; works with or without a dashboard.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group


class PlacementGroupReaper:
    """``register(owner, pg)``: remove ``pg`` once the actor ``owner`` is dead. Checks every ``interval_s``.

    Liveness is one outstanding ``__ray_ready__`` call per owner, polled without blocking: it resolves
    when the owner has served it (alive: ask again) or fails with ``RayActorError`` once the owner died."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self._interval_s = interval_s
        self._watched: dict[str, dict[str, Any]] = {}  # owner actor id -> {"owner", "groups", "ping"}
        self._removed: list[str] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._loop, name="bamray-pg-reaper", daemon=True).start()

    def register(self, owner: Any, pg: PlacementGroup) -> None:
        with self._lock:
            entry = self._watched.setdefault(
                owner._actor_id.hex(), {"owner": owner, "groups": [], "ping": None}
            )
            entry["groups"].append(pg)

    def settle(self, timeout_s: float = 15.0) -> int:
        """Wait (at most ``timeout_s``) until every watched owner was found dead and reaped: at the end of a
        sweep Tune has stopped every trial actor, so what is still watched is on its way out. Returns how
        many owners are still watched."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._watched:
                    return 0
            time.sleep(self._interval_s / 2)
        with self._lock:
            return len(self._watched)

    def removed(self) -> list[str]:
        """Hex ids of the placement groups this reaper removed (for tests and logs)."""
        with self._lock:
            return list(self._removed)

    def _loop(self) -> None:
        while True:
            time.sleep(self._interval_s)
            with self._lock:
                entries = list(self._watched.items())
            for key, entry in entries:
                if self._alive(entry):
                    continue
                with self._lock:
                    self._watched.pop(key, None)
                for pg in entry["groups"]:
                    if _remove_if_present(pg):
                        with self._lock:
                            self._removed.append(pg.id.hex())

    @staticmethod
    def _alive(entry: dict[str, Any]) -> bool:
        if entry["ping"] is None:
            entry["ping"] = entry["owner"].__ray_ready__.remote()
        ready, _ = ray.wait([entry["ping"]], timeout=0)
        if not ready:
            return True  # busy: still alive as far as anyone knows
        try:
            ray.get(ready[0])
        except RayActorError:
            return False
        entry["ping"] = None
        return True


def _remove_if_present(pg: PlacementGroup) -> bool:
    state = placement_group_table(pg).get("state")
    if state in (None, "REMOVED"):
        return False
    try:
        remove_placement_group(pg)
    except Exception:  # removed concurrently by Ray Train itself
        return False
    return True


def start_reaper(name: str | None = None, interval_s: float = 1.0) -> Any:
    """The sweep's reaper actor (0 CPUs, so it never competes with trials), owned by the calling process
    and on its node (a lost worker node must not take it along)."""
    from data.run_actors import on_this_node

    cls = ray.remote(num_cpus=0, max_concurrency=4)(PlacementGroupReaper)
    return cls.options(name=name, scheduling_strategy=on_this_node()).remote(interval_s)


def watch_current_actor(reaper_name: str | None) -> tuple[Any, Any] | None:
    """``(reaper, this actor)`` for :func:`register_current`, or None outside an actor / with no such reaper."""
    if not reaper_name:
        return None
    owner = ray.get_runtime_context().current_actor if ray.get_runtime_context().get_actor_id() else None
    try:
        reaper = ray.get_actor(reaper_name)
    except ValueError:
        return None
    return (reaper, owner) if owner is not None else None


def register_current(watch: tuple[Any, Any] | None) -> None:
    """Called by rank 0 of a Train run: hand this worker's placement group to ``watch = (reaper, owner)``."""
    if watch is None:
        return
    from ray.util import get_current_placement_group

    pg = get_current_placement_group()
    if pg is not None:
        reaper, owner = watch
        ray.get(reaper.register.remote(owner, pg))
