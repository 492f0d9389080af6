"""`bamray train`: a Ray Train TorchTrainer running the method's step on every worker, tracked in MLflow.

Driver (:func:`run_training`): resolves the data (auto-preparing Fashion-MNIST from the Debian IDX
files), creates or re-opens the MLflow run (params, tags, config.yaml), connects to Ray, fits the
:func:`build_trainer` trainer, then logs the final and best-k-NN backbones as artifacts and sets the
run's status. Workers (:func:`train_loop_per_worker`) are pure data -> torch: Ray Data shard ->
uint8 crops -> ``trainers.engine.Engine.train_step`` on the DDP-wrapped method.

Fault tolerance, as Ray Train 2.60 (Train V2) does it:

- a worker error (``WorkerGroupError``) is retried up to ``FailureConfig(max_failures)`` times; the
  new worker group calls ``ray.train.get_checkpoint()`` and continues from the next epoch with the
  optimiser, scaler, teacher, global step (so every schedule continues) and RNG states restored;
- a NaN/Inf loss must not be retried (it would recur): the loop catches ``NonFiniteLossError`` on every
  rank at the same step (a per-step all-reduce of the "finite" flag makes the decision global), reports
  ``nan_detected`` without a checkpoint and returns ``{"status": "nan"}``; the driver marks the MLflow
  run FAILED with the reason. Ray Train V2's DefaultFailurePolicy retries every worker error, so
  raising would have burnt ``max_failures`` restarts on a deterministic failure;
- the Ray run name is ``f"{cfg.name}-{mlflow_run_id[:8]}"``: ``--resume <run id>`` rebuilds the same
  ``RunConfig(storage_path, name)``, and Ray Train resumes from that directory's latest checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import itertools
import math
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from data.sources import is_uri
from orchestrator import checkpointing as ckpt
from orchestrator import tracking
from orchestrator.config import ExperimentConfig, config_from_dict
from orchestrator.local_ray import start_local_ray
from trainers.engine import normalise_uint8
from trainers.options import ConfigError, flatten

FMNIST_SRC = os.environ.get("BAMRAY_FMNIST_SRC", "/usr/share/datasets/fashion-mnist")
KNN_BATCH = 256
#: Per-worker host memory for caching the clean k-NN images between evaluations (uint8 bytes).
KNN_CACHE_BYTES = int(os.environ.get("BAMRAY_KNN_CACHE_BYTES", str(512 * 2**20)))
#: Ray Train ranks checkpoints by this (k-NN top-1 when evaluated, -1 otherwise): the latest checkpoint
#: is always kept for resume, the best one for the "best_knn" artifact.
SCORE_KEY = "checkpoint_score"
#: Test hook: the driver exits (os._exit, like a kill) once this many epochs have been checkpointed.
EXIT_AFTER_EPOCHS_ENV = "BAMRAY_TEST_EXIT_DRIVER_AFTER_EPOCHS"


def _exit_after_checkpoints() -> int:
    """The :data:`EXIT_AFTER_EPOCHS_ENV` test hook's count of checkpoints (0 = off)."""
    return int(os.environ.get(EXIT_AFTER_EPOCHS_ENV, "0") or 0)


# ================================================================================================ helpers
def train_rows(cfg: ExperimentConfig, meta: dict[str, Any]) -> int:
    """Images one epoch streams: the prepared train count, capped by ``data.train_limit``."""
    count = int(meta["counts"]["train"])
    return min(count, cfg.data.train_limit) if cfg.data.train_limit > 0 else count


def steps_per_epoch(cfg: ExperimentConfig, meta: dict[str, Any]) -> int:
    """Optimiser steps per epoch: every worker gets ``rows // world`` rows (``streaming_split(equal=True)``)
    and drops its last partial batch, so ``rows // (batch * world)``; refuse a config that gives 0."""
    rows = train_rows(cfg, meta)
    steps = rows // (cfg.optim.batch_size * cfg.world_size)
    if steps < 1:
        raise ConfigError("optim.batch_size",
                          f"got {cfg.optim.batch_size}; {rows} train images over {cfg.world_size} worker(s) give no "
                          f"full batch: need batch_size x workers <= {rows}")
    return steps


def _absolute(path: str, root: Path) -> str:
    """Relative paths are anchored at the project root: Ray workers run in their trial directory."""
    if not path or is_uri(path) or os.path.isabs(path):
        return path
    return str((root / path).resolve())


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def prepare_data(cfg: ExperimentConfig) -> tuple[ExperimentConfig, dict[str, Any]]:
    """Resolve the shard directory to an absolute path (auto-preparing Fashion-MNIST when its IDX source
    files are installed) and read its meta. Returns a config whose ``data.path`` is absolute."""
    from data.sources import DataMissingError, prepare_fashion_mnist, read_meta, resolve_shards

    root = tracking.project_root()
    data_cfg = dataclasses.replace(cfg.data, data_root=_absolute(cfg.data.data_root, root),
                                   path=_absolute(cfg.data.path, root))
    path = resolve_shards(data_cfg)
    try:
        meta = read_meta(path)
    except DataMissingError:
        src = Path(FMNIST_SRC)
        if data_cfg.dataset != "fashion-mnist" or data_cfg.path or not (src / "train-images-idx3-ubyte.gz").exists():
            raise
        with _file_lock(str(path).rstrip("/") + ".lock"):  # two first runs must not write the same shards
            try:
                meta = read_meta(path)
            except DataMissingError:
                print(f"Fashion-MNIST shards not found: preparing them from {src} into {path} (once)", flush=True)
                prepare_fashion_mnist(path, src_dir=str(src))
                meta = read_meta(path)
    if not is_uri(str(path)):
        path = str(Path(path).resolve())
    data_cfg = dataclasses.replace(data_cfg, path=str(path))
    if int(meta.get("channels", cfg.data.channels)) != cfg.data.channels:
        raise ConfigError("data.channels", f"got {cfg.data.channels}; the shards in {path} have "
                                           f"{meta['channels']} channel(s)")
    return dataclasses.replace(cfg, data=data_cfg), meta


def _actor_name(kind: str, run_name: str) -> str:
    return f"bamray-{kind}-{run_name}"


# ================================================================================================ trainer
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
    epoch_gate: tuple[Any, list[int]] | None = None,
):
    """A ``ray.train.torch.TorchTrainer`` for ``cfg`` (Ray must be initialised).

    ``init_checkpoint`` (a ``ray.train.Checkpoint``, e.g. PBT's donor): the workers start from its
    weights, optimiser and epoch when the run has no checkpoint of its own; the MLflow run and every
    hyper-parameter come from ``cfg`` / ``mlflow_run_id``, not from the checkpoint.
    ``stop_after_epoch``: end the run after that epoch (with a checkpoint and a k-NN figure), schedules
    unchanged: one segment of a PBT trial, which Tune may continue, pause or re-seed from another trial.
    ``pg_watch``: ``(reaper, trial actor)`` from :func:`orchestrator.reaper.watch_current_actor`, so the
    run's worker placement group is removed if a Tune scheduler kills the trial mid-run.
    ``epoch_gate``: ``(EpochGate handle, epochs)``: after reporting one of those epochs the workers wait
    until the gate is open through it (a Tune trial's scheduler decision, see orchestrator/epoch_gate.py).

    Datasets: ``train`` (multi-crop stream) and, for the online k-NN, ``knn_train`` / ``knn_val`` (clean
    centre crops); Ray splits each across the workers. ``callbacks`` go to ``RunConfig`` (a Tune trial
    passes a relay to Tune). Every ``ray.train.report`` carries ``epoch``, ``step``, ``loss``
    (epoch mean), ``knn_top1`` / ``knn_top5`` on k-NN epochs and ``nan_detected`` when the loss blew up.

    From a Tune trial, pass a config already through :func:`prepare_data` in the sweep's driver and an
    absolute ``storage_path``: relative paths are resolved against the project root found from the
    current directory, which in a trial is the trial's own directory. ``mlflow_run_id=None`` turns the
    workers' MLflow logging off.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from data.pipeline import build_eval_datasets, build_train_dataset, configure_data_context

    if not cfg.data.path or (not is_uri(cfg.data.path) and not os.path.isabs(cfg.data.path)):
        cfg, meta = prepare_data(cfg)
    else:
        from data.sources import read_meta

        meta = read_meta(cfg.data.path)
    steps = steps_per_epoch(cfg, meta)
    workers = cfg.train.workers
    train_cpus = max(workers, 1) * cfg.train.cpus_per_worker
    configure_data_context(_data_cpus(train_cpus))

    clock_name = _actor_name("epoch", run_name)
    counter_name = _actor_name("corrupt", run_name)
    train_ds = build_train_dataset(cfg.data, seed=cfg.seed, epoch_clock=clock_name, corrupt_counter=counter_name)
    datasets = {"train": train_ds}
    if _knn_epochs(cfg):
        knn_train, knn_val = build_eval_datasets(cfg.data, cfg.eval.knn_train_fraction, cfg.eval.knn_eval_fraction,
                                                 cfg.seed, corrupt_counter=_actor_name("corrupt-eval", run_name))
        datasets.update({"knn_train": knn_train, "knn_val": knn_val})

    storage_path = _absolute(storage_path, tracking.project_root())
    run_dir = None if is_uri(storage_path) else os.path.join(storage_path, run_name)
    loop_config = {
        "cfg": cfg.to_dict(),
        "meta": {"num_classes": int(meta["num_classes"]), "counts": dict(meta["counts"])},
        "steps_per_epoch": steps,
        "mlflow_run_id": mlflow_run_id,
        "tracking_uri": tracking_uri,
        "epoch_clock": clock_name,
        "corrupt_counter": counter_name,
        "run_dir": run_dir,
        "knn": "knn_train" in datasets,
        "knn_prefetch": knn_cache_bytes(cfg, meta) <= KNN_CACHE_BYTES,
        "init_checkpoint": init_checkpoint,
        "stop_after_epoch": stop_after_epoch,
        # (reaper, trial actor): rank 0 hands its placement group over, see orchestrator/reaper.py
        "pg_watch": pg_watch if workers > 0 else None,
        "hold_after_checkpoints": _exit_after_checkpoints(),
        # Train local mode (0 workers) forwards no report to callbacks, so nothing would ever open the gate
        "epoch_gate": epoch_gate if workers > 0 else None,
    }
    resources: dict[str, float] = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.gpus_per_worker > 0:
        resources["GPU"] = cfg.train.gpus_per_worker
    scaling = ray.train.ScalingConfig(num_workers=workers, use_gpu=cfg.train.gpus_per_worker > 0,
                                      resources_per_worker=resources)
    run_config = ray.train.RunConfig(
        name=run_name,
        storage_path=storage_path,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                                     checkpoint_score_attribute=SCORE_KEY,
                                                     checkpoint_score_order="max"),
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        callbacks=list(callbacks or []),
    )
    return TorchTrainer(train_loop_per_worker, train_loop_config=loop_config, scaling_config=scaling,
                        run_config=run_config, datasets=datasets)


def _data_cpus(train_cpus: float) -> float:
    """CPUs Ray Data may use for decoding/cropping beside the training workers."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 0.0)) if ray.is_initialized() else 0.0
    return max(total - train_cpus, 1.0)


def plan_epochs(budget_s: float, first_epoch_s: float, max_epochs: int) -> int:
    """Epochs of a time-budgeted run: the whole number of epochs nearest the budget at the first epoch's
    pace (its data start-up included), at least 1 and at most ``optim.epochs``. Nearest, not floor: with
    floor a method whose epoch is 201 s would get 402 s of a 600 s budget while a 120 s one got all 600,
    an unfair comparison; nearest misses the budget by at most half an epoch either way."""
    return max(1, min(max_epochs, int(budget_s / max(first_epoch_s, 1e-9) + 0.5)))


def _with_epochs(cfg: ExperimentConfig, epochs: int, engine) -> ExperimentConfig:
    """``cfg`` with ``optim.epochs = epochs``, and ``engine``'s schedules refitted to that length."""
    engine.set_epochs(epochs)
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, epochs=epochs))


def _knn_epochs(cfg: ExperimentConfig) -> set[int]:
    """1-based epochs that end with a k-NN evaluation: every ``knn_freq`` and the last one."""
    epochs = cfg.optim.epochs
    out = {epochs}
    if cfg.eval.knn_freq > 0:
        out.update(range(cfg.eval.knn_freq, epochs + 1, cfg.eval.knn_freq))
    return out


# ================================================================================================ worker
class _Injected(RuntimeError):
    """The ``train.fail_at_step`` test hook."""


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def _make_loss_hook(cfg: ExperimentConfig, world: int, rank: int):
    """NaN injection (``train.nan_at_step``, on rank 0 only, like a blow-up on one worker) plus a global
    finiteness decision: if any rank's loss is non-finite every rank sees NaN, so all of them stop at
    the same step instead of some blocking in DDP's gradient all-reduce while the others have left the
    loop. Costs one 1-element all-reduce per step."""
    import torch.distributed as dist

    nan_at = cfg.train.nan_at_step

    def hook(step: int, loss: torch.Tensor) -> torch.Tensor:
        if step == nan_at and rank == 0:
            loss = loss * float("nan")
        if world > 1 and dist.is_initialized():
            bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bad.item() > 0:
                loss = loss * float("nan")
        return loss

    return hook


class EvalCache:
    """This worker's clean k-NN images (uint8, host memory), loaded once by a background thread that
    starts with training.

    The clean views never change, so there is no reason to re-run the eval pipeline at every
    evaluation, and loading them while epoch 1 trains hides the pipelines' start-up (actor pools,
    split coordinators: most of a small evaluation's time). Used only when the driver's size estimate
    fits ``KNN_CACHE_BYTES``; otherwise every evaluation streams its shards.
    """

    def __init__(self) -> None:
        self.data: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._thread = None
        self._error: BaseException | None = None

    @staticmethod
    def _stream(shard):
        for b in shard.iter_torch_batches(batch_size=KNN_BATCH, drop_last=False, device="cpu"):
            yield b["image"], b["label"]

    def prefetch(self, shards: dict) -> None:
        import threading

        def run() -> None:
            try:
                for name, shard in shards.items():
                    self.data[name] = list(self._stream(shard))
            except BaseException as err:  # noqa: BLE001 - re-raised in the training thread
                self._error = err

        self._thread = threading.Thread(target=run, name="bamray-knn-prefetch", daemon=True)
        self._thread.start()

    def batches(self, name: str, shard):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._error is not None:
                raise self._error
        if name in self.data:
            return iter(self.data[name])
        return self._stream(shard)


def knn_cache_bytes(cfg: ExperimentConfig, meta: dict[str, Any]) -> int:
    """Estimated uint8 bytes of one worker's k-NN bank + validation shard."""
    train = min(meta["counts"]["train"], cfg.data.train_limit or meta["counts"]["train"])
    test = min(meta["counts"]["test"], cfg.data.val_limit or meta["counts"]["test"])
    rows = train * cfg.eval.knn_train_fraction + test * cfg.eval.knn_eval_fraction
    return int(rows / cfg.world_size * cfg.data.channels * cfg.data.global_crop_size ** 2)


def _online_knn(method, cfg: ExperimentConfig, num_classes: int, device: torch.device,
                cache: EvalCache, with_pixels: bool = False) -> dict[str, float]:
    """Weighted k-NN of the eval backbone's features: every worker embeds its shard of ``knn_train`` and
    ``knn_val``; ``knn_evaluate`` all-gathers the bank, so every rank gets the global figure.

    ``with_pixels``: also ``knn_pixels_top1``, the same k-NN on the raw pixels of the very same bank and
    queries (pixels / 255, flattened): the floor a learned feature must beat to mean anything."""
    import ray.train

    from trainers.evaluation.knn import extract_features, knn_evaluate

    def features(name: str, model: torch.nn.Module, prepare):
        batches = ((prepare(x), y) for x, y in cache.batches(name, ray.train.get_dataset_shard(name)))
        return extract_features(model, batches, device)

    def knn(model: torch.nn.Module, prepare) -> dict[str, float]:
        train_f, train_y = features("knn_train", model, prepare)
        val_f, val_y = features("knn_val", model, prepare)
        return knn_evaluate(train_f, train_y, val_f, val_y, num_classes, k=cfg.eval.knn_k,
                            temperature=cfg.eval.knn_temperature)

    res = knn(method.eval_backbone(), lambda x: normalise_uint8(x, cfg.data.mean, cfg.data.std, device,
                                                                channels_last=cfg.train.channels_last))
    out = {"knn_top1": res["top1"], "knn_top5": res["top5"]}
    if with_pixels:
        out["knn_pixels_top1"] = knn(torch.nn.Flatten(), lambda x: x.to(device, torch.float32) / 255.0)["top1"]
    return out


def _corrupt_count(name: str) -> int:
    try:
        from data.pipeline import corrupt_count

        return int(corrupt_count(name))
    except Exception:  # noqa: BLE001 - a missing counter must not stop training
        return 0


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The per-worker loop. Returns (rank 0's value reaches the driver as ``Result.return_value``)
    ``{"status": "finished" | "nan", ...}``."""
    import random

    import numpy as np
    import ray
    import ray.train
    import ray.train.torch

    from trainers.build import build_engine, build_method
    from trainers.engine import NonFiniteLossError, crops_from_batch

    cfg = config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if rank == 0:
        from orchestrator.reaper import register_current

        register_current(config.get("pg_watch"))
    device = ray.train.torch.get_device()
    if isinstance(device, list):
        device = device[0]
    steps = int(config["steps_per_epoch"])
    batch_size = cfg.optim.batch_size
    num_classes = int(config["meta"]["num_classes"])

    # Same seed on every rank for the weights (DDP also broadcasts rank 0's, but the teacher copy is
    # made before wrapping), then a per-rank stream for everything else.
    method = build_method(cfg, device=device, steps_per_epoch=steps, batch_size=batch_size, world_size=world)
    module = ray.train.torch.prepare_model(method)
    engine = build_engine(cfg, method, device=device, steps_per_epoch=steps, global_batch=batch_size * world,
                          module=module)
    seed = cfg.seed * 1000 + rank
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)

    start_epoch, best_knn = 0, -1.0
    train_s = 0.0  # training seconds so far, evaluations excluded (the time budget's and the curves' clock)
    run_id = config.get("mlflow_run_id")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = ckpt.load_training_state(d)
            rng = ckpt.load_rng_state(d, rank)
        engine.load_state_dict(state["engine"])
        start_epoch = int(state["epoch"])
        best_knn = float(state["extra"].get("best_knn_top1", -1.0))
        run_id = state["mlflow_run_id"] or run_id
        if rng is not None:
            ckpt.set_rng_state(rng)
        train_s = float(state["extra"].get("train_time_s", 0.0))
        if state["extra"].get("planned_epochs"):  # a time-budgeted run keeps the length it planned
            cfg = _with_epochs(cfg, int(state["extra"]["planned_epochs"]), engine)
    elif config.get("init_checkpoint") is not None:
        # Another run's state (PBT exploit): its weights, optimiser, step and epoch; this run's params,
        # MLflow run and RNG streams.
        with config["init_checkpoint"].as_directory() as d:
            state = ckpt.load_training_state(d)
        engine.load_state_dict(state["engine"])
        start_epoch = int(state["epoch"])

    log = None
    uri = config.get("tracking_uri")
    if rank == 0 and run_id and uri:
        log = tracking.MetricLogger(uri, run_id, skip_upto=tracking.logged_high_water_marks(uri, run_id))

    clock = None
    if config.get("epoch_clock"):
        from data.pipeline import get_epoch_clock

        clock = get_epoch_clock(config["epoch_clock"])
    shard = ray.train.get_dataset_shard("train")
    knn_epochs = _knn_epochs(cfg)
    loss_hook = _make_loss_hook(cfg, world, rank)
    marker = os.path.join(config["run_dir"], ".fail_at_step.fired") if config.get("run_dir") else None
    global_batch = batch_size * world
    shuffle = cfg.data.local_shuffle_buffer or None
    status: dict[str, Any] = {"status": "finished", "start_epoch": start_epoch}
    checkpoints_reported = 0
    eval_cache = EvalCache()
    if config.get("knn") and config.get("knn_prefetch"):
        eval_cache.prefetch({n: ray.train.get_dataset_shard(n) for n in ("knn_train", "knn_val")})

    end_epoch = min(cfg.optim.epochs, int(config.get("stop_after_epoch") or cfg.optim.epochs))
    budgeted = cfg.train.time_budget_min > 0
    pixels_knn = None  # the raw-pixel k-NN of this run's bank, computed at its first evaluation
    gate = config.get("epoch_gate")
    for epoch in itertools.count(start_epoch):
        if epoch >= end_epoch:  # the only bound: a time budget lowers end_epoch once epoch 1 is timed
            break
        if clock is not None:
            if rank == 0:
                ray.get(clock.set.remote(epoch))
            _barrier()  # no worker pulls the epoch's first batch before the clock moved
        t_epoch = t_prev = time.perf_counter()
        loss_sum, n_steps, nan_error, first_batch_s = 0.0, 0, None, None
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True,
                                              prefetch_batches=cfg.data.prefetch_batches,
                                              local_shuffle_buffer_size=shuffle,
                                              local_shuffle_seed=(cfg.seed * 7919 + epoch) * 64 + rank):
            t_batch = time.perf_counter()
            if first_batch_s is None:
                first_batch_s = t_batch - t_epoch
            if log is not None and engine.step == 0:
                log.log_image(tracking.crop_grid({k: v.cpu().numpy() for k, v in batch.items()}),
                              "crops/first_batch.png")
            if rank == 0 and engine.step == cfg.train.fail_at_step and marker and not os.path.exists(marker):
                Path(marker).parent.mkdir(parents=True, exist_ok=True)
                Path(marker).write_text(f"fired at step {engine.step}\n")
                raise _Injected(f"train.fail_at_step: injected worker failure at step {engine.step}")
            crops = crops_from_batch(batch, cfg.data.mean, cfg.data.std, device, crop_usage=method.crop_usage,
                                     channels_last=cfg.train.channels_last)
            try:
                out = engine.train_step(crops, loss_hook=loss_hook)
            except NonFiniteLossError as err:
                nan_error = err
                break
            now = time.perf_counter()
            out["images_per_sec"] = global_batch / max(now - t_prev, 1e-9)
            out["data_wait_s"] = t_batch - t_prev  # blocked on the stream: a step's share of it says data-bound
            out["epoch"] = epoch + (n_steps + 1) / steps
            t_prev = now
            loss_sum += out["loss"]
            n_steps += 1
            if log is not None:
                log.log(out, step=engine.step)

        if nan_error is not None:
            reason = f"{type(nan_error).__name__}: {nan_error}"
            metrics = {"nan_detected": 1.0, "epoch": epoch, "step": engine.step}
            if log is not None:
                log.log({"nan_detected": 1.0}, step=engine.step)
                log.flush()
            ray.train.report(metrics)  # a barrier like every report; no checkpoint: the last good one stays
            status.update({"status": "nan", "reason": reason, "step": engine.step, "epoch": epoch})
            break

        elapsed = time.perf_counter() - t_epoch
        mean_loss, mean_elapsed = _all_reduce_mean([loss_sum / max(n_steps, 1), elapsed], device)
        train_s += mean_elapsed
        if epoch == 0 and budgeted:
            cfg = _with_epochs(cfg, plan_epochs(cfg.train.time_budget_min * 60, mean_elapsed, cfg.optim.epochs),
                               engine)
            end_epoch, knn_epochs = min(end_epoch, cfg.optim.epochs), _knn_epochs(cfg)
        metrics: dict[str, Any] = {"epoch": epoch + 1, "step": engine.step, "loss": mean_loss, "train_time_s": train_s,
                                   "epoch_images_per_sec": n_steps * global_batch / max(elapsed, 1e-9),
                                   "epoch_time_s": elapsed, "first_batch_wait_s": first_batch_s or 0.0}
        if rank == 0:
            metrics["data_corrupt_skipped"] = _corrupt_count(config.get("corrupt_counter") or "")
        if ((epoch + 1) in knn_epochs or epoch + 1 == end_epoch) and config.get("knn"):
            t_knn = time.perf_counter()
            metrics.update(_online_knn(method, cfg, num_classes, device, eval_cache, with_pixels=pixels_knn is None))
            pixels_knn = metrics.get("knn_pixels_top1", pixels_knn)
            metrics["knn_time_s"] = time.perf_counter() - t_knn
            best_knn = max(best_knn, metrics["knn_top1"])
        metrics[SCORE_KEY] = metrics.get("knn_top1", -1.0)
        if log is not None:
            # per-step "loss" / "epoch" already sit at this step: the epoch means get their own names
            epoch_logs = {("epoch_loss" if k == "loss" else k): v for k, v in metrics.items()
                          if k not in ("step", "epoch", SCORE_KEY)}
            log.log(epoch_logs, step=engine.step)
            log.flush()  # before the checkpoint commits: a checkpoint never exists without its metrics

        if rank == 0:
            print(f"[bamray] epoch {epoch + 1}/{cfg.optim.epochs}: {n_steps} steps in {elapsed:.1f} s (first batch "
                  f"after {metrics['first_batch_wait_s']:.1f} s), loss {mean_loss:.4f}"
                  + (f", knn top-1 {metrics['knn_top1']:.2f} % ({metrics['knn_time_s']:.1f} s)"
                     if "knn_top1" in metrics else ""), flush=True)
        last = epoch + 1 == end_epoch
        if (epoch + 1) % cfg.train.checkpoint_freq == 0 or last:
            with tempfile.TemporaryDirectory(prefix="bamray-ckpt-") as tmp:
                if rank == 0:
                    ckpt.save_training_state(tmp, engine_state=engine.state_dict(), epoch=epoch + 1,
                                             mlflow_run_id=run_id, config=cfg.to_dict(),
                                             extra={"best_knn_top1": best_knn, "steps_per_epoch": steps,
                                                    "planned_epochs": cfg.optim.epochs if budgeted else None,
                                                    "train_time_s": train_s})
                    ckpt.export_backbone(method, cfg, tmp)
                ckpt.save_rng_state(tmp, rank)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            checkpoints_reported += 1
            if checkpoints_reported == config.get("hold_after_checkpoints"):
                # Test hook (EXIT_AFTER_EPOCHS_ENV): the driver exits once the controller has seen this
                # many checkpoints (it counts the same way); holding here makes "killed right after that
                # checkpoint" exact instead of a race with the next epoch (which a fast epoch used to
                # win, logging one epoch too many).
                time.sleep(3600)
        else:
            ray.train.report(metrics)
        if gate is not None and epoch + 1 in gate[1] and not last:
            ray.get(gate[0].wait.remote(epoch + 1))  # the scheduler decides on this epoch: no training past it

    if log is not None:
        log.flush()
    status.update({"final_step": engine.step, "best_knn_top1": best_knn, "knn_pixels_top1": pixels_knn,
                   "epochs": cfg.optim.epochs, "train_time_s": train_s})
    return status


# ================================================================================================ driver
def connect_ray(cfg: ExperimentConfig) -> bool:
    """Reuse an initialised Ray; else ``train.address`` / ``RAY_ADDRESS``; else a local Ray with logical
    CPUs oversubscribed (training workers + at least 2 for Ray Data, so Data never gets a zero budget on
    a 2-core machine). Returns True when this call started or connected Ray (the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.train.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return True
    train_cpus = max(cfg.train.workers, 1) * cfg.train.cpus_per_worker
    num_cpus = max(4, math.ceil(train_cpus) + 2)
    kwargs: dict[str, Any] = {}
    if cfg.train.gpus_per_worker > 0 and torch.cuda.is_available():
        kwargs["num_gpus"] = torch.cuda.device_count()
    start_local_ray(num_cpus, **kwargs)
    return True


def _log_config_artifact(uri: str, run_id: str, cfg: ExperimentConfig) -> None:
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        tracking.log_artifacts(uri, run_id, tmp)


def _log_checkpoint_artifacts(uri: str, run_id: str, checkpoint, artifact_path: str) -> bool:
    """Log the checkpoint's exported backbone (safetensors + config.yaml) under ``artifact_path``."""
    if checkpoint is None:
        return False
    with checkpoint.as_directory() as d, tempfile.TemporaryDirectory() as tmp:
        for name in (ckpt.BACKBONE_FILE, ckpt.CONFIG_FILE):
            src = Path(d, name)
            if not src.exists():
                return False
            Path(tmp, name).write_bytes(src.read_bytes())
        tracking.log_artifacts(uri, run_id, tmp, artifact_path)
    return True


def _best_checkpoint(result):
    best, best_score = None, -math.inf
    for checkpoint, metrics in result.best_checkpoints or []:
        score = float((metrics or {}).get(SCORE_KEY, -1.0))
        if score >= 0 and score > best_score:
            best, best_score = checkpoint, score
    return best, best_score


class _ExitAfterEpochs:
    """Driver-kill test hook, built lazily because ``ray.train.UserCallback`` is imported with Ray."""

    @staticmethod
    def make(epochs: int):
        import ray.train

        class ExitAfter(ray.train.UserCallback):
            """Runs in the Train controller; after ``epochs`` checkpoints it writes a flag file that the
            driver's watcher thread turns into ``os._exit`` (a killed driver)."""

            def __init__(self, flag: str):
                self.flag = flag
                self.count = 0

            def after_report(self, run_context, metrics, checkpoint):
                if checkpoint is not None:
                    self.count += 1
                    if self.count >= epochs:
                        Path(self.flag).write_text("exit\n")

        return ExitAfter


def _start_exit_watcher(epochs: int) -> list:
    """The ``BAMRAY_TEST_EXIT_DRIVER_AFTER_EPOCHS`` hook: returns the callbacks to add."""
    import threading

    flag = tempfile.mktemp(prefix="bamray-exit-", dir="/tmp")

    def watch():
        while not os.path.exists(flag):
            time.sleep(0.2)
        os.unlink(flag)
        print(f"{EXIT_AFTER_EPOCHS_ENV}: exiting the driver after {epochs} checkpointed epoch(s)", flush=True)
        os._exit(17)

    threading.Thread(target=watch, daemon=True).start()
    return [_ExitAfterEpochs.make(epochs)(flag)]


def run_training(cfg: ExperimentConfig, *, resume: str | None = None) -> dict[str, Any]:
    """Train ``cfg`` on Ray, tracked in one MLflow run; ``resume`` = an MLflow run id to continue.

    Returns ``{"run_id", "status" ("FINISHED" | "FAILED"), "reason", "metrics", "ray_run_dir",
    "tracking_uri"}``. Config and data errors are raised (``ConfigError`` / ``DataMissingError``) before
    any Ray or MLflow work.
    """
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    cfg, meta = prepare_data(cfg)
    steps_per_epoch(cfg, meta)  # refuse an impossible batch before anything starts
    from ray.train import TrainingFailedError

    if resume:
        try:
            run = tracking.reopen_run(uri, resume)
        except Exception as err:  # noqa: BLE001 - MlflowException: no such run in this store
            raise ConfigError("--resume", f"no MLflow run {resume!r} in {uri} ({type(err).__name__})") from err
        run_id = run.info.run_id
        ray_run_name = run.data.tags.get(tracking.TAG_RAY_RUN) or f"{cfg.name}-{run_id[:8]}"
        storage = run.data.tags.get(tracking.TAG_STORAGE) or _absolute(cfg.train.storage_path,
                                                                       tracking.project_root())
    else:
        storage = _absolute(cfg.train.storage_path, tracking.project_root())
        run_id = tracking.create_run(uri, cfg.tracking.experiment, cfg.tracking.run_name or cfg.name,
                                     tracking.run_tags(cfg.method_name))
        ray_run_name = f"{cfg.name}-{run_id[:8]}"
    tracking.log_tags(uri, run_id, {tracking.TAG_RAY_RUN: ray_run_name, tracking.TAG_STORAGE: storage})
    changed = tracking.log_params(uri, run_id, flatten(cfg.to_dict()))
    if changed:
        tracking.log_tags(uri, run_id, {"resume_changed_params": ",".join(sorted(changed))})
    if not resume:
        _log_config_artifact(uri, run_id, cfg)
    ray_run_dir = storage if is_uri(storage) else os.path.join(storage, ray_run_name)
    print(f"MLflow run {run_id} ({uri}); Ray Train run {ray_run_dir}", flush=True)

    started = False
    out: dict[str, Any] = {"run_id": run_id, "tracking_uri": uri, "ray_run_dir": ray_run_dir, "metrics": {}}
    try:
        started = connect_ray(cfg)
        callbacks = []
        exit_after = _exit_after_checkpoints()
        if exit_after > 0:
            callbacks = _start_exit_watcher(exit_after)
        trainer = build_trainer(cfg, run_name=ray_run_name, storage_path=storage, mlflow_run_id=run_id,
                                tracking_uri=uri, callbacks=callbacks)
        t0 = time.perf_counter()
        result = trainer.fit()
        out["wall_time_s"] = time.perf_counter() - t0
        ret = result.return_value or {}
        out["worker_result"] = ret
        if "start_epoch" in ret:  # 0 = from scratch; > 0 = Ray Train resumed from a checkpoint
            tracking.log_tags(uri, run_id, {"bamray.start_epoch": ret["start_epoch"]})
        out["metrics"] = dict(result.metrics or {})
        out["checkpoint"] = result.checkpoint.path if result.checkpoint else None
        if ret.get("status") == "nan":
            reason = ret.get("reason", "non-finite loss")
            tracking.finish_run(uri, run_id, "FAILED", reason)
            out.update(status="FAILED", reason=reason)
            _print_where(out)
            return out
        _log_checkpoint_artifacts(uri, run_id, result.checkpoint, "final")
        best, best_score = _best_checkpoint(result)
        if best is not None:
            _log_checkpoint_artifacts(uri, run_id, best, "best_knn")
            tracking.log_metrics(uri, run_id, {"best_knn_top1": best_score}, step=int(ret.get("final_step", 0)))
        tracking.log_metrics(uri, run_id, {"train_wall_time_s": out["wall_time_s"]},
                             step=int(ret.get("final_step", 0)))
        if cfg.eval.linear_at_end:
            from orchestrator.evaluate import run_linear_eval

            out["linear_top1"] = run_linear_eval(run_id, uri)
        tracking.finish_run(uri, run_id, "FINISHED")
        out.update(status="FINISHED", reason=None)
    except TrainingFailedError as err:
        reason = f"{type(err).__name__}: {err}"
        tracking.finish_run(uri, run_id, "FAILED", reason)
        out.update(status="FAILED", reason=reason)
    except (KeyboardInterrupt, SystemExit):  # Ray Train's SIGINT handler aborts the run and exits
        tracking.finish_run(uri, run_id, "KILLED", f"interrupted; continue with `bamray train --resume {run_id}`")
        raise
    except BaseException as err:
        tracking.finish_run(uri, run_id, "FAILED", f"{type(err).__name__}: {err}")
        raise
    finally:
        if started:
            import ray

            ray.shutdown()
    _print_where(out)
    return out


def _print_where(out: dict[str, Any]) -> None:
    uri = out["tracking_uri"]
    ui = "bamray ui" if uri == tracking.default_tracking_uri() else f"bamray ui --tracking-uri {uri}"
    print(f"\nRun {out['run_id']}: {out.get('status')}" + (f" ({out['reason']})" if out.get("reason") else ""))
    knn, pixels = out["metrics"].get("knn_top1"), (out.get("worker_result") or {}).get("knn_pixels_top1")
    if knn is not None and pixels is not None:
        ret = out["worker_result"]
        print(f"  k-NN top-1 {knn:.2f} % after {ret.get('epochs')} epochs ({ret.get('train_time_s', 0) / 60:.1f} min of "
              f"training); raw pixels on the same bank: {pixels:.2f} % ({knn - pixels:+.2f} points)")
    print(f"  see it with `{ui}` then open http://127.0.0.1:5000 ; checkpoints in {out['ray_run_dir']}")
    if out.get("status") == "FAILED":
        print(f"  continue from the last checkpoint with `bamray train --resume {out['run_id']}`")
