"""Section 2 -- data: multi-crop images/s of the Ray Data stream vs a torch DataLoader.

Both sides read the same Fashion-MNIST shards (the same first ``N`` train images), decode the PNGs and
run the same ``MultiCropAugment.augment_batch`` (2 global + 6 local crops), with the same number of
CPUs: Ray Data gets ``cpus`` logical CPUs and ``cpus`` map actors, the DataLoader ``cpus`` worker
processes (both pin torch to one thread per worker). One repeat is one full pass (an epoch) over the
``N`` images, timed from creating the iterator to the last batch, so it includes what an epoch pays:
Ray re-executes the lazy dataset (a new actor pool) and the DataLoader forks its workers again. Ray is
iterated exactly as the training loop does (``iter_torch_batches`` with the config's prefetch and local
shuffle buffer); the DataLoader uses ``shuffle=True``.

Sizes: 28 px (Fashion-MNIST native, locals 12), upscaled to 96 px (locals 36) and 224 px (locals 96,
the published BAM/DINO crops). ``N`` shrinks with the crop area so each pass takes seconds.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from bench.common import BenchContext, Figure, SectionResult
from bench.fixtures import init_ray, shards

# (global px, local px, images per pass, batch size)
FULL = ((28, 12, 4000, 256), (96, 36, 512, 64), (224, 96, 128, 32))
QUICK = ((28, 12, 128, 32),)
LOCAL_CROPS = 6


def _cfg(path, g: int, loc: int, n: int, batch: int, workers: int):
    from data.config import DataConfig

    return DataConfig(
        path=str(path),
        global_crops=2,
        global_crop_size=g,
        local_crops=LOCAL_CROPS,
        local_crop_size=loc,
        train_limit=n,
        map_workers=workers,
        map_cpus=1.0,
        map_batch_size=batch,
    )


def ray_pass(ds, cfg, batch: int) -> tuple[float, float, set[int]]:
    """One epoch of the Ray stream, iterated as ``orchestrator.train`` does;
    (seconds, seconds to the first batch, indices seen)."""
    seen: set[int] = set()
    first = None
    t0 = time.perf_counter()
    for b in ds.iter_torch_batches(
        batch_size=batch,
        prefetch_batches=cfg.prefetch_batches,
        local_shuffle_buffer_size=cfg.local_shuffle_buffer or None,
    ):
        if first is None:
            first = time.perf_counter() - t0
        seen.update(b["index"].tolist())
    return time.perf_counter() - t0, first or 0.0, seen


def task_concurrency(start: float, end: float) -> dict[int, float]:
    """Share of the wall time between ``start`` and ``end`` (``time.time()``) during which 0, 1, 2, ...
    Ray Data tasks ran, from Ray's task timeline: where a pass leaves CPUs idle."""
    import ray

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        ray.timeline(filename=f.name)
        events = json.loads(Path(f.name).read_text() or "[]")
    lo, hi = start * 1e6, end * 1e6
    edges = []
    for e in events:  # Ray Data runs its read and map stages as remote ``_map_task`` calls
        if e.get("ph") == "X" and e.get("name", "").endswith("_map_task"):
            a, b = max(e["ts"], lo), min(e["ts"] + e.get("dur", 0), hi)
            if b > a:
                edges += [(a, 1), (b, -1)]
    share: dict[int, float] = {}
    running, last = 0, lo
    for t, step in sorted(edges):
        share[running] = share.get(running, 0.0) + (t - last) / (hi - lo)
        running, last = running + step, t
    share[running] = share.get(running, 0.0) + (hi - last) / (hi - lo)
    return {k: round(v, 3) for k, v in sorted(share.items())}


def torch_pass(dataset, batch: int, workers: int, epoch: int) -> tuple[float, float, set[int]]:
    """One epoch of a plain DataLoader over the torch twin (fresh workers, as a new epoch's iterator)."""
    from torch.utils.data import DataLoader

    from data.torch_dataset import collate_batch

    dataset.set_epoch(epoch)
    seen: set[int] = set()
    first = None
    t0 = time.perf_counter()
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        collate_fn=collate_batch,
        drop_last=False,
        prefetch_factor=2 if workers > 0 else None,
    )
    for b in loader:
        if first is None:
            first = time.perf_counter() - t0
        seen.update(b["index"].tolist())
    return time.perf_counter() - t0, first or 0.0, seen


def run(ctx: BenchContext) -> SectionResult:
    from data.pipeline import build_train_dataset, configure_data_context
    from data.torch_dataset import MultiCropTorchDataset

    res = SectionResult("data")
    path = shards(ctx)
    sizes = QUICK if ctx.quick else FULL
    repeats, warmup = (1, 1) if ctx.quick else (3, 1)
    workers = max(ctx.cpus, 1)
    # One logical CPU more than the map actors hold: the Parquet read tasks need a slot too, or Ray
    # Data waits forever (``backpressured: ResourceBudget``). Physical cores stay ``cpus``.
    init_ray(ctx, num_cpus=workers + 1)
    configure_data_context(float(workers + 1))
    res.notes.append(
        f"{workers} CPUs each side: {workers} Ray Data map actors vs {workers} DataLoader workers; "
        "one repeat = one epoch over the same images (2 global + 6 local crops)."
    )
    for g, loc, n, batch in sizes:
        cfg = _cfg(path, g, loc, n, batch, workers)
        params = {
            "global_px": g,
            "local_px": loc,
            "images": n,
            "batch": batch,
            "cpus": workers,
            "crops": f"2x{g}+{LOCAL_CROPS}x{loc}",
        }
        ds = build_train_dataset(cfg, seed=0)
        ray_runs, ray_first, ray_seen = [], [], set()
        for i in range(warmup + repeats):
            if i == warmup:
                timed_from = time.time()
            dt, first, seen = ray_pass(ds, cfg, batch)
            ray_seen |= seen
            if i >= warmup:
                ray_runs.append(n / dt)
                ray_first.append(first)
        res.derived[f"ray_tasks_running_share_{g}px"] = task_concurrency(timed_from, time.time())
        tds = MultiCropTorchDataset(cfg, split="train", seed=0)
        torch_runs, torch_first, torch_seen = [], [], set()
        for i in range(warmup + repeats):
            dt, first, seen = torch_pass(tds, batch, workers, epoch=i)
            torch_seen |= seen
            if i >= warmup:
                torch_runs.append(n / dt)
                torch_first.append(first)
        if ray_seen != torch_seen or len(ray_seen) != n:
            raise AssertionError(
                f"{g}px: Ray saw {len(ray_seen)} images, DataLoader {len(torch_seen)}, expected the same {n}"
            )
        tag = f"{g}px+{loc}px"
        res.add(Figure("data", f"Ray Data multi-crop {tag}", "img/s", ray_runs, True, params))
        res.add(Figure("data", f"torch DataLoader multi-crop {tag}", "img/s", torch_runs, True, params))
        res.compare(f"Ray Data multi-crop {tag}", f"torch DataLoader multi-crop {tag}")
        res.add(Figure("data", f"Ray Data first batch {tag}", "s", ray_first, False, params))
        res.add(Figure("data", f"torch DataLoader first batch {tag}", "s", torch_first, False, params))
        res.compare(f"Ray Data first batch {tag}", f"torch DataLoader first batch {tag}")
        ctx.log(
            f"  data: {tag}: ray {res.get(f'Ray Data multi-crop {tag}').median:.0f} img/s, "
            f"torch {res.get(f'torch DataLoader multi-crop {tag}').median:.0f} img/s"
        )
    return res
