"""`bamray submit -- <bamray command>`: run a bamray command as a Ray Job on a (remote) cluster.

Why a job and not a local driver against ``ray://``: a sweep runs for hours; as a Ray Job its driver
lives on the head node, survives the laptop disconnecting, and its logs stay queryable. The project
directory travels as the job's ``runtime_env["working_dir"]`` (uploaded once per distinct content;
``.venv``, ``.bamray``, ``.git`` and caches excluded, so neither local data, MLflow stores nor the
virtual environment are shipped), and the entrypoint is ``python -m orchestrator <args>``.

Equivalent Ray CLI::

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"excludes": [".venv", ".bamray", ".git"]}' \\
        -- python -m orchestrator sweep --config bam_fmnist --space bam_sinkhorn --trials 16

The job server is part of the Ray dashboard (``ray[default]``); on a cluster started from
``orchestrator/cluster/*.yaml`` it listens on the head's 127.0.0.1:8265, which ``ray dashboard
<cluster.yaml>`` forwards to this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from trainers.options import ConfigError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
#: Never uploaded: the local virtual environment, MLflow store / data shards / Ray results, VCS data.
EXCLUDES = [
    ".venv",
    ".bamray",
    ".git",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    "mlruns",
    "mlflow.db",
    "bench/results",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def submit_working_dir() -> Path:
    """The source tree this package was imported from (the folder holding ``orchestrator/``): what the job's
    ``working_dir`` uploads by default. Not :func:`orchestrator.tracking.project_root`, which is where runs
    store their data and may be anywhere (``$BAMRAY_HOME``, the current directory)."""
    return Path(__file__).resolve().parent.parent


def build_runtime_env(
    working_dir: str | os.PathLike | None = None,
    pip: list[str] | None = None,
    env_vars: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``runtime_env`` for the job: the project as ``working_dir`` (with :data:`EXCLUDES`), optional pip
    requirements (a cluster whose image lacks the project's dependencies) and environment variables."""
    env: dict[str, Any] = {
        "working_dir": str(working_dir or submit_working_dir()),
        "excludes": list(EXCLUDES),
    }
    if pip:
        env["pip"] = list(pip)
    if env_vars:
        env["env_vars"] = dict(env_vars)
    env.update(extra or {})
    return env


def entrypoint(args: list[str], python: str = "python") -> str:
    """``python -m orchestrator <args>``, shell-quoted (the job server runs it through a shell)."""
    if not args:
        raise ConfigError(
            "submit", "nothing to run: give a bamray command after --, e.g. -- sweep --config ..."
        )
    if args[0] in ("submit",):
        raise ConfigError("submit", "a submitted job cannot submit another job")
    return " ".join([shlex.quote(python), "-m", "orchestrator", *(shlex.quote(a) for a in args)])


def job_client(address: str):
    """A ``JobSubmissionClient`` that authenticates like ``ray start`` does
    (:func:`orchestrator.local_ray.send_token_when_one_exists`)."""
    from ray.job_submission import JobSubmissionClient

    from orchestrator.local_ray import send_token_when_one_exists

    send_token_when_one_exists()
    return JobSubmissionClient(address)


def submit_job(
    args: list[str],
    address: str = DEFAULT_ADDRESS,
    *,
    runtime_env: dict[str, Any] | None = None,
    submission_id: str | None = None,
    python: str = "python",
    metadata: dict[str, str] | None = None,
) -> str:
    """Submit ``python -m orchestrator <args>``; returns the submission id."""
    client = job_client(address)
    return client.submit_job(
        entrypoint=entrypoint(args, python),
        runtime_env=runtime_env or build_runtime_env(),
        submission_id=submission_id,
        metadata=metadata or {"bamray": "1"},
    )


def follow_logs(address: str, job_id: str) -> None:
    """Print the job's logs as they arrive until it ends (``tail_job_logs`` is an async generator)."""
    client = job_client(address)

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(tail())


def wait_for_job(address: str, job_id: str, timeout_s: float | None = None, poll_s: float = 2.0) -> str:
    """Poll until the job is SUCCEEDED / FAILED / STOPPED; returns that status (TimeoutError otherwise)."""
    client = job_client(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s} s")
        time.sleep(poll_s)


def _env_pairs(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError("--env", f"expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def cmd_submit(args: argparse.Namespace) -> int:
    """0 = submitted (``--no-wait``) or SUCCEEDED; 1 = FAILED / STOPPED."""
    command = list(args.command or [])
    if command and command[0] == "--":
        command = command[1:]
    address = args.address or os.environ.get("RAY_JOB_ADDRESS") or DEFAULT_ADDRESS
    extra = json.loads(args.runtime_env_json) if args.runtime_env_json else None
    runtime_env = build_runtime_env(args.working_dir, args.pip, _env_pairs(args.env), extra)
    job_id = submit_job(
        command, address, runtime_env=runtime_env, submission_id=args.job_id, python=args.python
    )
    print(f"submitted job {job_id} to {address}: {entrypoint(command, args.python)}", flush=True)
    if args.no_wait:
        print(
            f"  follow it with `ray job logs --address {address} --follow {job_id}`; "
            f"stop it with `ray job stop --address {address} {job_id}`"
        )
        return 0
    follow_logs(address, job_id)
    status = wait_for_job(address, job_id)
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def add_submit_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bamray submit`` on the CLI's subparsers."""
    s = subparsers.add_parser(
        "submit",
        help="run a bamray command as a Ray Job on a cluster (project uploaded as working_dir)",
        description="bamray submit [--address URL] -- sweep --config ... : submits `python -m orchestrator <args>` "
        "with the project as runtime_env working_dir, then follows its logs.",
    )
    s.add_argument(
        "--address", help=f"Ray job server (dashboard) URL (default: RAY_JOB_ADDRESS or {DEFAULT_ADDRESS})"
    )
    s.add_argument(
        "--no-wait", action="store_true", help="return after submitting instead of following the logs"
    )
    s.add_argument("--working-dir", help="directory to upload (default: the project root)")
    s.add_argument("--pip", action="append", metavar="REQ", help="pip requirement for the job's environment")
    s.add_argument("--env", action="append", metavar="KEY=VALUE", help="environment variable for the job")
    s.add_argument("--runtime-env-json", help="extra runtime_env entries as JSON")
    s.add_argument("--job-id", help="submission id (default: generated by Ray)")
    s.add_argument("--python", default="python", help="interpreter on the cluster (default: python)")
    s.add_argument("command", nargs=argparse.REMAINDER, help="-- then the bamray command and its arguments")
    s.set_defaults(func=cmd_submit)
    return s
