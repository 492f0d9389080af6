"""The driver of ``bamray train``: resolve the data, create or re-open the MLflow run (params, tags,
config.yaml), connect to Ray, fit a :func:`build_trainer` trainer, then log the final and best-k-NN
backbones and set the run's status.

The Ray run name is ``f"{cfg.name}-{mlflow_run_id[:8]}"``: ``--resume <run id>`` rebuilds the same
``RunConfig(storage_path, name)``, and Ray Train resumes from that directory's latest checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from data.sources import is_uri
from orchestrator import console, fault_injection, kept_ray, preflight, tracking
from orchestrator.config import ExperimentConfig
from orchestrator.local_ray import connect_or_start
from orchestrator.training import mlflow_run, shards, summary, warm_start
from orchestrator.training.data_prep import knn_source, prepare_data, resolved_data, steps_per_epoch
from orchestrator.training.interrupt import SignalGuard, stop_on_signals
from orchestrator.training.plan import WorkerPlan, knn_epochs
from orchestrator.training.trainer import torch_trainer
from trainers.options import ConfigError

if TYPE_CHECKING:
    from orchestrator.epoch_gate import GatedEpochs


#: How long a stopped run's Ray Train controller gets to abort its workers before Ray is shut down anyway.
_ABORT_TIMEOUT_S = 20.0


def _actor_name(kind: str, run_name: str) -> str:
    return f"bamray-{kind}-{run_name}"


def _data_cpus(train_cpus: float) -> float:
    """CPUs Ray Data may use for decoding/cropping beside the training workers."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 0.0)) if ray.is_initialized() else 0.0
    return max(total - train_cpus, 1.0)


def _datasets(cfg: ExperimentConfig, knn_data: Any, ledger: str) -> tuple[dict[str, Any], Any]:
    """``train`` (the multi-crop stream; absent with ``data.stream: run``, where every worker builds its
    own) and, for the online k-NN on ``knn_data`` (a labelled set's data config, or None), ``knn_train`` /
    ``knn_val`` (clean centre crops), each named by its key; Ray Train splits each across the workers
    (one worker iterates them whole, :mod:`orchestrator.training.shards`). ``ledger`` names the run's
    :class:`data.run_actors.RunLedger`, its corrupt-row counter and its epoch clock in one actor; returns
    its handle too (keep it for as long as the run)."""
    from data.pipeline import build_eval_datasets, build_train_dataset, configure_data_context
    from data.run_actors import get_corrupt_counter

    configure_data_context(_data_cpus(max(cfg.train.workers, 1) * cfg.train.cpus_per_worker))
    # one actor for the run's training and k-NN rows and its epochs (processes fewer to start), owned by
    # the driver so that it outlives any worker
    handle = get_corrupt_counter(ledger)  # its process starts while the rest is built
    datasets = {}
    if cfg.data.stream == "epoch":  # "run": each worker builds its own stream (data.run_stream)
        datasets["train"] = build_train_dataset(
            cfg.data, seed=cfg.seed, epoch_clock=ledger, corrupt_counter=ledger
        )
    if knn_data is not None and knn_epochs(cfg):
        knn_train, knn_val = build_eval_datasets(
            knn_data,
            cfg.eval.knn_train_fraction,
            cfg.eval.knn_eval_fraction,
            cfg.seed,
            corrupt_counter=ledger,
        )
        datasets.update({"knn_train": knn_train, "knn_val": knn_val})
    for name, ds in datasets.items():  # as Ray Train's DataConfig names them: Ray Data's logs and metrics
        if ds.name is None:
            ds.set_name(name)
    return datasets, handle


def build_trainer(
    cfg: ExperimentConfig,
    *,
    run_name: str,
    storage_path: str,
    mlflow_run_id: str | None,
    tracking_uri: str,
    callbacks: list | None = None,
    init_checkpoint: Any = None,
    stop_after_epoch: int | None = None,
    pg_watch: tuple[Any, Any] | None = None,
    epoch_gate: GatedEpochs | tuple[Any, list[int]] | None = None,
    progress_interval_s: float = 0.0,
    label: str = "",
):
    """A Ray Train ``TorchTrainer`` for ``cfg`` (:mod:`orchestrator.training.trainer`; Ray must be
    initialised).

    ``init_checkpoint`` (a ``ray.train.Checkpoint``, e.g. PBT's donor): the workers start from its
    weights, optimiser and epoch when the run has no checkpoint of its own; the MLflow run and every
    hyper-parameter come from ``cfg`` / ``mlflow_run_id``, not from the checkpoint.
    ``stop_after_epoch``: end the run after that epoch (with a checkpoint and a k-NN figure), schedules
    unchanged: one segment of a PBT trial, which Tune may continue, pause or re-seed from another trial.
    ``pg_watch``: ``(reaper, trial actor)`` from :func:`orchestrator.reaper.watch_current_actor`, so the
    run's worker placement group is removed if a Tune scheduler kills the trial mid-run.
    ``epoch_gate``: a :class:`~orchestrator.epoch_gate.GatedEpochs` (or its ``(EpochGate handle, epochs)``
    pair): after reporting one of those epochs the workers wait until the gate is open through it.
    ``progress_interval_s``: rank 0 prints a progress update that often (0: never). ``label``: a prefix of
    its console lines (a sweep's trial id, so interleaved trials can be told apart).
    ``callbacks`` go to ``RunConfig`` (a Tune trial passes a relay to Tune). Every ``ray.train.report``
    carries ``epoch``, ``step``, ``loss`` (epoch mean), ``knn_top1`` / ``knn_top5`` on k-NN epochs and
    ``nan_detected`` when the loss blew up.

    From a Tune trial, pass a config already through :func:`prepare_data` in the sweep's driver and an
    absolute ``storage_path``: relative paths are resolved against the project root found from the
    current directory, which in a trial is the trial's own directory. ``mlflow_run_id=None`` turns the
    workers' MLflow logging off.
    """
    import ray.train

    # no torch here: only the workers use it (orchestrator.training.trainer), and the driver's import of
    # it held back the run's submission (tests/test_imports.py)
    from orchestrator.epoch_gate import GatedEpochs
    from orchestrator.metric_names import SCORE_KEY
    from orchestrator.training.plan import KNN_CACHE_BYTES, knn_cache_bytes, train_loop_per_worker

    cfg, meta = resolved_data(cfg)
    knn = knn_source(cfg, meta)
    if knn is None:
        console.say(
            f"k-NN skipped: the data set {meta.get('name', cfg.data.dataset)!r} has no labels (give a labelled "
            "one with --set eval.dataset=<name>); the label-free signals are logged instead"
        )
    ledger = _actor_name("ledger", run_name)
    datasets, ledger_handle = _datasets(cfg, knn[0] if knn else None, ledger)
    storage_path = tracking.absolute_path(storage_path)
    workers = cfg.train.workers
    plan = WorkerPlan(
        cfg=cfg,
        steps_per_epoch=steps_per_epoch(cfg, meta),
        num_classes=int(knn[1]["num_classes"]) if knn else 0,
        mlflow_run_id=mlflow_run_id,
        tracking_uri=tracking_uri,
        epoch_clock=ledger if cfg.data.stream == "epoch" else "",  # a per-worker stream plans its own epochs
        corrupt_counter=ledger,
        corrupt_counter_handle=ledger_handle,
        run_dir=None if is_uri(storage_path) else os.path.join(storage_path, run_name),
        knn="knn_train" in datasets,
        knn_prefetch=knn is not None and knn_cache_bytes(cfg, *knn) <= KNN_CACHE_BYTES,
        init_checkpoint=init_checkpoint,
        init_weights=_init_weights(cfg),
        stop_after_epoch=stop_after_epoch,
        pg_watch=pg_watch if workers > 0 else None,
        # Train local mode (0 workers) forwards no report to callbacks, so nothing would ever open the gate
        epoch_gate=GatedEpochs.of(epoch_gate) if workers > 0 else None,
        faults=fault_injection.WorkerFaults.of(cfg.debug),
        progress_interval_s=progress_interval_s,
        label=label,
    )
    in_worker = shards.in_worker(workers)
    if in_worker:  # its one worker runs the executions itself: no DatasetManager to boot
        from ray.data import DataContext

        plan.datasets, plan.data_context, datasets = datasets, DataContext.get_current().copy(), {}
    run_config = ray.train.RunConfig(
        name=run_name,
        storage_path=storage_path,
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=cfg.train.keep_checkpoints,
            checkpoint_score_attribute=SCORE_KEY,
            checkpoint_score_order="max",
        ),
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        callbacks=list(callbacks or []),
    )
    return torch_trainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
        scaling_config=_scaling(cfg),
        run_config=run_config,
        datasets=datasets,
        datasets_callback=not in_worker,
    )


def _init_weights(cfg: ExperimentConfig) -> Any:
    """``model.init_from``'s backbone weights for the plan (None when unset: torch stays unimported)."""
    if not cfg.model.init_from:
        return None
    from orchestrator.downstream.init_from import init_weights

    return init_weights(cfg)


def _scaling(cfg: ExperimentConfig) -> Any:
    """Ray Train's ``ScalingConfig``: ``train.workers`` workers of ``train.cpus_per_worker`` CPUs and
    ``train.gpus_per_worker`` GPUs."""
    import ray.train

    resources: dict[str, float] = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.gpus_per_worker > 0:
        resources["GPU"] = cfg.train.gpus_per_worker
    return ray.train.ScalingConfig(
        num_workers=cfg.train.workers, use_gpu=cfg.train.gpus_per_worker > 0, resources_per_worker=resources
    )


def connect_ray(cfg: ExperimentConfig) -> bool:
    """Ray for one training run: ``train.address`` / ``RAY_ADDRESS``, else the local Ray that ``bamray ray
    up`` keeps when the run fits it (:mod:`orchestrator.kept_ray`), else a local Ray with logical CPUs
    oversubscribed (training workers, with ``data.stream: run`` their streams' map actors too, + at least
    2 for Ray Data, so Data never gets a zero budget on a 2-core machine). Returns True when this call
    started or connected Ray (the caller shuts it down). A cluster that refuses the connection is the
    address's fault: a ConfigError naming it."""
    train_cpus = max(cfg.train.workers, 1) * cfg.train.cpus_per_worker + preflight.stream_cpus(cfg)
    gpus = None
    if cfg.train.gpus_per_worker > 0:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else None
    cpus = max(4, math.ceil(train_cpus) + 2)
    if not (cfg.train.address or os.environ.get("RAY_ADDRESS")) and kept_ray.join_for_run(
        cpus, train_cpus, cfg.train.gpus_per_worker > 0
    ):
        return True
    try:
        return connect_or_start(cfg.train.address, cpus, gpus)
    except ConnectionError as err:
        address, field = preflight.ray_address(cfg)
        raise ConfigError(field or "train.address", f"cannot connect to Ray at {address!r}: {err}") from err


def run_training(cfg: ExperimentConfig, *, resume: str | None = None) -> dict[str, Any]:
    """Train ``cfg`` on Ray, tracked in one MLflow run; ``resume`` = an MLflow run id to continue.

    Returns ``{"run_id", "status" ("FINISHED" | "FAILED"), "reason", "metrics", "ray_run_dir",
    "tracking_uri"}``. Config, data and reachability errors (:mod:`orchestrator.preflight`) are raised as
    ``ConfigError`` / ``DataMissingError`` before any MLflow run is created; a cluster too small for the
    workers is refused right after connecting, also before the run exists.

    SIGINT / SIGTERM at any moment (:mod:`orchestrator.training.interrupt`) raise
    :class:`~orchestrator.training.interrupt.Interrupted` once the MLflow run (if created) is marked
    KILLED and the Ray this call started is shut down; the exception's ``run_id`` is the run to resume.

    Resuming a FINISHED run does nothing (no Ray, no metric logged twice) and returns its status, unless
    ``optim.epochs`` now asks for more epochs than it had: then it trains the extra epochs from its last
    checkpoint. Every schedule (lr, wd, teacher momentum, warm-ups) is indexed by the global step over
    the new ``optim.epochs``, so at the resume point the lr and wd jump to their values at that step of
    the longer schedule (a cosine lr rises again) and decay to the end of the new length; warm-ups that
    were over stay over. The run's logged params keep the original values (MLflow params are immutable);
    the tag ``resume_changed_params`` lists ``optim.epochs``.
    """
    with stop_on_signals() as guard:
        uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
        preflight.check_tracking_uri(uri)
        previous = mlflow_run.previous_run(uri, resume) if resume else None
        if (
            previous is not None
            and previous.info.status == "FINISHED"
            and not mlflow_run.extends(cfg, previous)
        ):
            console.say(
                f"MLflow run {resume} already FINISHED its {previous.data.params.get('optim.epochs', '?')} "
                "epochs: nothing to do (ask for more with --set optim.epochs=N)"
            )
            return {"run_id": resume, "tracking_uri": uri, "status": "FINISHED", "reason": "already finished"}
        cfg, meta = prepare_data(cfg)
        steps_per_epoch(cfg, meta)  # refuse an impossible batch before anything starts
        log_path = console.get().log_path or console.get().open_log(console.default_log_path("train", uri))
        storage = mlflow_run.storage(cfg, previous)
        preflight.check_job(cfg, uri, storage)
        guard.check()
        started, run_id = False, None
        _import_in_background(_run_modules(uri))  # while Ray starts, which mostly waits on its processes
        try:
            with guard.deferred("Ray has started"):  # a half-started Ray could not be shut down
                started = connect_ray(cfg)
            guard.reinstall()
            from data.run_actors import pin_ray_data_singletons  # Ray's: not imported before Ray is needed

            pin_ray_data_singletons(wait=False)  # their processes start while the MLflow run is created
            warm_start.warm_map_workers(cfg)
            if started and preflight.ray_address(cfg)[0]:
                preflight.check_cluster_resources(cfg)
            with guard.deferred("the MLflow run is created"):  # a run whose id we never got stays RUNNING
                run_id, ray_run_name = mlflow_run.open_run(cfg, uri, previous)
            summary.log_description(uri, run_id, summary.what_line(cfg))
            out = _fit(cfg, uri, run_id, ray_run_name, storage, guard)
        except KeyboardInterrupt as err:
            guard.stopping()
            stop = guard.as_interrupted(err)
            if run_id is not None:
                stop.run_id = run_id
                reason = f"stopped by {stop.name}; continue with `bamray train --resume {run_id}`"
                tracking.finish_run(uri, run_id, "KILLED", reason)
            if stop is err:
                raise
            raise stop from None
        finally:
            if started:
                _shutdown_ray()
    out["log_path"] = str(log_path)
    _print_summary(cfg, out)
    return out


def _run_modules(uri: str) -> tuple[str, ...]:
    """What the driver imports once Ray is up, in the order it needs them: Ray Data (the helper actors),
    MLflow (the run; for a database store its SQLAlchemy store), Ray Train. Ray Train was imported before
    ``ray.init`` (seconds of CPU in a row, with a core idle); here it takes the CPU that Ray's start leaves
    while the driver waits for its processes. No torch: the driver does not use it."""
    db = uri.split(":", 1)[0].split("+", 1)[0] in {"sqlite", "postgresql", "mysql", "mssql"}
    store = ("mlflow.store.tracking.sqlalchemy_store",) if db else ()
    return ("ray.data", "mlflow", *store, "ray.train", "ray.train.v2.api.data_parallel_trainer")


def _import_in_background(modules: tuple[str, ...]) -> None:
    """Import ``modules`` in a daemon thread: seconds of CPU that overlap Ray's start instead of following
    it. An import that fails here fails again, with its message, where the module is used."""

    def work() -> None:
        for name in modules:
            with contextlib.suppress(Exception):
                importlib.import_module(name)

    threading.Thread(target=work, name="bamray-warm-imports", daemon=True).start()


def _fit(
    cfg: ExperimentConfig, uri: str, run_id: str, ray_run_name: str, storage: str, guard: SignalGuard
) -> dict[str, Any]:
    """Fit the run's trainer and record the outcome in its MLflow run: FINISHED / FAILED (returned); on
    :class:`Interrupted` the Ray Train run is aborted and the exception goes on to the caller."""
    from ray.train import TrainingFailedError

    ray_gone = _ray_gone_errors()
    ray_run_dir = storage if is_uri(storage) else os.path.join(storage, ray_run_name)
    out: dict[str, Any] = {"run_id": run_id, "tracking_uri": uri, "ray_run_dir": ray_run_dir, "metrics": {}}
    controller: list[Any] = []
    try:
        console.say(f"MLflow run {run_id} ({uri}); Ray Train run {ray_run_dir}")
        trainer = build_trainer(
            cfg,
            run_name=ray_run_name,
            storage_path=storage,
            mlflow_run_id=run_id,
            tracking_uri=uri,
            callbacks=fault_injection.driver_exit_callbacks(),
            progress_interval_s=console.get().progress_interval_s(),
        )
        # Ray Train's own SIGINT handler would abort and sys.exit(0); keep ours, and the controller to abort
        trainer._register_sigint_handler = controller.append
        guard.check()
        t0 = time.perf_counter()
        result = trainer.fit()
        out["wall_time_s"] = time.perf_counter() - t0
        guard.reinstall()
        _finish(cfg, uri, run_id, result, out)
    except TrainingFailedError as err:
        reason = f"{type(err).__name__}: {err}"
        console.log_to_run(uri, run_id)
        tracking.finish_run(uri, run_id, "FAILED", reason)
        out.update(status="FAILED", reason=reason)
    except (KeyboardInterrupt, SystemExit) as err:  # a signal: the caller marks the run KILLED
        guard.stopping()
        _abort(controller)
        if isinstance(err, KeyboardInterrupt):
            raise
        raise guard.as_interrupted(err) from None
    except ray_gone as err:  # Ray itself went away under the run: say so and how to continue, no traceback
        reason = (
            f"Ray stopped under the run ({type(err).__name__}: its processes were killed or its head node was "
            f"lost); the checkpoints are kept: continue with `bamray train --resume {run_id}`"
        )
        console.log_to_run(uri, run_id)
        tracking.finish_run(uri, run_id, "FAILED", reason)
        out.update(status="FAILED", reason=reason)
    except BaseException as err:
        tracking.finish_run(uri, run_id, "FAILED", f"{type(err).__name__}: {err}")
        raise
    return out


def _ray_gone_errors() -> tuple[type[BaseException], ...]:
    """What ``trainer.fit()`` raises when Ray itself is gone rather than the training failing: the Train
    controller (an actor on the driver's node) died or cannot be reached, the local raylet died. Ray
    Train turns a worker's failure into ``TrainingFailedError``; these mean the run lost its Ray."""
    from ray import exceptions as rex

    return (rex.RayActorError, rex.RaySystemError, rex.LocalRayletDiedError, rex.NodeDiedError)


def _abort(controller: list[Any]) -> None:
    """Abort the Ray Train run the way Ray Train's own Ctrl-C does (workers stopped, run state ABORTED);
    its checkpoints stay. The controller collects the workers' reports, and registers their checkpoints
    in the run's snapshot that ``--resume`` starts from, only once per health-check interval: it gets one
    more before the abort, or the checkpoint of the epoch that just ended would be on disk but unknown
    to a resumed run. The controller exits as it aborts, so its call ends in an actor error."""
    import ray

    if not controller:
        return
    time.sleep(_controller_poll_interval_s() + 0.5)
    for handle in controller:
        with contextlib.suppress(Exception):
            ray.get(handle.abort.remote(), timeout=_ABORT_TIMEOUT_S)


def _controller_poll_interval_s() -> float:
    try:
        from ray.train.v2._internal.constants import (
            DEFAULT_HEALTH_CHECK_INTERVAL_S,
            HEALTH_CHECK_INTERVAL_S_ENV_VAR,
        )
    except ImportError:  # another Ray: its default
        return 2.0
    return float(os.environ.get(HEALTH_CHECK_INTERVAL_S_ENV_VAR, DEFAULT_HEALTH_CHECK_INTERVAL_S))


def _shutdown_ray() -> None:
    import ray

    ray.shutdown()


def _has_labels(cfg: ExperimentConfig) -> bool:
    """A labelled set to evaluate on, as the online k-NN finds it (:func:`knn_source`)."""
    from data.sources import read_meta

    return knn_source(cfg, read_meta(cfg.data.path)) is not None


def _finish(cfg: ExperimentConfig, uri: str, run_id: str, result: Any, out: dict[str, Any]) -> None:
    """Record a fitted run: FAILED on a NaN loss; else the final and best-k-NN backbones, the summary
    metrics, the linear probe when asked for, and FINISHED."""
    ret = result.return_value or {}
    out["worker_result"] = ret
    if "start_epoch" in ret:  # 0 = from scratch; > 0 = Ray Train resumed from a checkpoint
        tags = {"bamray.start_epoch": ret["start_epoch"]}
        if "start_step" in ret:  # a checkpoint taken inside an epoch resumes at its step
            tags["bamray.start_step"] = ret["start_step"]
        tracking.log_tags(uri, run_id, tags)
    out["metrics"] = dict(result.metrics or {})
    out["checkpoint"] = result.checkpoint.path if result.checkpoint else None
    if ret.get("status") == "nan":
        reason = ret.get("reason", "non-finite loss")
        tracking.finish_run(uri, run_id, "FAILED", reason)
        out.update(status="FAILED", reason=reason)
        return
    step = int(ret.get("final_step", 0))
    tracking.log_checkpoint_artifacts(uri, run_id, result.checkpoint, "final")
    best, best_score = tracking.best_checkpoint(result)
    if best is not None:
        tracking.log_checkpoint_artifacts(uri, run_id, best, "best_knn")
        tracking.log_metrics(uri, run_id, {"best_knn_top1": best_score}, step=step)
    tracking.log_metrics(uri, run_id, {"train_wall_time_s": out["wall_time_s"]}, step=step)
    if cfg.eval.linear_at_end and not _has_labels(cfg):
        console.say("linear probe skipped: the data set has no labels (set eval.dataset=<labelled set>)")
    elif cfg.eval.linear_at_end:
        from orchestrator.training.evaluate import run_linear_eval

        t0 = time.perf_counter()
        out["linear_top1"] = run_linear_eval(run_id, uri)
        out["linear_time_s"] = time.perf_counter() - t0
    summary.log_description(uri, run_id, summary.what_line(cfg, ret.get("epochs")), result)
    console.log_to_run(uri, run_id)
    tracking.finish_run(uri, run_id, "FINISHED")
    out.update(status="FINISHED", reason=None)


def _print_summary(cfg: ExperimentConfig, out: dict[str, Any]) -> None:
    """The end-of-run summary (:mod:`orchestrator.training.summary`)."""
    from orchestrator.mlflow_ui import ui_url
    from orchestrator.training.summary import epoch_history, summary_lines, wall_split, what_line

    uri, run_id = out["tracking_uri"], out["run_id"]
    ui = "bamray ui" if uri == tracking.default_tracking_uri() else f"bamray ui --tracking-uri {uri}"
    worker = out.get("worker_result") or {}
    try:
        history = epoch_history(uri, run_id)
        experiment = tracking.client(uri).get_run(run_id).info.experiment_id
    except Exception:  # the store went away: the summary still says where the run is
        history, experiment = {}, "0"
    started = console.get().started
    split = (
        wall_split(time.time() - started, worker, started, out.get("linear_time_s", 0.0)) if worker else None
    )
    what = what_line(cfg, worker.get("epochs"))
    for line in summary_lines(
        run_id=run_id,
        status=str(out.get("status")),
        reason=out.get("reason"),
        what=what,
        history=history,
        pixels_top1=worker.get("knn_pixels_top1"),
        linear_top1=out.get("linear_top1"),
        split=split,
        ui=ui,
        run_url=ui_url(5000, experiment, run_id),
        checkpoints=out.get("ray_run_dir"),
        log_path=out.get("log_path"),
    ):
        console.say(line)
