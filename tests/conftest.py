"""Shared fixtures: a real local Ray (short temp dir, explicit CPUs, no dashboard) and tiny real data;
and the markers that split the fast unit tests (``make test-fast``) from the integration tests."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
# Ray Train's controller polls its workers every 2 s; a tiny test run spends whole polls waiting to be
# noticed at start, at every report and at the end. Inherited by the Rays and drivers the tests start.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def _own_cache_dir() -> Path:
    """The suite's own bamray cache, inherited by every process it starts: a developer's kept local Ray
    (``bamray ray up``, whose address lives in the user's cache) must not be joined by the runs the tests
    start. timm's model names are copied over, so that loading a config stays as light as it is for users."""
    import atexit

    from trainers.fileio import user_cache_dir

    own = Path(tempfile.mkdtemp(prefix="bamray-cache-", dir="/tmp"))
    for names in user_cache_dir().glob("timm-*-models.json"):
        shutil.copy(names, own)
    atexit.register(shutil.rmtree, own, True)
    return own


os.environ["BAMRAY_CACHE_DIR"] = str(_own_cache_dir())

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
SLOW_TESTS = frozenset(
    {
        "test_tracking.py::test_concurrent_writers_on_one_fresh_sqlite_store_lose_nothing",
        "test_pictures.py::test_a_new_process_loads_umaps_compiled_code_instead_of_compiling_it",
    }
)


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


#: The tiny `bamray train` of the Ray integration tests: a 2-block ViT-Tiny (patch 4) on 16-px crops of the
#: first 256 Fashion-MNIST images (128 test images as k-NN queries), batch 32. Seconds an epoch on 2 CPUs,
#: and it still learns (k-NN well above chance).
TINY_N_TRAIN, TINY_N_TEST, TINY_BATCH = 256, 128, 32


#: Fashion-MNIST's channels and normalisation, for tests that build a model or a view from a shipped config
#: without preparing its data (the configs leave them to the data set's meta: 0 / empty)
FMNIST_DATA = ("data.channels=1", "data.mean=[0.2860]", "data.std=[0.3530]")


def tiny_train_settings(**extra: object) -> dict[str, object]:
    """``--set`` values of the tiny run (2 workers, 2 epochs, 1 warm-up epoch), updated with ``extra``."""
    return {
        "model.backbone": "vit_tiny_patch16_224",
        "model.patch_size": 4,
        "model.backbone_kwargs": "{depth: 2}",
        "data.global_crop_size": 16,
        "data.local_crop_size": 8,
        "data.local_crops": 2,
        "method.top_k_sink": 0,
        "method.proj_hidden_dim": 64,
        "method.proj_out_dim": 32,
        "optim.batch_size": TINY_BATCH,
        "optim.epochs": 2,
        "optim.warmup_epochs": 1,
        "train.workers": 2,
        "data.map_cpus": 0.5,
        "data.map_batch_size": 64,
        "data.local_shuffle_buffer": 0,
        "eval.knn_train_fraction": 1.0,
        "eval.embedding_map": "pca",  # UMAP: test_pictures.py covers it (a new process still takes ~8 s)
        **extra,
    }


def append_corrupt_row(shards: Path, split: str, index: int, label: int) -> None:
    """One undecodable PNG row (a valid signature, garbage after it) as an extra part of ``split``: the
    row every path must skip and count, never crash on."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.sources import SCHEMA

    bad = pa.table(
        {
            "image": pa.array([b"\x89PNG\r\n\x1a\n-truncated-garbage"], pa.binary()),
            "label": pa.array([label], pa.int64()),
            "index": pa.array([index], pa.int64()),
        },
        schema=SCHEMA,
    )
    pq.write_table(bad, shards / split / "part-09999.parquet")


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory, fmnist_src) -> Path:
    """The tiny run's data: the first 256 train and 128 test images, prepared as `bamray data prepare` does."""
    from data.sources import prepare_fashion_mnist

    out = tmp_path_factory.mktemp("fmnist") / "fashion-mnist"
    prepare_fashion_mnist(out, src_dir=str(fmnist_src), limit=TINY_N_TRAIN, test_limit=TINY_N_TEST)
    return out


def write_unlabelled_tree(root: Path, src: Path, n: int) -> int:
    """The first ``n`` Fashion-MNIST train images as a user's own unlabelled folder would hold them: nested
    at different depths, PNG and JPEG (grayscale and RGB), with notes and a hidden folder beside them.
    Returns the number of image files written."""
    from PIL import Image

    from data.sources import read_idx

    images = read_idx(src / "train-images-idx3-ubyte.gz")[:n]
    for i, im in enumerate(images):
        folder = root / ["", "trip_a", "trip_b/day_2"][i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(im)
        if i % 4 == 3:
            picture.convert("RGB").save(folder / f"img_{i:04d}.jpg", quality=95)
        else:
            picture.save(folder / f"img_{i:04d}.png")
    (root / "notes.txt").write_text("not an image")
    (root / "trip_a" / "index.csv").write_text("a,b\n")
    (root / ".thumbnails").mkdir()
    Image.fromarray(images[0]).save(root / ".thumbnails" / "t.png")
    return len(images)


def fresh_python(code: str, timeout: float = 120, env: dict[str, str] | None = None) -> list[str]:
    """Run ``code`` in a new interpreter at the project root and return its stdout lines; the test fails
    with the end of its stderr when it exits non-zero. For what a new process imports: the question the
    import tests ask, which this process (torch and more already imported) cannot answer."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()


def free_port() -> int:
    """A TCP port nobody listens on right now, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_head(args: list[str], ready: Callable[[], object], env: dict[str, str], prefix: str) -> Iterator[str]:
    """``ray start --head --block <args>`` with a short temp dir, in its own session; yields the temp dir once
    ``ready()`` stops raising (4 min at most). Stopped by its pid, then every process of its session dir
    still alive, never by ``ray stop``, which would end every Ray of this user on
    the machine, other test sessions' included."""
    temp_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", *args]
    cmd += [f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    log_path = Path(temp_dir) / "ray_start.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}: {log_path.read_text()}")
            try:
                ready()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield temp_dir
    finally:
        proc.send_signal(signal.SIGTERM)  # --block: `ray start` stops the processes it started
        try:
            proc.wait(timeout=2)  # a graceful stop takes ~30 s; the kills below end the same processes
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # only our own session (start_new_session=True)
            proc.wait(timeout=30)
        from orchestrator.local_ray import session_processes

        for pid in session_processes(temp_dir, frozenset({os.getpid()})):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
