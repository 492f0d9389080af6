"""Section 4 -- start-up: seconds from launching ``bamray train`` to the end of its first optimiser step.

``python -m orchestrator train --config bam_fmnist --set ...`` (1 worker, one 2-step epoch) runs as a
subprocess; the first step's time is the MLflow timestamp of the ``loss`` metric at step 1 (the Ray
worker logs it right after ``Engine.train_step`` returns, with ``time.time()`` on the same machine).
The driver's ``MLflow run <id>`` line (printed once config, data and the MLflow run are ready, before
Ray starts) splits the interval into "driver ready" and "Ray + workers + data to the first step".
Both data streams are timed, alternately: ``data.stream: epoch`` (the default; the figures without a
stream in their name) and ``run`` (each worker's one-execution stream, opened as the worker starts).
Then the default run after ``bamray ray up`` (a local Ray kept between runs, which ``bamray train`` joins
by itself), which takes Ray's own start off the critical path.

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
JOINED_LINE = "joined the local Ray kept by `bamray ray up`"


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

    # The same run after `bamray ray up`: a local Ray kept between runs, which `bamray train` joins on its
    # own. Ray's start and its helpers' boot leave the critical path; every process of the run (controller,
    # worker, map tasks) still starts. Its state lives in the bench's scratch (never a user's kept Ray),
    # and the config check's model-name cache there is filled first, as a user's already is.
    kept_env = dict(env, BAMRAY_CACHE_DIR=str(ctx.workdir / "kept-ray"))
    bamray = [sys.executable, "-m", "orchestrator"]
    subprocess.run(
        [*bamray, "config", "show", "--config", "bam_fmnist"],
        cwd=REPO,
        env=kept_env,
        capture_output=True,
        timeout=TIMEOUT_S,
    )
    up = subprocess.run(
        [*bamray, "ray", "up"], cwd=REPO, env=kept_env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    if up.returncode != 0:
        raise RuntimeError(f"`bamray ray up` exited {up.returncode}:\n{up.stderr[-3000:]}")
    joined = []
    try:
        for i in range(repeats):
            first, lines, _ = _first_step(base, uri, kept_env, f"bench-startup-joined-{i}", {})
            if not any(JOINED_LINE in line for _, line in lines):
                raise RuntimeError(f"`bamray train` did not join the kept Ray:\n{output_tail(lines)}")
            joined.append(first)
            ctx.log(f"  startup: bamray train after `bamray ray up`: first step after {joined[-1]:.1f}s")
    finally:
        subprocess.run(
            [*bamray, "ray", "down"], cwd=REPO, env=kept_env, capture_output=True, timeout=TIMEOUT_S
        )

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
    joined_name = "bamray train after `bamray ray up` (joins the kept local Ray): launch -> first step"
    res.add(Figure("startup", joined_name, "s", joined, False, dict(params, ray="kept by bamray ray up")))
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
