"""MLflow tracking: where the store is, who writes what, and how several runs share one SQLite file.

One MLflow run per training run, and ONE writer per kind of data: the driver logs params, tags, status
and artifacts; the rank-0 worker logs per-step metrics (buffered, sent with ``log_batch``). The
embedded default store is ``sqlite:///<project>/.bamray/mlflow.db`` with artifacts in
``<project>/.bamray/mlartifacts``; ``--tracking-uri`` / ``MLFLOW_TRACKING_URI`` select a server.

Why several concurrent runs never see "database is locked" or lose metrics on the SQLite store:

- schema creation (the racy part: two processes migrating a fresh file) and experiment creation run
  under an exclusive ``fcntl`` lock on ``mlflow.db.lock``, once, in the driver before any worker starts;
- metrics travel in batches (one transaction per ~50 metrics, not one per value), so writers hold the
  database lock rarely and briefly; MLflow's own ``busy_timeout`` (20 s) absorbs ordinary contention;
- every write goes through :func:`with_retry`, which retries MLflow's TEMPORARILY_UNAVAILABLE /
  "database is locked" errors and connection errors with exponential backoff instead of dropping them.

Restarts log every (metric, step) exactly once: a restarted worker reads the run's per-key
high-water marks (:func:`logged_high_water_marks`) and skips steps that were already logged before the
failure (the restarted epoch recomputes them).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.metric_names import mlflow_key
from trainers.fileio import file_lock

logger = logging.getLogger(__name__)

T = TypeVar("T")

BAMRAY_DIR = ".bamray"
#: The experiment tag the MLflow UI reads to pick its view, and the value of the model-training view.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
DB_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
MAX_PARAM_LENGTH = 6000  # MLflow 3 param value limit
MAX_TAG_LENGTH = 5000  # kept under MLflow's tag value limit
PARAMS_PER_BATCH = 100  # MLflow log_batch limit for params
METRICS_PER_BATCH = 1000  # MLflow log_batch limit for metrics
TAG_RAY_RUN = "bamray.ray_run_name"
TAG_STORAGE = "bamray.storage_path"
TAG_FAILURE = "failure_reason"


# ---------------------------------------------------------------------------------------------- where
def project_root(start: str | os.PathLike | None = None) -> Path:
    """``$BAMRAY_HOME``, else the nearest ancestor of ``start`` (cwd) holding ``.bamray`` or a
    ``pyproject.toml``, else ``start``: runs started from a sub-folder land in the same store."""
    env = os.environ.get("BAMRAY_HOME")
    if env:
        return Path(env).resolve()
    here = Path(start or os.getcwd()).resolve()
    for p in (here, *here.parents):
        if (p / BAMRAY_DIR).is_dir() or (p / "pyproject.toml").is_file():
            return p
    return here


def absolute_path(path: str, root: str | os.PathLike | None = None) -> str:
    """``path`` anchored at the project root (``root`` when given) unless it is empty, absolute or a URI:
    Ray workers and Tune trials run in their own directories, so a relative path must be resolved
    once, by the driver."""
    from data.sources import is_uri

    if not path or is_uri(path) or os.path.isabs(path):
        return path
    return str((Path(root) if root else project_root()).joinpath(path).resolve())


def default_tracking_uri(root: str | os.PathLike | None = None) -> str:
    """``sqlite:////abs/path/.bamray/mlflow.db`` (absolute, so Ray workers whose cwd is their trial
    directory write to the same file)."""
    base = Path(root).resolve() if root else project_root()
    return f"sqlite:///{(base / BAMRAY_DIR / DB_FILE).as_posix()}"


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """``explicit`` (``--tracking-uri`` / ``tracking.tracking_uri``), else ``MLFLOW_TRACKING_URI``,
    else the embedded store. Relative sqlite paths are made absolute for the same reason as above."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    path = sqlite_path(uri)
    if path is not None and not path.is_absolute():
        uri = f"sqlite:///{path.resolve().as_posix()}"
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :])


def artifact_root(uri: str) -> str | None:
    """``file://`` URI of the artifact folder next to an SQLite store (None for servers, which decide)."""
    path = sqlite_path(uri)
    if path is None:
        return None
    return (path.parent / ARTIFACT_DIR).resolve().as_uri()


# ---------------------------------------------------------------------------------------------- robustness
def _is_transient(err: BaseException) -> bool:
    text = str(err).lower()
    if "database is locked" in text or "database table is locked" in text or "busy" in text:
        return True
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE, ErrorCode

        if isinstance(err, MlflowException) and err.error_code == ErrorCode.Name(TEMPORARILY_UNAVAILABLE):
            # A server's 503 reaches us only after MLflow's own HTTP retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES,
            # minutes of backoff): retrying it again would multiply that wait by our attempts.
            return "API request to" not in str(err)
    except ImportError:  # pragma: no cover
        pass
    try:
        import sqlite3

        if isinstance(err, sqlite3.OperationalError):
            return True
    except ImportError:  # pragma: no cover
        pass
    try:
        import requests

        if isinstance(err, (requests.ConnectionError, requests.Timeout)):
            return True
    except ImportError:  # pragma: no cover
        pass
    return False


def with_retry(
    fn: Callable[..., T], *args: Any, attempts: int = 8, base_delay: float = 0.2, **kwargs: Any
) -> T:
    """Call ``fn`` and retry transient store errors (locked SQLite, server unreachable) with exponential
    backoff (0.2 s, 0.4 s, ... capped at 10 s) rather than dropping the write."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - filtered below
            if attempt == attempts - 1 or not _is_transient(err):
                raise
            delay = min(base_delay * 2**attempt, 10.0)
            logger.warning("MLflow write failed (%s); retrying in %.1f s", err, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Exclusive inter-process lock for one-time store set-up on an SQLite file (no-op for servers)."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    with file_lock(str(path) + ".lock"):
        yield


def client(uri: str):
    """An ``MlflowClient`` for ``uri`` (imported lazily: the CLI's config checks must not pay for it)."""
    from mlflow import MlflowClient

    from orchestrator.console import quiet_mlflow_loggers

    quiet_mlflow_loggers()
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    """Create (or find) the experiment, with its artifacts under ``.bamray/mlartifacts`` for SQLite.

    Runs under :func:`store_lock`, so concurrent first runs do not race the schema migration or
    create the experiment twice."""
    with store_lock(uri):
        c = with_retry(client, uri)  # creating the store runs the schema migration on a fresh file
        exp = with_retry(c.get_experiment_by_name, name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                with_retry(c.restore_experiment, exp.experiment_id)
            if EXPERIMENT_KIND_TAG not in exp.tags:  # made before bamray set it
                with_retry(c.set_experiment_tag, exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        root = artifact_root(uri)
        location = f"{root}/{_safe_name(name)}" if root else None
        # the UI opens an experiment of this kind in its model-training view (runs, charts), not GenAI's
        tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        return with_retry(c.create_experiment, name, artifact_location=location, tags=tags)


def start_system_metrics(
    uri: str, run_id: str, *, interval_s: float, node_id: str | None = None, resume: bool = False
) -> Any:
    """Start MLflow's system-metrics sampler for this machine (``system/cpu_utilization_percentage``,
    memory, disk, network, and the GPUs when ``nvidia-ml-py`` finds them; ``system/<node_id>/...`` on a
    multi-node run) in a background thread logging to ``run_id``; returns it (:func:`stop_system_metrics`
    stops it), or None when ``psutil`` is missing. ``resume``: continue the run's earlier system-metric steps."""
    try:
        import psutil  # noqa: F401 - the sampler's one requirement
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError:
        return None
    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=interval_s, resume_logging=resume, node_id=node_id, tracking_uri=uri
    )
    monitor.start()
    return monitor


def stop_system_metrics(monitor: Any) -> None:
    """Stop a sampler from :func:`start_system_metrics` and log what it holds unlogged.

    MLflow's loop takes a sample, waits the interval, and stops without logging when it is told to stop
    during the wait: every run loses its last sample, and a run shorter than one interval (a short or
    fast run, every PBT segment) would have no system metrics at all."""
    monitor.finish()
    pending = {k: v for k, v in monitor.aggregate_metrics().items() if v == v}  # NaN: nothing sampled
    if pending:
        monitor.publish_metrics(pending)
        with_retry(monitor.mlflow_logger.flush)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "experiment"


def _param_value(v: Any) -> str:
    s = str(v if not isinstance(v, (list, tuple)) else list(v))
    return s if len(s) <= MAX_PARAM_LENGTH else s[: MAX_PARAM_LENGTH - 3] + "..."


def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> list[str]:
    """Log flattened params in batches; params already on the run are skipped (MLflow params are
    immutable, a resumed run keeps its original values). Returns the keys whose value differs."""
    from mlflow.entities import Param

    c = client(uri)
    existing = with_retry(c.get_run, run_id).data.params
    new, changed = [], []
    for k, v in params.items():
        value = _param_value(v)
        if k in existing:
            if existing[k] != value:
                changed.append(k)
            continue
        new.append(Param(k, value))
    for i in range(0, len(new), PARAMS_PER_BATCH):
        with_retry(c.log_batch, run_id, params=new[i : i + PARAMS_PER_BATCH])
    return changed


def log_tags(uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, str(v)[:MAX_TAG_LENGTH]) for k, v in tags.items()]
    c = client(uri)
    for i in range(0, len(items), PARAMS_PER_BATCH):
        with_retry(c.log_batch, run_id, tags=items[i : i + PARAMS_PER_BATCH])


def create_run(uri: str, experiment: str, run_name: str, tags: Mapping[str, str]) -> str:
    exp_id = ensure_experiment(uri, experiment)
    run = with_retry(client(uri).create_run, exp_id, run_name=run_name, tags=dict(tags))
    return run.info.run_id


def reopen_run(uri: str, run_id: str):
    """Mark an existing run RUNNING again (``--resume``) and return it."""
    c = client(uri)
    run = with_retry(c.get_run, run_id)
    with_retry(c.update_run, run_id, status="RUNNING")
    return run


def finish_run(uri: str, run_id: str, status: str, reason: str | None = None) -> None:
    """Set the final status; a failure also gets the ``failure_reason`` tag (the UI shows it)."""
    c = client(uri)
    if reason:
        with_retry(c.set_tag, run_id, TAG_FAILURE, reason[:MAX_TAG_LENGTH])
    with_retry(c.set_terminated, run_id, status=status)


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Driver-side one-off metrics (final summary, linear probe), named as :func:`mlflow_key` says."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(mlflow_key(k), float(v), ts, int(step)) for k, v in metrics.items() if _finite(v)]
    if items:
        with_retry(client(uri).log_batch, run_id, metrics=items)


def log_artifacts(
    uri: str, run_id: str, local_dir: str | os.PathLike, artifact_path: str | None = None
) -> None:
    with_retry(client(uri).log_artifacts, run_id, str(local_dir), artifact_path)


def log_config_artifact(uri: str, run_id: str, cfg: Any) -> None:
    """The resolved config as ``config.yaml`` on the run: what ``--resume`` without ``--config`` reads."""
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        log_artifacts(uri, run_id, tmp)


def log_checkpoint_artifacts(uri: str, run_id: str, checkpoint: Any, artifact_path: str) -> bool:
    """Log a Ray Train checkpoint's exported backbone (safetensors + config.yaml) under ``artifact_path``
    ("final", "best_knn"). Returns False, logging nothing, when there is no checkpoint or no export."""
    from orchestrator.checkpointing import BACKBONE_FILE, CONFIG_FILE

    if checkpoint is None:
        return False
    with checkpoint.as_directory() as d, tempfile.TemporaryDirectory() as tmp:
        for name in (BACKBONE_FILE, CONFIG_FILE):
            src = Path(d, name)
            if not src.exists():
                return False
            Path(tmp, name).write_bytes(src.read_bytes())
        log_artifacts(uri, run_id, tmp, artifact_path)
    return True


def best_checkpoint(result: Any) -> tuple[Any, float]:
    """The kept checkpoint of a Ray Train ``Result`` with the highest k-NN score, and that score
    (``(None, -inf)`` when no kept checkpoint was evaluated: unevaluated ones score -1)."""
    from orchestrator.checkpointing import SCORE_KEY

    best, best_score = None, -math.inf
    for checkpoint, metrics in result.best_checkpoints or []:
        score = float((metrics or {}).get(SCORE_KEY, -1.0))
        if score >= 0 and score > best_score:
            best, best_score = checkpoint, score
    return best, best_score


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------- worker side
def logged_high_water_marks(uri: str, run_id: str) -> dict[str, int]:
    """For each metric already on the run, the largest step logged (restart de-duplication)."""
    c = client(uri)
    run = with_retry(c.get_run, run_id)
    marks = {}
    for key in run.data.metrics:
        history = with_retry(c.get_metric_history, run_id, key)
        if history:
            marks[key] = max(int(m.step) for m in history)
    return marks


class MetricLogger:
    """Buffered per-step metric writer for the rank-0 worker (the run's only metric writer).

    Metrics are kept in memory and sent with ``log_batch`` every ``flush_every`` values or
    ``flush_secs`` seconds, and on :meth:`flush`. ``(key, step)`` pairs at or below the high-water mark
    of a previous attempt are dropped, so a restart that recomputes an epoch does not log it twice.
    Non-finite values are dropped (MLflow stores NaN, but a NaN point in a loss chart hides the rest).

    Nothing of MLflow is touched before the first flush: the client, its store and ``skip_upto`` (a
    mapping, or a callable returning one, such as :func:`logged_high_water_marks`) are resolved then. A
    worker creates its logger before its first step, and on a 2-CPU machine importing MLflow and opening
    a SQLite store there (2 s of CPU) delayed that step; each value keeps the time it was logged at.
    """

    def __init__(
        self,
        uri: str,
        run_id: str,
        *,
        flush_every: int = 200,
        flush_secs: float = 15.0,
        skip_upto: Mapping[str, int] | Callable[[], Mapping[str, int]] | None = None,
    ):
        self.uri = uri
        self.run_id = run_id
        self.flush_every = flush_every
        self.flush_secs = flush_secs
        self._skip_upto = skip_upto if callable(skip_upto) else dict(skip_upto or {})
        self._buffer: list[tuple[str, float, int, int]] = []  # (key, value, ms timestamp, step)
        self._last_flush = time.monotonic()
        self._mlflow_client: Any = None
        self.logged = 0

    @property
    def skip_upto(self) -> dict[str, int]:
        if callable(self._skip_upto):  # read once, at the first flush
            self._skip_upto = dict(self._skip_upto())
        return self._skip_upto

    @property
    def _client(self) -> Any:
        if self._mlflow_client is None:
            self._mlflow_client = client(self.uri)
        return self._mlflow_client

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        ts = int(time.time() * 1000)
        for name, v in metrics.items():
            if _finite(v):
                self._buffer.append((mlflow_key(name), float(v), ts, int(step)))
        if len(self._buffer) >= self.flush_every or time.monotonic() - self._last_flush > self.flush_secs:
            self.flush()

    def flush(self) -> None:
        from mlflow.entities import Metric

        skip = self.skip_upto
        self._buffer = [m for m in self._buffer if m[3] > skip.get(m[0], -1)]
        while self._buffer:
            chunk = [Metric(*m) for m in self._buffer[:METRICS_PER_BATCH]]
            with_retry(self._client.log_batch, self.run_id, metrics=chunk)
            del self._buffer[: len(chunk)]
            self.logged += len(chunk)
        self._last_flush = time.monotonic()

    def log_image(self, image: Any, artifact_file: str) -> None:
        with_retry(self._client.log_image, self.run_id, image, artifact_file=artifact_file)

    def log_image_step(self, image: Any, key: str, step: int) -> None:
        """An image of a series (``key``) at ``step``: the UI's image view steps through them."""
        with_retry(self._client.log_image, self.run_id, image, key=key, step=step)
