"""Faults on purpose, for the tests of fault tolerance: the only production module that knows of them.

Three come from the config's ``debug:`` section (:class:`DebugConfig`; ``bamray config show`` marks it and
MLflow does not log it as run params), one from the environment:

- ``debug.fail_at_step``: rank 0 raises once at that global step (a marker file in the Ray run directory
  keeps the restarted worker group from raising again), so Ray Train restarts the group from the last
  checkpoint;
- ``debug.nan_at_step``: rank 0's loss becomes NaN at that step, like a blow-up on one worker;
- ``debug.hold_at_step``: every rank stops at that global step, once per run directory (a marker file per
  rank), and waits there: a frozen run that a test can take a node from at a known point (after the
  checkpoints before that step, before any later one). The restarted worker group goes past it;
- ``BAMRAY_TEST_EXIT_DRIVER_AFTER_EPOCHS=N``: the driver exits with code 17 (like a kill) once N epochs are
  checkpointed. An environment variable rather than a config field because ``--resume`` re-reads the
  run's saved config, and the resumed driver must not die again. The workers hold after the N-th
  checkpoint until the driver is gone, so "killed right after that checkpoint" is exact instead of a
  race with the next epoch.
- ``BAMRAY_TEST_INTERRUPT_SWEEP_AFTER_TRIALS=N``: once N trials ended, the sweep process interrupts itself
  exactly as Ctrl-C does (Tune's SIGUSR1 handler: save the experiment state, stop the running trials,
  return), so ``bamray sweep --resume`` can be tested deterministically.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainers.options import opt

if TYPE_CHECKING:
    import torch

EXIT_AFTER_EPOCHS_ENV = "BAMRAY_TEST_EXIT_DRIVER_AFTER_EPOCHS"
EXIT_CODE = 17
FAIL_MARKER = ".fail_at_step.fired"
HOLD_MARKER = ".hold_at_step.rank{rank}"
INTERRUPT_SWEEP_ENV = "BAMRAY_TEST_INTERRUPT_SWEEP_AFTER_TRIALS"


@dataclasses.dataclass
class DebugConfig:
    """Fault injection for tests; not a training setting (never logged as MLflow params)."""

    fail_at_step: int = opt(-1, ge=-1, help="raise once in rank 0 at this global step (-1 = off)")
    nan_at_step: int = opt(-1, ge=-1, help="make rank 0's loss NaN at this global step (-1 = off)")
    hold_at_step: int = opt(-1, ge=-1, help="every rank waits at this global step, once (-1 = off)")


class InjectedFailure(RuntimeError):
    """The ``debug.fail_at_step`` worker failure."""


def exit_after_checkpoints() -> int:
    """Checkpointed epochs after which the driver exits (:data:`EXIT_AFTER_EPOCHS_ENV`; 0 = never)."""
    return int(os.environ.get(EXIT_AFTER_EPOCHS_ENV, "0") or 0)


@dataclasses.dataclass(frozen=True)
class WorkerFaults:
    """The faults one Train run's workers inject; built by the driver, carried in the worker plan."""

    fail_at_step: int = -1
    nan_at_step: int = -1
    hold_after_checkpoints: int = 0
    hold_at_step: int = -1

    @classmethod
    def of(cls, debug: DebugConfig) -> WorkerFaults:
        return cls(debug.fail_at_step, debug.nan_at_step, exit_after_checkpoints(), debug.hold_at_step)

    def before_step(self, step: int, rank: int, run_dir: str | None) -> None:
        """Hold at ``hold_at_step`` and raise :class:`InjectedFailure` at ``fail_at_step``, each once per
        run directory."""
        if step == self.hold_at_step and run_dir:
            marker = Path(run_dir, HOLD_MARKER.format(rank=rank))
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"holding at step {step}\n")
                time.sleep(3600)
        if rank != 0 or step != self.fail_at_step or not run_dir:
            return
        marker = Path(run_dir, FAIL_MARKER)
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"fired at step {step}\n")
        raise InjectedFailure(f"debug.fail_at_step: injected worker failure at step {step}")

    def wrap_loss_hook(self, rank: int, hook: Callable[[int, torch.Tensor], torch.Tensor] | None):
        """``hook`` preceded by the NaN injection of ``nan_at_step`` (unchanged when that is off)."""
        if self.nan_at_step < 0 or rank != 0:
            return hook

        def inject(step: int, loss: torch.Tensor) -> torch.Tensor:
            if step == self.nan_at_step:
                loss = loss * float("nan")
            return hook(step, loss) if hook is not None else loss

        return inject

    def after_checkpoint(self, checkpoints_reported: int) -> None:
        """Hold this worker once the driver is about to exit (it counts checkpoints the same way)."""
        if self.hold_after_checkpoints and checkpoints_reported == self.hold_after_checkpoints:
            time.sleep(3600)


def driver_exit_callbacks() -> list[Any]:
    """Ray Train callbacks for :data:`EXIT_AFTER_EPOCHS_ENV` (none when it is unset): the controller
    writes a flag file after the N-th checkpoint, a watcher thread of the driver turns it into
    ``os._exit``."""
    epochs = exit_after_checkpoints()
    if epochs <= 0:
        return []
    import ray.train

    flag = tempfile.mktemp(prefix="bamray-exit-", dir="/tmp")

    class ExitAfter(ray.train.UserCallback):
        def __init__(self) -> None:
            self.count = 0

        def after_report(self, run_context: Any, metrics: Any, checkpoint: Any) -> None:
            if checkpoint is not None:
                self.count += 1
                if self.count >= epochs:
                    Path(flag).write_text("exit\n")

    def watch() -> None:
        while not os.path.exists(flag):
            time.sleep(0.2)
        os.unlink(flag)
        print(f"{EXIT_AFTER_EPOCHS_ENV}: exiting the driver after {epochs} checkpointed epoch(s)", flush=True)
        os._exit(EXIT_CODE)

    threading.Thread(target=watch, daemon=True).start()
    return [ExitAfter()]


def interrupt_sweep_after(ended_trials: int) -> None:
    """The :data:`INTERRUPT_SWEEP_ENV` hook, called by the sweep after each trial ends. Tune installs its
    SIGUSR1 handler only when fit() runs in the main thread; anywhere else the signal's default action would
    kill the process, so it stays off there."""
    limit = int(os.environ.get(INTERRUPT_SWEEP_ENV, "0") or 0)
    handled = signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None)
    if limit and ended_trials >= limit and handled:
        print(f"{INTERRUPT_SWEEP_ENV}={limit}: interrupting the sweep like Ctrl-C", flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)
