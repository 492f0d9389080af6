"""The Ray Train worker: ``trainers.loop.train_one_epoch`` over this worker's shard, then the epoch's
report to Ray Train (metrics, k-NN, checkpoint) and to MLflow.

Fault tolerance, as Ray Train 2.60 (Train V2) does it:

- a worker error is retried up to ``FailureConfig(max_failures)`` times; the new worker group calls
  ``ray.train.get_checkpoint()`` and continues from the next epoch with the optimiser, scaler, teacher,
  global step (so every schedule continues) and RNG states restored; a checkpoint taken inside an epoch
  (``train.checkpoint_every_steps`` / ``_minutes``, a termination notice: :mod:`.midepoch`) continues that
  epoch at its step, the stream leaving out the samples already trained on;
- a NaN/Inf loss must not be retried (it would recur): every rank sees it at the same step (a per-step
  all-reduce of the "finite" flag makes the decision global), reports ``nan_detected`` without a
  checkpoint and returns ``{"status": "nan"}``; the driver marks the MLflow run FAILED. Ray Train's
  default failure policy retries every worker error, so raising would burn ``max_failures`` restarts on
  a deterministic failure.
"""

from __future__ import annotations

import itertools
import random
import time
from typing import Any

import numpy as np
import torch

from orchestrator import checkpointing as ckpt
from orchestrator import tracking
from orchestrator.console import say
from orchestrator.pictures import crop_grid
from orchestrator.training import console, midepoch, ranks
from orchestrator.training.epoch_data import EpochData
from orchestrator.training.online_eval import Evaluation
from orchestrator.training.plan import WorkerPlan, knn_epochs, plan_epochs, with_epochs
from orchestrator.training.scratch import scratch_dir
from orchestrator.training.shards import Shards
from trainers.loop import EpochStats, train_one_epoch

#: where a worker stages a checkpoint for ``ray.train.report`` (in the node's temp dir; a killed worker's is
#: removed by the next one, :mod:`orchestrator.training.scratch`)
CHECKPOINT_SCRATCH = "bamray-ckpt-"


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's per-worker function; ``config = {"plan": WorkerPlan}``. Rank 0's return value reaches
    the driver as ``Result.return_value``: ``{"status": "finished" | "nan", ...}``."""
    run = _Worker(config["plan"])
    try:
        for epoch in itertools.count(run.start_epoch):
            if epoch >= run.end_epoch:  # the only bound: a time budget lowers end_epoch once epoch 1 is timed
                break
            stats = run.train_epoch(epoch)
            if stats.nan_error is not None:
                run.report_nan(epoch, stats.nan_error)
                break
            run.report_epoch(epoch, run.epoch_metrics(epoch, stats))
        return run.finish()
    finally:
        if run.system is not None:
            tracking.stop_system_metrics(run.system)


def _corrupt_count(name: str) -> int:
    try:
        from data.run_actors import corrupt_count

        return int(corrupt_count(name, "train"))
    except Exception:  # noqa: BLE001 - a missing counter must not stop training
        return 0


class _Worker:
    """One worker's run: the model, where it resumes from, and what it reports after each epoch."""

    def __init__(self, plan: WorkerPlan) -> None:
        import ray.train
        import ray.train.torch

        from orchestrator.reaper import register_current

        self.plan, self.cfg = plan, plan.cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        if self.rank == 0:
            register_current(plan.pg_watch)
        device = ray.train.torch.get_device()
        self.device = device[0] if isinstance(device, list) else device
        self.global_batch = self.cfg.optim.batch_size * self.world
        self.shards = Shards(plan.datasets, plan.data_context)
        self.data = EpochData(plan, self.rank, self.world, self.shards)
        if ray.train.get_checkpoint() is None and plan.init_checkpoint is None:
            # a fresh run starts at epoch 0: its data starts now, its processes boot while this one does
            self.data.start_fresh(self._end_epoch())
        self._build_model()
        self.start_epoch, self.best_knn, self.train_s = 0, -1.0, 0.0
        self.run_id = plan.mlflow_run_id
        # an epoch resumed from a checkpoint taken inside it: its counts, this rank's samples so far, and
        # (rank 0, who sets the epoch clock) every rank's samples, which the stream then leaves out
        self.resumed: tuple[EpochStats, list[np.ndarray], np.ndarray] | None = None
        self.epoch_samples: list[np.ndarray] = []
        self._restore()
        self.end_epoch = self._end_epoch()
        # opened now (data.stream "run") unless start_fresh did, so that its map actors start while the
        # rest of this set-up runs
        self.data.open(self.start_epoch, self.end_epoch, self.resumed[2] if self.resumed else None)
        self.policy = self._mid_epoch_policy()
        self.log = self._metric_logger()
        # MLflow's system metrics: started after the first step (MLflow is not imported before it)
        self.system: Any = None
        self.evaluation = Evaluation(
            self.cfg,
            knn=plan.knn,
            prefetch=plan.knn_prefetch,
            rank=self.rank,
            world=self.world,
            shards=self.shards,
        )
        self.knn_epochs = knn_epochs(self.cfg)
        self.budgeted = self.cfg.train.time_budget_min > 0
        self.checkpoints_reported = 0
        self.eval_s, self.first_step_unix, self.first_step_s = 0.0, None, 0.0
        self.fixed_batch: dict[str, torch.Tensor] | None = None
        self.first_grid: Any = None  # the first batch's crop grid, until it is logged after the first step
        self.progress = console.ProgressEmitter(
            plan.progress_interval_s if self.rank == 0 else 0.0,
            self.cfg.optim.epochs,
            plan.steps_per_epoch,
            self.global_batch,
        )
        self.status: dict[str, Any] = {
            "status": "finished",
            "start_epoch": self.start_epoch,
            "start_step": self.engine.step,
        }

    def _end_epoch(self) -> int:
        """The epoch this run stops before: its (restored) config's, or the plan's stop (a sweep's segment)."""
        return min(self.cfg.optim.epochs, int(self.plan.stop_after_epoch or self.cfg.optim.epochs))

    def _mid_epoch_policy(self) -> midepoch.MidEpochPolicy:
        """When to checkpoint inside an epoch; with several workers every rank decides alike (a max
        all-reduce of their flags)."""
        t = self.cfg.train
        return midepoch.MidEpochPolicy(
            t.checkpoint_every_steps,
            t.checkpoint_every_minutes,
            midepoch.NoticeWatch(t.preemption_notice) if t.preemption_notice else None,
            rank=self.rank,
            agree=(lambda flags: ranks.all_reduce(flags, self.device, "max")) if self.world > 1 else None,
        )

    def _metric_logger(self) -> tracking.MetricLogger | None:
        """Rank 0's MLflow metric logger, which skips the steps a resumed run logged already; None on
        other ranks or without a run."""
        uri = self.plan.tracking_uri
        if self.rank != 0 or not self.run_id or not uri:
            return None
        run_id = self.run_id  # the marks are read at the first flush, after the first step
        return tracking.MetricLogger(
            uri, run_id, skip_upto=lambda: tracking.logged_high_water_marks(uri, run_id)
        )

    def _start_system_metrics(self) -> Any:
        """MLflow's system metrics of this node (CPU, memory, GPU), sampled by the node's first worker and
        named by node when the run spans several; ``None`` when off or without a run."""
        import ray.train

        ctx, uri, interval = (
            ray.train.get_context(),
            self.plan.tracking_uri,
            self.cfg.tracking.system_metrics_s,
        )
        if ctx.get_local_rank() != 0 or not (self.run_id and uri) or interval <= 0:
            return None
        single_node = ctx.get_local_world_size() == ctx.get_world_size()
        return tracking.start_system_metrics(
            uri,
            self.run_id,
            interval_s=interval,
            node_id=None if single_node else f"node_{ctx.get_node_rank()}",
            resume=ray.train.get_checkpoint() is not None,
        )

    def _build_model(self) -> None:
        """Same seed on every rank for the weights (DDP also broadcasts rank 0's, but the teacher copy is
        made before wrapping), then a per-rank stream for everything else."""
        import ray.train.torch

        from trainers.build import build_engine, build_method

        cfg, steps = self.cfg, self.plan.steps_per_epoch
        self.method = build_method(
            cfg,
            device=self.device,
            steps_per_epoch=steps,
            batch_size=cfg.optim.batch_size,
            world_size=self.world,
        )
        if self.plan.init_weights is not None:  # --init-from; a checkpoint of this run still wins (_restore)
            self.method.init_backbone(self.plan.init_weights)
        module = ray.train.torch.prepare_model(self.method)
        self.engine = build_engine(
            cfg,
            self.method,
            device=self.device,
            steps_per_epoch=steps,
            global_batch=self.global_batch,
            module=module,
        )
        seed = cfg.seed * 1000 + self.rank
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        hook = ranks.non_finite_everywhere if self.world > 1 else None
        self.loss_hook = self.plan.faults.wrap_loss_hook(self.rank, hook)

    def _restore(self) -> None:
        """Continue this run's own latest checkpoint (a restart or ``--resume``: everything, RNG streams
        included); else start from ``plan.init_checkpoint`` (PBT's donor: its weights, optimiser, step and
        epoch; this run's params, MLflow run and RNG streams)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                state = ckpt.load_training_state(d)
                rng = ckpt.load_rng_state(d, self.rank)
                if state["extra"].get("epoch_progress"):  # only an epoch resumed inside needs its samples
                    mine = midepoch.load_samples(d, self.rank)
                    # the epoch clock's setter (rank 0) needs every rank's; a per-worker stream, every rank
                    run_stream = self.cfg.data.stream == "run"
                    everyone = (
                        midepoch.load_samples(d) if self.rank == 0 or run_stream else np.zeros(0, np.int64)
                    )
            self.engine.load_state_dict(state["engine"])
            self.start_epoch = int(state["epoch"])
            extra = state["extra"]
            self.best_knn = float(extra.get("best_knn_top1", -1.0))
            self.run_id = state["mlflow_run_id"] or self.run_id
            if rng is not None:
                ckpt.set_rng_state(rng)
            self.train_s = float(extra.get("train_time_s", 0.0))
            if extra.get("planned_epochs"):  # a time-budgeted run keeps the length it planned
                self.cfg = with_epochs(self.cfg, int(extra["planned_epochs"]), self.engine)
            if extra.get("epoch_progress"):  # taken inside epoch `start_epoch`: continue that epoch
                self.resumed = (EpochStats(**extra["epoch_progress"]), [mine], everyone)
        elif self.plan.init_checkpoint is not None:
            with self.plan.init_checkpoint.as_directory() as d:
                state = ckpt.load_training_state(d)
            self.engine.load_state_dict(state["engine"])
            self.start_epoch = int(state["epoch"])

    def train_epoch(self, epoch: int) -> EpochStats:
        """One epoch over this worker's data (the rest of it, when the epoch resumes from a checkpoint taken
        inside it)."""
        cfg = self.cfg
        self.progress.end_epoch()
        stats, self.epoch_samples, skip = EpochStats(), [], None
        if self.resumed is not None:
            stats, self.epoch_samples, skip = self.resumed
            self.resumed = None
        batches = self.data.batches(epoch, self.end_epoch, skip)

        def on_step(logs: dict[str, float]) -> None:
            if self.log is not None:
                self.log.log(logs, step=self.engine.step)
            if self.first_step_unix is None:  # launch -> here is start-up; the epoch's seconds so far are not
                self.first_step_unix, self.first_step_s = time.time(), stats.seconds
                self._log_first_grid()
                self.evaluation.after_first_step()
                self.system = self._start_system_metrics()  # imports MLflow: not before the first step
            self.progress.step(epoch, stats.steps, logs)
            self._checkpoint_inside(epoch, stats)

        stats = train_one_epoch(
            self.engine,
            batches,
            cfg.data,
            epoch=epoch,
            steps_per_epoch=self.plan.steps_per_epoch,
            global_batch=self.global_batch,
            channels_last=cfg.train.channels_last,
            before_step=self._before_step,
            on_step=on_step,
            loss_hook=self.loss_hook,
            stats=stats,
        )
        self._log_first_grid()  # a first step that was not finite still shows its crops
        return stats

    def _log_first_grid(self) -> None:
        """The first batch's crop grid (``crops/first_batch.png``), once. Drawn before the first step and
        sent after it: sending it is the worker's first MLflow call, which imports MLflow and opens the
        store (2-3 s of CPU here), and before the first step it was most of a 1-worker run's first step
        (3.1 s against 0.4 s in a bare loop)."""
        grid, self.first_grid = self.first_grid, None
        if grid is not None and self.log is not None:
            self.log.log_image(grid, "crops/first_batch.png")

    def _checkpoint_inside(self, epoch: int, stats: EpochStats) -> None:
        """A checkpoint after this step when the policy says so (every rank decides alike); the steps logged
        so far are flushed first, since the resume continues after them."""
        import ray.train

        step, spe = self.engine.step, self.plan.steps_per_epoch
        reason = self.policy.due(step, last_of_epoch=stats.steps >= spe)
        if reason is None:
            return
        self._log_notice(reason)
        metrics = {"epoch": epoch + stats.steps / spe, "step": step, "mid_epoch": 1.0, ckpt.SCORE_KEY: -1.0}
        with scratch_dir(CHECKPOINT_SCRATCH) as tmp:
            self._save_checkpoint(tmp, epoch, progress=stats)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        self.policy.checkpointed()
        if self.rank == 0:
            say(f"checkpoint at step {step} (epoch {epoch + 1}, step {stats.steps}/{spe}): {reason}")
        self.checkpoints_reported += 1
        self.plan.faults.after_checkpoint(self.checkpoints_reported)

    def _log_notice(self, reason: str) -> None:
        if self.log is not None:
            if reason == midepoch.NOTICE_REASON:
                self.log.log({"preemption_notice": 1.0}, step=self.engine.step)
            self.log.flush()

    def _before_step(self, batch: dict[str, torch.Tensor]) -> None:
        self.epoch_samples.append(batch["index"].cpu().numpy())
        if (
            self.fixed_batch is None and self.log is not None and self.cfg.eval.pictures
        ):  # BAM's picture batch
            self.fixed_batch = {k: batch[k][:32].cpu().clone() for k in ("global", "local") if k in batch}
        if self.log is not None and self.engine.step == 0:  # sent after the step: _log_first_grid
            self.first_grid = crop_grid({k: v.cpu().numpy() for k, v in batch.items()})
        self.plan.faults.before_step(self.engine.step, self.rank, self.plan.run_dir)

    def report_nan(self, epoch: int, err: Exception) -> None:
        """Report the blow-up without a checkpoint (the last good one stays) and end this worker's run."""
        import ray.train

        step = self.engine.step
        if self.log is not None:
            self.log.log({"nan_detected": 1.0}, step=step)
            self.log.flush()
        ray.train.report({"nan_detected": 1.0, "epoch": epoch, "step": step})  # a barrier like every report
        self.status.update(
            {"status": "nan", "reason": f"{type(err).__name__}: {err}", "step": step, "epoch": epoch}
        )

    def epoch_metrics(self, epoch: int, stats: EpochStats) -> dict[str, Any]:
        """The epoch's report (means over the workers, k-NN on its evaluation epochs), logged to MLflow
        before the checkpoint commits: a checkpoint never exists without its metrics."""
        mean_loss, mean_elapsed = ranks.all_reduce([stats.mean_loss, stats.seconds], self.device)
        self.train_s += mean_elapsed
        if epoch == 0 and self.budgeted:
            epochs = plan_epochs(self.cfg.train.time_budget_min * 60, mean_elapsed, self.cfg.optim.epochs)
            self.cfg = with_epochs(self.cfg, epochs, self.engine)
            self.end_epoch, self.knn_epochs = min(self.end_epoch, self.cfg.optim.epochs), knn_epochs(self.cfg)
            self.progress.epochs = self.cfg.optim.epochs
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": self.engine.step,
            "loss": mean_loss,
            "train_time_s": self.train_s,
            "epoch_images_per_sec": stats.steps * self.global_batch / max(stats.seconds, 1e-9),
            "epoch_time_s": stats.seconds,
            "first_batch_wait_s": stats.first_batch_s,
        }
        if self.rank == 0:
            metrics["data_corrupt_skipped"] = _corrupt_count(self.plan.corrupt_counter)
        if stats.log_sums:  # the method's own epoch means (BAM's entropies), over the workers
            means = stats.log_means()
            metrics.update(zip(means, ranks.all_reduce(list(means.values()), self.device)))
        if (epoch + 1) in self.knn_epochs or epoch + 1 == self.end_epoch:
            metrics.update(self.evaluation.run(self.method, self.cfg, self.plan.num_classes, self.device))
            self.eval_s += metrics["eval_time_s"]
            if self.log is not None and self.cfg.eval.pictures:
                self._log_pictures(epoch, metrics.get("knn_top1"))
        if "knn_top1" in metrics:
            self.best_knn = max(self.best_knn, metrics["knn_top1"])
        metrics[ckpt.SCORE_KEY] = metrics.get("knn_top1", -1.0)
        if self.log is not None:
            # per-step "loss" / "epoch" already sit at this step: the epoch means get their own names
            per_step = {"loss", *stats.log_sums}
            self.log.log(
                {
                    (f"epoch_{k}" if k in per_step else k): v
                    for k, v in metrics.items()
                    if k not in ("step", "epoch", ckpt.SCORE_KEY)
                },
                step=self.engine.step,
            )
            self.log.flush()
        if self.rank == 0:
            say(console.epoch_line(epoch, self.cfg.optim.epochs, stats, mean_loss, metrics, self.plan.label))
        return metrics

    def _log_pictures(self, epoch: int, knn_top1: float | None) -> None:
        """The evaluation epoch's pictures (rank 0; orchestrator/training/run_pictures.py), timed into the
        evaluation's seconds."""
        from orchestrator.training.run_pictures import log_eval_pictures

        t0 = time.perf_counter()
        log_eval_pictures(
            self.log,
            self.method,
            self.cfg,
            kept=self.evaluation.kept,
            fixed_batch=self.fixed_batch,
            device=self.device,
            step=self.engine.step,
            epoch=epoch + 1,
            knn_top1=knn_top1,
        )
        self.eval_s += time.perf_counter() - t0

    def report_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        """``ray.train.report`` the epoch, with a checkpoint every ``checkpoint_freq`` epochs and at the end;
        then wait at a scheduler's decision epoch (the trial's epoch gate)."""
        import ray.train

        last = epoch + 1 == self.end_epoch
        noticed = self.policy.epoch_end_due  # a notice at the epoch's last step: checkpoint now
        if (epoch + 1) % self.cfg.train.checkpoint_freq == 0 or last or noticed:
            if noticed:
                self._log_notice(midepoch.NOTICE_REASON)
            with scratch_dir(CHECKPOINT_SCRATCH) as tmp:
                self._save_checkpoint(tmp, epoch + 1)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            self.policy.checkpointed()
            self.checkpoints_reported += 1
            self.plan.faults.after_checkpoint(self.checkpoints_reported)
        else:
            ray.train.report(metrics)
        if self.plan.epoch_gate is not None and not last:
            self.plan.epoch_gate.hold_after(epoch + 1)

    def _save_checkpoint(self, directory: str, epochs_done: int, progress: EpochStats | None = None) -> None:
        """Rank 0: the training state; every rank: its RNG streams and the samples of the epoch so far.
        ``progress``: taken inside epoch ``epochs_done`` (0-based), whose counts the resume continues."""
        if self.rank == 0:
            extra = {
                "best_knn_top1": self.best_knn,
                "steps_per_epoch": self.plan.steps_per_epoch,
                "planned_epochs": self.cfg.optim.epochs if self.budgeted else None,
                "train_time_s": self.train_s,  # a partial epoch's seconds are in its progress
                "epoch_progress": None
                if progress is None
                else {
                    "steps": progress.steps,
                    "loss_sum": progress.loss_sum,
                    "seconds": progress.seconds,
                    "first_batch_s": progress.first_batch_s,
                    "log_sums": dict(progress.log_sums),
                    "log_counts": dict(progress.log_counts),
                },
            }
            ckpt.save_training_state(
                directory,
                engine_state=self.engine.state_dict(),
                epoch=epochs_done,
                mlflow_run_id=self.run_id,
                config=self.cfg.to_dict(),
                extra=extra,
            )
            ckpt.export_backbone(self.method, self.cfg, directory)
        ckpt.save_rng_state(directory, self.rank)
        midepoch.save_samples(directory, self.rank, self.epoch_samples)

    def finish(self) -> dict[str, Any]:
        if self.log is not None:
            self.log.flush()
        self.status.update(
            {
                "final_step": self.engine.step,
                "best_knn_top1": self.best_knn,
                "knn_pixels_top1": self.evaluation.pixels_knn,
                "epochs": self.cfg.optim.epochs,
                "train_time_s": self.train_s,
                "eval_time_s": self.eval_s,  # this process's: a resumed run's earlier evaluations are not in it
                "first_step_unix": self.first_step_unix,
                "first_step_s": self.first_step_s,  # in train_time_s, and in start-up: counted once
            }
        )
        return self.status
