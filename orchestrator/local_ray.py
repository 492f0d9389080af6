"""The local Ray that ``bamray train`` / ``bamray sweep`` start when no cluster address is given.

Kept free of heavy imports: :func:`quiet_dashboardless_warnings` runs at the start of every Ray worker
process (``worker_process_setup_hook``), so importing this module must cost nothing.
"""

from __future__ import annotations

import logging
from typing import Any

# Ray Train V2 starts a PlacementGroupCleaner actor per run that asks the dashboard's State API every
# second whether the Train controller is alive. A local Ray without a dashboard cannot answer, so the
# actor logs a warning every second for the whole run while it cannot clean anything anyway. Sweeps have their own cleaner (orchestrator/reaper.py).
_DASHBOARD_ONLY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_dashboardless_warnings() -> None:
    """Ray worker set-up hook: keep only errors from the loggers that need the (absent) dashboard."""
    for name in _DASHBOARD_ONLY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def start_local_ray(num_cpus: int, **kwargs: Any) -> None:
    """``ray.init`` of a local, dashboard-less Ray (the dashboard is a server we do not need here) whose
    workers run :func:`quiet_dashboardless_warnings`."""
    import ray

    hook = f"{__name__}.{quiet_dashboardless_warnings.__name__}"
    ray.init(
        num_cpus=num_cpus, include_dashboard=False, runtime_env={"worker_process_setup_hook": hook}, **kwargs
    )


def connect_or_start(address: str | None, num_cpus: int, num_gpus: int | None = None) -> bool:
    """The one way bamray gets a Ray: reuse an initialised one; else ``address`` / ``RAY_ADDRESS`` (a cluster,
    or a submitted job's); else :func:`start_local_ray` with ``num_cpus`` logical CPUs (and ``num_gpus``).
    Returns True when this call connected or started Ray, so the caller knows to shut it down."""
    import os

    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return True
    start_local_ray(num_cpus, **({"num_gpus": num_gpus} if num_gpus is not None else {}))
    return True
