"""The plain alternative as its own process: a bare PyTorch loop (no Ray, no MLflow).

``python -m bench.bare_run '<json overrides of bam_fmnist>' <device> <steps> [<torch threads>]`` builds the config,
model, ``Engine`` and ``DataLoader`` exactly as :func:`bench.train_step.bare_loop` does and prints one
line per optimiser step::

    BENCH_STEP <step> <unix time at its end> <seconds since the previous step ended> <seconds in next()>

A fresh process, like a Ray Train worker, so neither side inherits the state of the bench's own
process (other sections' threads, allocator, profiler); the start-up section also uses it to time
launch -> first step.
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = json.loads(argv[0]) if argv else {}
    device = argv[1] if len(argv) > 1 else "cpu"
    steps = int(argv[2]) if len(argv) > 2 else 1
    threads = int(argv[3]) if len(argv) > 3 else 0
    import torch

    from bench.train_step import bare_loop
    from orchestrator.config import load_config

    cfg = load_config("bam_fmnist", overrides)
    if threads > 0:
        torch.set_num_threads(threads)

    def report(step: int, dt: float, wait: float) -> None:
        print(f"BENCH_STEP {step} {time.time():.6f} {dt:.6f} {wait:.6f}", flush=True)

    bare_loop(cfg, device, steps, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
