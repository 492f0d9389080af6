"""Command line of the suite: pick sections, run each in isolation, write the JSON after each one.

A section that fails (or whose dependency has not landed) is recorded with its traceback and the
others still run: one broken part must not hide the figures of the rest. The JSON is rewritten after
every section so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.common import (
    SECTIONS,
    BenchContext,
    SectionResult,
    cpu_count,
    environment,
    machine_name,
    markdown_table,
    results_path,
    write_results,
)

MODULES = {
    "loss": "bench.loss_kernels",
    "data": "bench.data_pipeline",
    "step": "bench.train_step",
    "startup": "bench.startup",
    "sweep": "bench.sweep",
    "embed": "bench.embed",
    "pictures": "bench.pictures",
}

#: Seconds a section may take before it is stopped and recorded as an error (full, quick): a hung
#: Ray job must not eat the whole 15-minute budget. On the 2-CPU AVX2 host of 2026-12-02 the start-up
#: section (6 runs of both streams, 3 bare) took 523 s and the sweep passed 600 s before its grid ended.
TIME_LIMITS = {
    "loss": (720, 120),
    "data": (600, 90),
    "step": (600, 180),
    "startup": (1200, 600),
    "sweep": (1200, 300),
    "embed": (900, 300),
    "pictures": (600, 300),
}


class SectionTimeout(TimeoutError):
    """A section ran past its entry in ``TIME_LIMITS``."""


def _alarm(seconds: int):
    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        raise SectionTimeout(f"section ran past its {seconds} s limit (bench.runner.TIME_LIMITS)")

    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, handler)
        signal.alarm(seconds)


def _cancel_alarm() -> None:
    if hasattr(signal, "SIGALRM"):
        signal.alarm(0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run, of: {','.join(SECTIONS)} (default: all)",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny smoke mode (seconds per section, not meaningful figures)"
    )
    p.add_argument(
        "--device", default="cpu", help="cpu or cuda[:N] (cuda: bf16, ViT-S/16 224 px, batch 256, 2+6 crops)"
    )
    p.add_argument("--out", type=Path, default=None, help="results directory (default: bench/results)")
    p.add_argument(
        "--time-limit-scale",
        type=float,
        default=1.0,
        help="multiply every section's time limit (a slow or shared machine)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="scratch directory for shards, Ray and MLflow (default: a fresh /tmp dir, removed after)",
    )
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad or not only:
        p.error(f"--only: unknown section(s) {bad}; allowed: {','.join(SECTIONS)}")
    args.only = only
    if not args.time_limit_scale > 0:
        p.error(f"--time-limit-scale: got {args.time_limit_scale}; must be > 0")
    if not (args.device == "cpu" or args.device == "cuda" or args.device.startswith("cuda:")):
        p.error(f"--device: got {args.device!r}; allowed: cpu, cuda, cuda:N")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device != "cpu":
        import torch

        if not torch.cuda.is_available():
            print(f"--device {args.device}: no CUDA device is visible to torch", file=sys.stderr)
            return 2
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

    # Ray's socket paths must stay short: the scratch dir lives directly under /tmp.
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bb", dir="/tmp")) if own_workdir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def log(msg: str) -> None:
        print(f"[bench {time.time() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    ctx = BenchContext(device=args.device, quick=args.quick, workdir=workdir, cpus=cpu_count(), log=log)
    path = results_path(args.device, args.out, sections=args.only)
    payload = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_name(args.device),
        "device": args.device,
        "quick": args.quick,
        "sections_requested": args.only,
        "environment": environment(args.device),
        "sections": {},
    }
    results: dict[str, SectionResult] = {}
    try:
        for name in args.only:
            log(f"section {name} ...")
            t0 = time.perf_counter()
            load_before = os.getloadavg()
            try:
                _alarm(max(1, int(TIME_LIMITS[name][1 if args.quick else 0] * args.time_limit_scale)))
                module = importlib.import_module(MODULES[name])
                res = module.run(ctx)
            except ModuleNotFoundError as err:
                res = SectionResult(name, skipped=f"dependency missing: {err}")
            except Exception:  # noqa: BLE001 - record and go on with the other sections
                res = SectionResult(name, error=traceback.format_exc())
            finally:
                _cancel_alarm()
                _shutdown_ray()
            res.seconds = time.perf_counter() - t0
            # Other processes on the machine skew every figure: keep the load next to the numbers.
            res.derived["load_average_1min_before"] = load_before[0]
            res.derived["load_average_1min_after"] = os.getloadavg()[0]
            busiest = max(load_before[0], res.derived["load_average_1min_after"])
            if busiest > 1.5 * ctx.cpus and not res.error:
                res.notes.append(
                    f"MACHINE BUSY: 1-min load average up to {busiest:.1f} on {ctx.cpus} CPUs during "
                    "this section; other processes shaped these figures -- rerun it on an idle machine."
                )
            results[name] = res
            payload["sections"][name] = res.to_dict()
            payload["total_seconds"] = time.time() - started
            write_results(path, payload)
            log(
                f"section {name}: {'ERROR' if res.error else 'skipped' if res.skipped else 'ok'} "
                f"in {res.seconds:.1f}s"
            )
            if res.error:
                print(res.error, file=sys.stderr)
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"# bamray bench: {payload['machine']} ({args.device}{', quick' if args.quick else ''}), "
        f"{payload['date']}, {payload['total_seconds']:.0f} s\n"
    )
    print(markdown_table(results))
    print(f"\nresults: {path}")
    return 1 if any(r.error for r in results.values()) else 0


def _shutdown_ray() -> None:
    """Each section starts the Ray it needs (CPU budget differs); never leak one into the next."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
