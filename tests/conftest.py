"""Shared fixtures: a real local Ray (short temp dir, explicit CPUs, no dashboard) and tiny real data;
and the markers that split the fast unit tests (``make test-fast``) from the integration tests."""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

FMNIST_DIR = Path(os.environ.get("BAMRAY_FMNIST_SRC", "/usr/share/datasets/fashion-mnist"))

#: Test files that start Ray (a local cluster, a ``bamray`` subprocess that starts one, or a benchmark
#: section on one). Every test in them is an integration test whatever its own markers say.
RAY_FILE_PATTERNS = ("test_*_ray.py", "test_ray_*.py", "test_time_budget.py", "test_bench_*.py")
#: Fixtures that start Ray for the test that asks for them.
RAY_FIXTURES = frozenset({"ray_local"})
#: Test files whose every test runs ``bamray`` as a real subprocess: a fresh interpreter importing torch,
#: timm and MLflow costs seconds per test, which the fast subset cannot afford.
SLOW_FILE_PATTERNS = ("test_cli.py",)
#: Single tests that start several fresh interpreters (``multiprocessing`` spawn importing MLflow).
SLOW_TESTS = frozenset({"test_tracking.py::test_concurrent_writers_on_one_fresh_sqlite_store_lose_nothing"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that starts Ray ``ray`` and every subprocess-heavy one ``slow``, so
    ``-m "not ray and not slow"`` (``make test-fast``) is the fast unit subset without each test file
    having to remember its markers: a new test in a Ray file, or one that takes the Ray fixture, is
    left out of the fast run automatically."""
    for item in items:
        name = Path(str(item.fspath)).name
        if any(fnmatch.fnmatch(name, p) for p in RAY_FILE_PATTERNS) or RAY_FIXTURES.intersection(
            getattr(item, "fixturenames", ())
        ):
            item.add_marker(pytest.mark.ray)
        if any(fnmatch.fnmatch(name, p) for p in SLOW_FILE_PATTERNS) or f"{name}::{item.name}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray cluster for one test module.

    Ray's socket paths must stay under 107 characters, so its temp dir lives in a short /tmp path,
    never in pytest's deep tmp_path.
    """
    import ray

    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        object_store_memory=300 * 2**20,
        _temp_dir=temp_dir,
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def fmnist_src() -> Path:
    """The real Fashion-MNIST IDX files (Debian package dataset-fashion-mnist)."""
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(
            f"Fashion-MNIST not found in {FMNIST_DIR}: run `make setup` (apt-get install dataset-fashion-mnist)"
        )
    return FMNIST_DIR
