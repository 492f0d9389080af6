"""Section 3 -- training step: images/s of BAM under Ray Train (1 and 2 workers) vs a bare PyTorch loop.

Same model (the shipped ResNet-18, 28 px, 2 global + 2 local crops), same global batch, same
seed, same step (``trainers.engine.Engine.train_step`` on ``crops_from_batch``), same CPU count:

- bare loop: a fresh process (``python -m bench.bare_run``), torch on all ``cpus`` threads, a
  ``DataLoader`` over ``MultiCropTorchDataset`` with ``data.map_workers`` worker processes (Ray Data's
  augmentation gets the same number of tasks);
- Ray Train, 1 worker holding all ``cpus`` (Ray sets its intra-op threads from that), and 2 workers
  holding ``cpus / 2`` each with half the batch each (global batch unchanged). The figure is
  the training loop's own per-step ``images_per_sec`` (global batch / time since the previous step
  ended, so data waits count), read back from the run's MLflow history.

A repeat is one optimiser step after the warm-up steps (2 warm-up + 8 timed; global batch 64 on CPU).
Both sides run ``trainers.loop.train_one_epoch``, so the data-wait share (time blocked in the batch
iterator / step time) is the loop's own ``data_wait_s`` on both.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.common import BenchContext, Figure, SectionResult, launch, output_tail
from bench.fixtures import init_ray, shards, tracking_uri, train_overrides
from orchestrator.metric_names import mlflow_key

REPO = Path(__file__).resolve().parent.parent


def step_overrides(ctx: BenchContext, data_path, steps: int, workers: int, uri: str) -> dict[str, Any]:
    """Overrides of ``bam_fmnist`` giving one epoch of exactly ``steps`` steps at the section's global batch
    (64 on CPU; 256 on CUDA)."""
    batch = 16 if ctx.quick else (256 if ctx.cuda else 64)
    per_worker = batch // max(workers, 1)
    o = train_overrides(
        ctx,
        data_path,
        **{
            "optim.batch_size": per_worker,
            "optim.epochs": 1,
            "data.train_limit": batch * steps,
            "train.workers": workers,
            "train.max_failures": 0,
            "name": f"bench-step-w{workers}",
            "tracking.tracking_uri": uri,
            "tracking.run_name": f"bench-step-w{workers}",
            # the published top-k must fit the targets of the (per-worker) batch
            "method.top_k_sink": min(128, 2 * batch),
        },
    )
    if not ctx.cuda:
        o["train.cpus_per_worker"] = max(ctx.cpus / max(workers, 1), 1.0)
    return o


def step_config(ctx: BenchContext, data_path, steps: int, workers: int, uri: str, stream: str = "epoch"):
    """``stream``: ``data.stream`` (``run``: each worker's one-execution stream, :mod:`data.run_stream`)."""
    from orchestrator.config import load_config

    o = step_overrides(ctx, data_path, steps, workers, uri)
    if stream != "epoch":
        o.update(
            {
                "data.stream": stream,
                "name": f"{o['name']}-{stream}",
                "tracking.run_name": f"{o['name']}-{stream}",
            }
        )
    return load_config("bam_fmnist", o)


def bare_run(ctx: BenchContext, overrides: dict[str, Any], steps: int) -> list[tuple[float, float]]:
    """:func:`bare_loop` in a fresh process (``python -m bench.bare_run``): [(step seconds, data wait)]."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "bench.bare_run",
        json.dumps(overrides),
        ctx.device,
        str(steps),
        str(max(ctx.cpus, 1)),
    ]
    _, lines, rc = launch(cmd, REPO, env, timeout=600)
    out = [
        (float(p[3]), float(p[4])) for p in (line.split() for _, line in lines) if p and p[0] == "BENCH_STEP"
    ]
    if rc != 0 or len(out) != steps:
        raise RuntimeError(
            f"bench.bare_run exited {rc} after {len(out)} of {steps} steps:\n{output_tail(lines)}"
        )
    return out


def build_bare(cfg, device: str) -> dict[str, Any]:
    """Model + ``Engine`` + ``DataLoader`` for ``cfg`` in this process (no Ray, no MLflow): the plain
    alternative the step bench measures against. Returns ``dataset, method, engine, loader,
    batch, steps_per_epoch, device``."""
    from torch.utils.data import DataLoader

    from data.torch_dataset import MultiCropTorchDataset, collate_batch
    from trainers.build import build_engine, build_method

    dev = torch.device(device)
    batch = cfg.optim.batch_size * cfg.world_size
    dataset = MultiCropTorchDataset(cfg.data, split="train", seed=cfg.seed)
    cfg = dataclasses.replace(cfg, data=dataset.cfg)  # channels / mean / std: the data set's own when unset
    steps = max(len(dataset) // batch, 1)
    method = build_method(cfg, device=dev, steps_per_epoch=steps, batch_size=batch)
    engine = build_engine(cfg, method, device=dev, steps_per_epoch=steps, global_batch=batch)
    workers = cfg.data.map_workers
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        collate_fn=collate_batch,
        drop_last=True,
        pin_memory=dev.type == "cuda",
        prefetch_factor=max(cfg.data.prefetch_batches, 1) if workers > 0 else None,
    )
    return {
        "dataset": dataset,
        "method": method,
        "engine": engine,
        "loader": loader,
        "batch": batch,
        "steps_per_epoch": steps,
        "device": dev,
        "data": dataset.cfg,
    }


def bare_loop(
    cfg, device: str, max_steps: int, on_step: Callable[[int, float, float], None] | None = None
) -> dict:
    """The plain alternative: model + Engine + DataLoader in one process, no Ray, no MLflow, through the
    same ``trainers.loop.train_one_epoch`` as the Ray worker.

    ``on_step(step, seconds_since_previous_step_end, seconds_waiting_for_data)`` after every step."""
    from trainers.loop import train_one_epoch

    bare = build_bare(cfg, device)
    batch = bare["batch"]
    done = 0

    def report(logs: dict[str, float]) -> None:
        nonlocal done
        done += 1
        if on_step is not None:
            on_step(done, batch / logs["images_per_sec"], logs["data_wait_s"])

    stats = train_one_epoch(
        bare["engine"],
        itertools.islice(bare["loader"], max_steps),
        bare["data"],
        epoch=0,
        steps_per_epoch=bare["steps_per_epoch"],
        global_batch=batch,
        channels_last=cfg.train.channels_last,
        on_step=report,
        synchronize=True,
    )
    if stats.nan_error is not None:
        raise stats.nan_error
    return {"steps": done, "batch": batch}


def ray_run(ctx: BenchContext, cfg, uri: str) -> dict[str, list[float]]:
    """``orchestrator.training.driver.run_training`` on the bench's Ray; returns the per-step MLflow histories."""
    from mlflow import MlflowClient

    from orchestrator.training.driver import run_training

    out = run_training(cfg)
    if out.get("status") != "FINISHED":
        raise RuntimeError(
            f"Ray Train run {out.get('run_id')} ended {out.get('status')}: {out.get('reason')}"
        )
    c = MlflowClient(tracking_uri=uri)
    hist = {}
    for key in ("images_per_sec", "data_wait_s", "first_batch_wait_s"):
        points = sorted(c.get_metric_history(out["run_id"], mlflow_key(key)), key=lambda m: m.step)
        hist[key] = [m.value for m in points]
    hist["wall_time_s"] = [out.get("wall_time_s", float("nan"))]
    return hist


def run(ctx: BenchContext) -> SectionResult:
    res = SectionResult("step")
    path = shards(ctx)
    warmup, measured = (1, 2) if ctx.quick else (2, 8)
    steps = warmup + measured
    uri = tracking_uri(ctx, "step")
    device = ctx.device

    # ---- bare loop (its own process, like a Ray Train worker)
    o1 = step_overrides(ctx, path, steps, 1, uri)
    cfg1 = step_config(ctx, path, steps, 1, uri)
    batch = cfg1.optim.batch_size
    bare_all = bare_run(ctx, {k: v for k, v in o1.items() if not k.startswith("tracking.")}, steps)
    per_step = bare_all[warmup:]
    params = {
        "model": cfg1.model.backbone,
        "patch": cfg1.model.patch_size,
        "px": cfg1.data.global_crop_size,
        "crops": f"{cfg1.data.global_crops}+{cfg1.data.local_crops}",
        "global_batch": batch,
        "cpus": ctx.cpus,
        "device": device,
        "data_workers": cfg1.data.map_workers,
    }
    res.add(
        Figure(
            "step",
            "bare PyTorch loop + DataLoader",
            "img/s",
            [batch / dt for dt, _ in per_step],
            True,
            params,
        )
    )
    wait_share = [w / dt for dt, w in per_step]
    res.add(
        Figure(
            "step", "bare loop: data-wait share of step", "%", [100 * s for s in wait_share], False, params
        )
    )
    bare_compute = statistics.median(dt - w for dt, w in per_step)
    res.derived["bare loop compute per step (s)"] = bare_compute
    # What an epoch pays before its first step can run: DataLoader workers + first batch (bare) vs the
    # Ray Data stream's start (split coordinator, Parquet read, augmentation) -- excluded from the
    # per-step figures by the warm-up, but paid once per epoch.
    res.derived["bare loop: first step over median step (s)"] = bare_all[0][0] - statistics.median(
        dt for dt, _ in per_step
    )
    ctx.log(f"  step: bare loop {res.figures[0].median:.1f} img/s")

    # ---- Ray Train, 1 and 2 workers (2 only where there are 2 devices to put them on)
    missing = [m for m in ("ray", "mlflow") if importlib.util.find_spec(m) is None]
    if missing:  # e.g. a bare GPU box: keep the bare-loop figures rather than losing the section
        res.notes.append(f"Ray Train rows skipped: {', '.join(missing)} not installed here.")
        return res
    # (workers, data.stream): the per-epoch Ray Data split, and 1 worker with its one-execution stream
    runs = [(1, "epoch"), (2, "epoch"), (1, "run")]
    if ctx.cuda and torch.cuda.device_count() < 2:
        runs = [(1, "epoch"), (1, "run")]
        res.notes.append("2-worker Ray Train skipped: NCCL cannot put two ranks on one GPU.")
    init_ray(ctx, num_cpus=ctx.cpus + 2, num_gpus=torch.cuda.device_count() if ctx.cuda else None)
    for w, stream in runs:
        cfg = step_config(ctx, path, steps, w, uri, stream)
        hist = ray_run(ctx, cfg, uri)
        ips = hist["images_per_sec"][warmup:]
        if not ips:
            raise RuntimeError(
                f"Ray Train with {w} worker(s) logged {len(hist['images_per_sec'])} steps, expected {steps}"
            )
        wparams = dict(
            params,
            workers=w,
            per_worker_batch=cfg.optim.batch_size,
            cpus_per_worker=cfg.train.cpus_per_worker,
            ray_wall_time_s=hist["wall_time_s"][0],
        )
        name = f"Ray Train {w} worker{'s' if w > 1 else ''}" + (
            ", one-execution stream" if stream == "run" else ""
        )
        res.add(Figure("step", name, "img/s", ips, True, wparams))
        res.compare(name, "bare PyTorch loop + DataLoader")
        # On a shared machine the median carries other processes' load; the best step of each side is
        # the least disturbed one, so its ratio is the contention-robust companion of the median ratio.
        res.derived[f"{name} / bare loop, best step vs best step"] = (
            max(ips) / res.get("bare PyTorch loop + DataLoader").max
        )
        res.derived[f"{name}: first step over median step (s)"] = batch / hist["images_per_sec"][
            0
        ] - batch / statistics.median(ips)
        res.derived[f"{name}: epoch's first-batch wait (s)"] = hist["first_batch_wait_s"][0]
        share = [100 * wt * ip / batch for wt, ip in zip(hist["data_wait_s"][warmup:], ips)]
        res.add(Figure("step", f"{name}: data-wait share of step", "%", share, False, wparams))
        ctx.log(f"  step: {name} {res.get(name).median:.1f} img/s")
    r1 = res.get("Ray Train 1 worker")
    if r1 is not None and r1.ratio is not None:
        verdict = "meets" if r1.ratio >= 0.9 else "MISSES"
        res.notes.append(
            f"issue-3 target (1-worker Ray Train >= 0.9x the bare loop): {verdict} it at {r1.ratio:.2f}x."
        )
    return res
