"""Section 4 -- start-up: seconds from launching ``bamray train`` to the end of its first optimiser step.

``python -m orchestrator train --config bam_fmnist --set ...`` (1 worker, one 2-step epoch) runs as a
subprocess; the first step's time is the MLflow timestamp of the ``loss`` metric at step 1 (the Ray
worker logs it right after ``Engine.train_step`` returns, with ``time.time()`` on the same machine).
The driver's ``MLflow run <id>`` line (printed once config, data and the MLflow run are ready, before
Ray starts) splits the interval into "driver ready" and "Ray + workers + data to the first step".
Both data streams are timed, alternately: ``data.stream: epoch`` (the default; the figures without a
stream in their name) and ``run`` (each worker's one-execution stream, opened as the worker starts).
Then the default run joins a local Ray that another process keeps up (``train.address``), which takes
Ray's own start off the critical path.

The plain alternative is a bare PyTorch script (``python -m bench.bare_run``) that builds the same
config, model and DataLoader and prints a timestamp after its first step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import BenchContext, Figure, SectionResult, launch, output_tail
from bench.fixtures import shards, tracking_uri, train_overrides
from orchestrator.metric_names import mlflow_key

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240
READY_LINE = "MLflow run "


def _first_step_time(uri: str, run_name: str) -> float:
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exps = c.search_experiments()
    runs = c.search_runs([e.experiment_id for e in exps], filter_string=f"attributes.run_name = '{run_name}'")
    if not runs:
        raise RuntimeError(f"no MLflow run named {run_name!r} in {uri}")
    hist = sorted(c.get_metric_history(runs[0].info.run_id, mlflow_key("loss")), key=lambda m: m.step)
    if not hist:
        raise RuntimeError(f"MLflow run {runs[0].info.run_id} logged no per-step loss")
    return hist[0].timestamp / 1000.0


def set_args(overrides: dict) -> list[str]:
    """``--set key=value`` arguments (values as YAML scalars, which JSON scalars are)."""
    out: list[str] = []
    for k, v in overrides.items():
        out += ["--set", f"{k}={v if isinstance(v, str) else json.dumps(v)}"]
    return out


def _first_step(
    base: dict, uri: str, env: dict[str, str], name: str, extra: dict
) -> tuple[float, list, float]:
    """Launch one ``bamray train`` of ``base`` + ``extra``; (seconds to its first step, its output lines
    with their times, the launch time)."""
    o = dict(base, **{"name": name, "tracking.run_name": name}, **extra)
    cmd = [sys.executable, "-m", "orchestrator", "train", "--config", "bam_fmnist", *set_args(o)]
    t0, lines, rc = launch(cmd, REPO, env, TIMEOUT_S)
    if rc != 0:
        raise RuntimeError(f"`bamray train` ({extra}) exited {rc}:\n{output_tail(lines)}")
    return _first_step_time(uri, name) - t0, lines, t0


def keep_local_ray(env: dict[str, str]) -> subprocess.Popen:
    """A process holding a local Ray (bamray's: loopback only) until a line reaches its stdin; it prints
    ``GCS <address>`` once Ray is up."""
    script = (
        "import shutil, sys, tempfile, ray\n"
        "from orchestrator.local_ray import start_local_ray\n"
        "d = tempfile.mkdtemp(prefix='bk', dir='/tmp')\n"
        "c = start_local_ray(4, _temp_dir=d, log_to_driver=False)\n"
        "print('GCS', c.address_info['gcs_address'], flush=True)\n"
        "sys.stdin.readline()\n"
        "ray.shutdown()\n"
        "shutil.rmtree(d, ignore_errors=True)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )


def run(ctx: BenchContext) -> SectionResult:
    res = SectionResult("startup")
    path = shards(ctx)
    uri = tracking_uri(ctx, "startup")
    repeats, plain_repeats = (1, 1) if ctx.quick else (3, 3)
    # A small batch: the figure is start-up, not the step (that is section "step").
    batch = 16 if not ctx.cuda else 256
    base = train_overrides(
        ctx,
        path,
        **{
            "optim.batch_size": batch,
            "optim.epochs": 1,
            "data.train_limit": 2 * batch,
            "train.workers": 1,
            "train.max_failures": 0,
            "tracking.tracking_uri": uri,
            "method.top_k_sink": min(128, 2 * batch),
        },
    )
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    params = {
        "config": "bam_fmnist",
        "workers": 1,
        "batch": batch,
        "train_limit": 2 * batch,
        "device": ctx.device,
    }

    totals, ready, first_steps, run_stream = [], [], [], []
    # alternate the two data streams, so that a slow spell of the machine does not land on one of them
    for i, stream in [(i, s) for i in range(repeats) for s in ("epoch", "run")]:
        first, lines, t0 = _first_step(base, uri, env, f"bench-startup-{stream}-{i}", {"data.stream": stream})
        ctx.log(f"  startup: bamray train (data.stream {stream}) first step after {first:.1f}s")
        if stream == "run":
            run_stream.append(first)
            continue
        first_steps.append(first)
        ready_at = next((t for t, line in lines if READY_LINE in line), None)
        if ready_at is not None:
            ready.append(ready_at - t0)
        totals.append(time.time() - t0)

    # The same run joining a local Ray that is already up (`train.address`): what a Ray kept across runs
    # would save. A separate process keeps it, as a user's would; Ray's start and its helpers' boot leave
    # the critical path, every process of the run (controller, worker, map tasks) still starts.
    kept = keep_local_ray(env)
    joined = []
    try:
        address = next(line.split()[1] for line in kept.stdout if line.startswith("GCS "))
        for i in range(repeats):
            name = f"bench-startup-joined-{i}"
            joined.append(_first_step(base, uri, env, name, {"train.address": address})[0])
            ctx.log(f"  startup: bamray train joining a running Ray: first step after {joined[-1]:.1f}s")
    finally:
        kept.communicate("\n", timeout=60)

    plain = []
    for _ in range(plain_repeats):
        o = {k: v for k, v in base.items() if not k.startswith(("tracking.", "train.storage"))}
        cmd = [sys.executable, "-m", "bench.bare_run", json.dumps(o), ctx.device, "1"]
        t0, lines, rc = launch(cmd, REPO, env, TIMEOUT_S)
        stamps = [float(line.split()[2]) for _, line in lines if line.startswith("BENCH_STEP ")]
        if rc != 0 or not stamps:
            raise RuntimeError(f"bench.bare_run exited {rc}:\n{output_tail(lines)}")
        plain.append(stamps[0] - t0)
    ctx.log(f"  startup: bare script first step after {min(plain):.1f}s")

    res.add(Figure("startup", "bamray train: launch -> first step", "s", first_steps, False, params))
    res.add(Figure("startup", "bare PyTorch script: launch -> first step", "s", plain, False, params))
    res.compare("bamray train: launch -> first step", "bare PyTorch script: launch -> first step")
    run_name = "bamray train, data.stream run: launch -> first step"
    res.add(Figure("startup", run_name, "s", run_stream, False, dict(params, stream="run")))
    res.compare(run_name, "bare PyTorch script: launch -> first step")
    joined_name = "bamray train joining a running local Ray (train.address): launch -> first step"
    res.add(Figure("startup", joined_name, "s", joined, False, dict(params, ray="already running")))
    res.compare(joined_name, "bare PyTorch script: launch -> first step")
    if ready:
        res.add(
            Figure(
                "startup", "bamray train: launch -> driver ready (MLflow run line)", "s", ready, False, params
            )
        )
    res.add(Figure("startup", "bamray train: whole 1-epoch run (process exit)", "s", totals, False, params))
    res.notes.append(
        "Start-up = seconds from spawning the process to the end of the first optimiser step "
        "(MLflow step-1 timestamp for bamray; a printed timestamp for the bare script)."
    )
    return res
