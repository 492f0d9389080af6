"""The local Ray that ``bamray train`` / ``bamray sweep`` start when no cluster address is given.

Kept free of heavy imports: :func:`quiet_dashboardless_warnings` runs at the start of every Ray worker
process (``worker_process_setup_hook``), so importing this module must cost nothing.
"""

from __future__ import annotations

import logging
from typing import Any

# Ray Train V2 starts a PlacementGroupCleaner actor per run that asks the dashboard's State API every
# second whether the Train controller is alive. A local Ray without a dashboard cannot answer, so the
# actor logs a warning every second for the whole run (274 lines in one 5-minute `make run`) while it
# cannot clean anything anyway. Sweeps have their own cleaner (orchestrator/reaper.py).
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
    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"worker_process_setup_hook": hook}, **kwargs)
