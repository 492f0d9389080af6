"""The local Ray that `bamray train` / `bamray sweep` start: every worker, detached actors included, runs
the set-up hook that quiets Ray Train's dashboard-only PlacementGroupCleaner (it warned once a second for
a whole run without a dashboard)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

from orchestrator.local_ray import _DASHBOARD_ONLY_LOGGERS, quiet_dashboardless_warnings

CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def test_the_hook_quiets_only_the_dashboard_only_loggers():
    assert CLEANER in _DASHBOARD_ONLY_LOGGERS
    other = logging.getLogger("ray.train.v2._internal.execution.controller.controller")
    before = other.level
    try:
        quiet_dashboardless_warnings()
        assert logging.getLogger(CLEANER).getEffectiveLevel() == logging.ERROR
        assert other.level == before
    finally:
        logging.getLogger(CLEANER).setLevel(logging.NOTSET)


def test_local_ray_workers_and_detached_actors_run_the_hook(tmp_path):
    # A fresh interpreter: the suite's own Ray (conftest) must not be the one under test.
    script = textwrap.dedent(f"""
        import logging, shutil, tempfile, ray
        from orchestrator.local_ray import start_local_ray
        temp_dir = tempfile.mkdtemp(prefix="lr", dir="/tmp")  # short: Ray's socket paths
        start_local_ray(2, _temp_dir=temp_dir, log_to_driver=False)

        @ray.remote
        def level():
            return logging.getLogger({CLEANER!r}).getEffectiveLevel()

        @ray.remote(num_cpus=0)
        class Probe:
            def level(self):
                return logging.getLogger({CLEANER!r}).getEffectiveLevel()

        probe = Probe.options(lifetime="detached").remote()  # as Ray Train starts the cleaner
        print("LEVELS", ray.get(level.remote()), ray.get(probe.level.remote()))
        ray.kill(probe)
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"LEVELS {logging.ERROR} {logging.ERROR}" in out.stdout, out.stdout[-2000:]
