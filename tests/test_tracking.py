"""MLflow tracking against a real SQLite store: store location, concurrent writers, restart
de-duplication, retries, run status and the crop picture."""

from __future__ import annotations

import gzip
import multiprocessing as mp
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from orchestrator import provenance, tracking
from orchestrator.mlflow_ui import ui_command
from orchestrator.pictures import crop_grid


def _uri(tmp_path: Path) -> str:
    return f"sqlite:///{(tmp_path / '.bamray' / 'mlflow.db').as_posix()}"


# ---------------------------------------------------------------------------------------------- location
def test_default_store_is_absolute_under_project(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("[project]\nname='x'\n")
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    monkeypatch.delenv("BAMRAY_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.resolve_tracking_uri()
    assert uri == f"sqlite:///{tmp_path.resolve()}/.bamray/mlflow.db"
    assert tracking.sqlite_path(uri).is_absolute()
    assert tracking.artifact_root(uri) == (tmp_path.resolve() / ".bamray" / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.resolve_tracking_uri() == "http://127.0.0.1:5999"
    assert (
        tracking.resolve_tracking_uri("sqlite:///rel/m.db") == f"sqlite:///{(sub / 'rel' / 'm.db').resolve()}"
    )
    assert tracking.artifact_root("http://127.0.0.1:5999") is None


# ---------------------------------------------------------------------------------------------- concurrency
def _writer(uri: str, name: str, n_steps: int, queue) -> None:
    try:
        from orchestrator import tracking as tr

        run_id = tr.create_run(uri, "shared-exp", name, {"method": "bam"})
        tr.log_params(uri, run_id, {f"p{i}": i for i in range(150)})  # > one params batch
        log = tr.MetricLogger(uri, run_id, flush_every=40)
        for step in range(n_steps):
            log.log({"loss": 1.0 / (step + 1), "lr": step * 1e-3, "images_per_sec": 100.0 + step}, step=step)
        log.flush()
        tr.finish_run(uri, run_id, "FINISHED")
        queue.put(("ok", run_id))
    except BaseException as err:  # noqa: BLE001 - report anything to the parent
        queue.put(("error", repr(err)))


def test_concurrent_writers_on_one_fresh_sqlite_store_lose_nothing(tmp_path):
    """Several processes create the store, the experiment and their runs at the same moment on a fresh
    SQLite file (the schema-migration race) and log batched metrics concurrently: no error, every metric
    present, one experiment."""
    uri = _uri(tmp_path)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    n_proc, n_steps = 3, 300
    procs = [ctx.Process(target=_writer, args=(uri, f"run{i}", n_steps, queue)) for i in range(n_proc)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(r[0] == "ok" for r in results), results

    c = tracking.client(uri)
    exps = [e for e in c.search_experiments() if e.name == "shared-exp"]
    assert len(exps) == 1
    assert exps[0].artifact_location.startswith((tmp_path / ".bamray" / "mlartifacts").as_uri())
    for _, run_id in results:
        run = c.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert len(run.data.params) == 150
        for key in ("train/loss", "train/lr", "train/images_per_sec"):
            steps = sorted(m.step for m in c.get_metric_history(run_id, key))
            assert steps == list(range(n_steps)), key
        last = c.get_metric_history(run_id, "train/loss")
        assert min(m.value for m in last) == pytest.approx(1.0 / n_steps)


# ---------------------------------------------------------------------------------------------- restarts
def test_restart_logs_every_step_once(tmp_path):
    uri = _uri(tmp_path)
    run_id = tracking.create_run(uri, "exp", "r", {})
    first = tracking.MetricLogger(uri, run_id, flush_every=1000)
    for step in range(10):
        first.log({"loss": float(step), "knn_top1": 50.0}, step=step)
    first.flush()
    # the worker dies after step 12 was computed but before its buffer was flushed
    first.log({"loss": 99.0}, step=12)
    del first

    marks = tracking.logged_high_water_marks(uri, run_id)
    assert marks == {"train/loss": 9, "eval/knn_top1": 9}  # as MLflow shows them
    second = tracking.MetricLogger(uri, run_id, skip_upto=marks)
    for step in range(5, 15):  # the restart recomputes from the checkpoint at step 5
        second.log({"loss": 100.0 + step}, step=step)
    second.log({"knn_top1": 60.0}, step=9)  # an epoch metric that was already logged
    second.log({"loss": float("nan")}, step=20)  # dropped, never stored
    second.flush()

    c = tracking.client(uri)
    hist = sorted((m.step, m.value) for m in c.get_metric_history(run_id, "train/loss"))
    assert [s for s, _ in hist] == list(range(15))
    assert dict(hist)[9] == 9.0 and dict(hist)[10] == 110.0 and dict(hist)[12] == 112.0
    assert [m.value for m in c.get_metric_history(run_id, "eval/knn_top1")] == [50.0] * 10


def test_the_worker_logger_touches_mlflow_only_at_its_first_flush(tmp_path):
    """The marks of a previous attempt are read, and the client opened, when the buffer is first sent
    (after a worker's first step), not when the logger is made; values keep the time they were logged."""
    uri = _uri(tmp_path)
    run_id = tracking.create_run(uri, "exp", "r", {})
    earlier = tracking.MetricLogger(uri, run_id)
    earlier.log({"loss": 1.0}, step=3)
    earlier.flush()
    reads: list[dict[str, int]] = []

    def marks() -> dict[str, int]:
        reads.append(tracking.logged_high_water_marks(uri, run_id))
        return reads[-1]

    log = tracking.MetricLogger(uri, run_id, skip_upto=marks, flush_every=1000)
    before = int(time.time() * 1000)
    for step in range(2, 6):
        log.log({"loss": 10.0 + step}, step=step)
    after = int(time.time() * 1000)
    assert reads == [] and log._mlflow_client is None  # nothing of MLflow yet
    time.sleep(0.05)
    log.flush()
    log.log({"loss": 20.0}, step=6)
    log.flush()
    assert reads == [{"train/loss": 3}]  # read once, at the first flush
    hist = sorted(tracking.client(uri).get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in hist] == [(3, 1.0), (4, 14.0), (5, 15.0), (6, 20.0)]
    # stamped when logged, not when sent (>= 50 ms later)
    assert all(before <= m.timestamp <= after for m in hist if m.step in (4, 5))
    assert log.logged == 3


def test_a_run_shorter_than_one_sampling_interval_still_gets_its_system_metrics(tmp_path):
    """MLflow's sampler drops the sample it holds when stopped inside its wait; stopping through bamray
    logs it, at once rather than after the interval."""
    uri = _uri(tmp_path)
    run_id = tracking.create_run(uri, "exp", "r", {})
    monitor = tracking.start_system_metrics(uri, run_id, interval_s=60.0)
    time.sleep(1.0)  # the sampler's first sample is taken as it starts
    t0 = time.monotonic()
    tracking.stop_system_metrics(monitor)
    assert time.monotonic() - t0 < 20.0
    c = tracking.client(uri)
    cpu = c.get_metric_history(run_id, "system/cpu_utilization_percentage")
    memory = c.get_metric_history(run_id, "system/system_memory_usage_megabytes")
    assert [m.step for m in cpu] == [0] and 0.0 <= cpu[0].value <= 100.0
    assert [m.step for m in memory] == [0] and memory[0].value > 1.0  # this process alone uses more than 1 MB


def test_metric_names_group_as_the_ui_sections_them():
    """MLflow sections charts by the prefix, alphabetically, ungrouped last: k-NN, then loss / lr, then the
    signals; timings, data waits and already-grouped names (MLflow's ``system/``) are left as they are."""
    from orchestrator.metric_names import mlflow_key

    named = {
        k: mlflow_key(k)
        for k in (
            "knn_top1",
            "best_knn_top1",
            "loss",
            "epoch_loss",
            "lr",
            "rankme_proj",
            "bam_target_entropy",
            "epoch_bam_attn_entropy_local",
            "data_wait_s",
            "epoch",
            "epoch_time_s",
            "system/cpu_utilization_percentage",
        )
    }
    assert named == {
        "knn_top1": "eval/knn_top1",
        "best_knn_top1": "eval/best_knn_top1",
        "loss": "train/loss",
        "epoch_loss": "train/epoch_loss",
        "lr": "train/lr",
        "rankme_proj": "train_signals/rankme_proj",
        "bam_target_entropy": "train_signals/bam_target_entropy",
        "epoch_bam_attn_entropy_local": "train_signals/epoch_bam_attn_entropy_local",
        "data_wait_s": "data_wait_s",
        "epoch": "epoch",
        "epoch_time_s": "epoch_time_s",
        "system/cpu_utilization_percentage": "system/cpu_utilization_percentage",
    }
    sections = sorted({v.split("/")[0] for v in named.values() if "/" in v} - {"system"})
    assert sections == ["eval", "train", "train_signals"]  # the order the run page shows them in


# ---------------------------------------------------------------------------------------------- retries
def test_retry_only_transient_errors():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise sqlite3.OperationalError("database is locked")
        return "done"

    t0 = time.perf_counter()
    assert tracking.with_retry(flaky, base_delay=0.01) == "done"
    assert len(calls) == 3 and time.perf_counter() - t0 < 2

    bad = []

    def wrong():
        bad.append(1)
        raise ValueError("a real bug")

    with pytest.raises(ValueError):
        tracking.with_retry(wrong, base_delay=0.01)
    assert len(bad) == 1

    always = []

    def locked():
        always.append(1)
        raise sqlite3.OperationalError("database is locked")

    with pytest.raises(sqlite3.OperationalError):
        tracking.with_retry(locked, attempts=4, base_delay=0.001)
    assert len(always) == 4


def test_a_servers_503_is_not_retried_on_top_of_mlflows_own_retries():
    """MLflow's REST client retries 503s itself for minutes; a store-side TEMPORARILY_UNAVAILABLE (SQL
    store) is still ours to retry."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    calls = []

    def server_503():
        calls.append(1)
        raise MlflowException(
            "API request to endpoint /api/2.0/mlflow/runs/log-batch failed with error code 503 != 200",
            error_code=TEMPORARILY_UNAVAILABLE,
        )

    with pytest.raises(MlflowException):
        tracking.with_retry(server_503, attempts=4, base_delay=0.001)
    assert len(calls) == 1

    def store_busy():
        calls.append(1)
        raise MlflowException("the store is temporarily unavailable", error_code=TEMPORARILY_UNAVAILABLE)

    with pytest.raises(MlflowException):
        tracking.with_retry(store_busy, attempts=3, base_delay=0.001)
    assert len(calls) == 1 + 3


# ---------------------------------------------------------------------------------------------- run status
def test_failed_run_reason_and_resumed_params(tmp_path):
    uri = _uri(tmp_path)
    run_id = tracking.create_run(uri, "exp", "r", provenance.run_tags("bam"))
    assert tracking.log_params(uri, run_id, {"optim.lr": 0.1, "optim.epochs": 2}) == []
    tracking.finish_run(uri, run_id, "FAILED", "NonFiniteLossError: non-finite loss nan at step 7")
    run = tracking.client(uri).get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.TAG_FAILURE].startswith("NonFiniteLossError")
    assert run.data.tags["method"] == "bam"
    assert run.data.tags["version.torch"].startswith("2.") and "version.ray" in run.data.tags
    assert len(run.data.tags["git_commit"]) >= 7
    # resume: reopened as RUNNING; an unchanged param is fine, a changed one is reported, not raised
    tracking.reopen_run(uri, run_id)
    assert tracking.client(uri).get_run(run_id).info.status == "RUNNING"
    assert tracking.log_params(uri, run_id, {"optim.lr": 0.1, "optim.epochs": 3, "new": 1}) == [
        "optim.epochs"
    ]
    params = tracking.client(uri).get_run(run_id).data.params
    assert params == {"optim.lr": "0.1", "optim.epochs": "2", "new": "1"}


# ---------------------------------------------------------------------------------------------- picture
def test_crop_grid_places_real_crops(tmp_path, fmnist_src):
    with gzip.open(fmnist_src / "train-images-idx3-ubyte.gz", "rb") as f:
        raw = f.read(16 + 4 * 784)
    imgs = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(4, 1, 28, 28)
    batch = {
        "global": np.stack([imgs, imgs[..., ::-1]], axis=1),
        "local": np.stack([imgs[..., :14, :14]], axis=1),
    }
    img = crop_grid(batch, pad=2)
    arr = np.asarray(img)
    scale = arr.shape[1] // (3 * 30 + 2)
    assert arr.shape == ((4 * 30 + 2) * scale, (3 * 30 + 2) * scale, 3)
    small = arr[::scale, ::scale, 0]
    # row 1, second global crop = the flipped image; third tile = the local crop upscaled x2
    np.testing.assert_array_equal(small[32:60, 32:60], imgs[1, 0, :, ::-1])
    np.testing.assert_array_equal(small[2:30, 62:90][::2, ::2], imgs[0, 0, :14, :14])
    # and it can be logged as an MLflow image artifact
    uri = _uri(tmp_path)
    run_id = tracking.create_run(uri, "exp", "r", {})
    tracking.MetricLogger(uri, run_id).log_image(img, "crops/first_batch.png")
    names = [a.path for a in tracking.client(uri).list_artifacts(run_id, "crops")]
    assert names == ["crops/first_batch.png"]


def test_ui_command_binds_localhost():
    cmd = ui_command("sqlite:////tmp/x/.bamray/mlflow.db", 5123)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "5123"
    assert cmd[cmd.index("--default-artifact-root") + 1] == "file:///tmp/x/.bamray/mlartifacts"
