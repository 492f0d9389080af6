"""Shared fixtures: a real local Ray (short temp dir, explicit CPUs, no dashboard) and tiny real data."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

FMNIST_DIR = Path(os.environ.get("BAMRAY_FMNIST_SRC", "/usr/share/datasets/fashion-mnist"))


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
        pytest.fail(f"Fashion-MNIST not found in {FMNIST_DIR}: run `make setup` (apt-get install dataset-fashion-mnist)")
    return FMNIST_DIR
