"""What the driver hands every Ray Train worker (:class:`WorkerPlan`), and the run-length rules the worker
applies (k-NN epochs, the time budget).

The plan carries the typed, validated :class:`~orchestrator.config.ExperimentConfig` itself: Ray pickles
it to the workers, so a worker never re-parses or re-validates a dict, and ``method.reg`` reaches the
loss as the same field it was in YAML. Ray Train wants a dict for ``train_loop_config``: the driver passes
``{"plan": plan}``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

from orchestrator.config import ExperimentConfig
from orchestrator.fault_injection import WorkerFaults

if TYPE_CHECKING:
    from orchestrator.epoch_gate import GatedEpochs


@dataclasses.dataclass
class WorkerPlan:
    """One Train run as every worker of it sees it."""

    cfg: ExperimentConfig
    steps_per_epoch: int
    num_classes: int
    #: MLflow run the rank-0 worker logs metrics to (None: no metric logging)
    mlflow_run_id: str | None
    tracking_uri: str
    #: names of the run's Ray actors: the epoch clock the augmentation reads, the corrupt-row counter
    epoch_clock: str
    corrupt_counter: str
    #: the Ray Train run directory (None for remote storage); fault injection keeps its marker there
    run_dir: str | None
    #: k-NN evaluation datasets exist, and whether a worker's share fits the host cache
    knn: bool
    knn_prefetch: bool
    #: the counter's handle, held by the driver's trainer for the whole run: a named actor that is not
    #: detached dies with the last handle to it
    corrupt_counter_handle: Any = None
    #: a ``ray.train.Checkpoint`` to start from when the run has none of its own (PBT's donor)
    init_checkpoint: Any = None
    #: backbone weights to start from (``model.init_from``): weights only, before any checkpoint
    init_weights: dict[str, Any] | None = None
    #: end after this epoch, schedules unchanged (one PBT segment)
    stop_after_epoch: int | None = None
    #: ``(reaper, trial actor)``: rank 0 hands its placement group over, see orchestrator/reaper.py
    pg_watch: tuple[Any, Any] | None = None
    epoch_gate: GatedEpochs | None = None
    faults: WorkerFaults = dataclasses.field(default_factory=WorkerFaults)
    #: seconds between rank 0's progress updates to the driver's console (0: none, as in a sweep's trials)
    progress_interval_s: float = 0.0
    #: prefix of the workers' console lines (a sweep's trial id; empty for a single run)
    label: str = ""
    #: the run's Ray datasets by name where its one worker iterates them itself, with the driver's Ray Data
    #: context (None: they were given to Ray Train; :mod:`orchestrator.training.shards`)
    datasets: dict[str, Any] | None = None
    data_context: Any = None


#: the most bytes a worker's share of the k-NN sets may take to be cached in its memory
#: (:class:`orchestrator.training.online_eval.EvalCache`); beyond it every evaluation streams them again
KNN_CACHE_BYTES = int(os.environ.get("BAMRAY_KNN_CACHE_BYTES", str(512 * 2**20)))


def knn_cache_bytes(cfg: ExperimentConfig, knn_data: Any, meta: dict[str, Any]) -> int:
    """Estimated uint8 bytes of one worker's k-NN bank + validation shard (``knn_data``: the data config
    of the labelled set the k-NN runs on, ``meta`` its meta)."""
    train = min(meta["counts"]["train"], knn_data.train_limit or meta["counts"]["train"])
    test = min(meta["counts"]["test"], knn_data.val_limit or meta["counts"]["test"])
    rows = train * cfg.eval.knn_train_fraction + test * cfg.eval.knn_eval_fraction
    return int(rows / cfg.world_size * cfg.data.channels * cfg.data.global_crop_size**2)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's per-worker function (:func:`orchestrator.training.worker.train_loop_per_worker`), named
    from this torch-free module: Ray pickles a function by its module and name, so the driver hands it
    over without importing the worker's module, which imports torch."""
    from orchestrator.training.worker import train_loop_per_worker as run

    return run(config)


def knn_epochs(cfg: ExperimentConfig) -> set[int]:
    """1-based epochs that end with a k-NN evaluation: every ``knn_freq`` and the last one."""
    epochs = cfg.optim.epochs
    out = {epochs}
    if cfg.eval.knn_freq > 0:
        out.update(range(cfg.eval.knn_freq, epochs + 1, cfg.eval.knn_freq))
    return out


def plan_epochs(budget_s: float, first_epoch_s: float, max_epochs: int) -> int:
    """Epochs of a time-budgeted run: the whole number of epochs nearest the budget at the first epoch's
    pace (its data start-up included), at least 1 and at most ``optim.epochs``. Nearest, not floor: with
    floor a method whose epoch is 201 s would get 402 s of a 600 s budget while a 120 s one got all 600,
    an unfair comparison; nearest misses the budget by at most half an epoch either way."""
    return max(1, min(max_epochs, int(budget_s / max(first_epoch_s, 1e-9) + 0.5)))


def with_epochs(cfg: ExperimentConfig, epochs: int, engine: Any) -> ExperimentConfig:
    """``cfg`` with ``optim.epochs = epochs``, and ``engine``'s schedules refitted to that length."""
    engine.set_epochs(epochs)
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, epochs=epochs))
