"""The signal guard of `bamray train` (orchestrator/training/interrupt.py) without Ray: what a signal
raises and when, and the CLI's one line and exit code. The real runs: tests/test_signals_ray.py."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from orchestrator.cli import _interrupted
from orchestrator.training.interrupt import Interrupted, SignalGuard, stop_on_signals


def test_sigterm_and_sigint_raise_interrupted_with_the_shells_exit_code():
    with stop_on_signals() as guard:
        with pytest.raises(Interrupted) as term:
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0.5)  # let the handler run
        assert term.value.exit_code == 143 and guard.signum == signal.SIGTERM
    with stop_on_signals(), pytest.raises(Interrupted) as sigint:
        os.kill(os.getpid(), signal.SIGINT)
        signal.sigtimedwait([], 0.5)
    assert sigint.value.exit_code == 130 and isinstance(sigint.value, KeyboardInterrupt)


def test_previous_handlers_come_back_and_nested_guards_share_one():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with stop_on_signals() as outer:
        assert signal.getsignal(signal.SIGTERM) == outer.handle
        with stop_on_signals() as inner:
            assert inner is outer
        assert signal.getsignal(signal.SIGTERM) == outer.handle  # the inner exit restored nothing
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_deferred_signal_is_raised_when_the_step_is_done():
    guard = SignalGuard(active=True)
    steps = []
    with pytest.raises(Interrupted) as err:
        with guard.deferred("Ray has started"):
            guard.handle(signal.SIGINT, None)  # returns: the step goes on
            steps.append("finished")
    assert steps == ["finished"] and err.value.signum == signal.SIGINT


def test_a_swallowed_signal_is_raised_again_at_the_next_check():
    guard = SignalGuard(active=True)
    guard.check()  # nothing received: nothing raised
    try:  # what Python does with an exception raised inside a __del__: print it and go on
        guard.handle(signal.SIGTERM, None)
    except Interrupted:
        pass
    with pytest.raises(Interrupted) as err:
        guard.check()
    assert err.value.signum == signal.SIGTERM
    guard.stopping()
    guard.check()  # cleaning up: the signal has been acted on


class _Exited(Exception):
    pass


def test_a_second_signal_while_stopping_or_waiting_exits_at_once(monkeypatch):
    def fake_exit(code: int) -> None:
        raise _Exited(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    guard = SignalGuard(active=True)
    with pytest.raises(_Exited, match="130"), guard.deferred("the MLflow run is created"):
        guard.handle(signal.SIGINT, None)
        guard.handle(signal.SIGINT, None)
    guard.stopping()
    with pytest.raises(_Exited, match="143"):
        guard.handle(signal.SIGTERM, None)


def test_rays_fresh_keyboard_interrupt_becomes_the_signal_received():
    """Ray raises a new KeyboardInterrupt from ray.get whatever the handler raised."""
    guard = SignalGuard(active=True)
    guard.signum = signal.SIGTERM
    assert guard.as_interrupted(KeyboardInterrupt()).signum == signal.SIGTERM
    assert guard.as_interrupted(SystemExit(0)).signum == signal.SIGTERM
    own = Interrupted(signal.SIGINT)
    assert guard.as_interrupted(own) is own


def test_off_the_main_thread_nothing_is_installed():
    seen = []

    def run() -> None:
        with stop_on_signals() as guard:
            seen.append((guard.active, signal.getsignal(signal.SIGTERM)))
            guard.check()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [(False, signal.getsignal(signal.SIGTERM))]


def test_cli_prints_one_line_with_the_resume_hint(capsys):
    stop = Interrupted(signal.SIGTERM)
    stop.run_id = "abc123"
    assert _interrupted(stop) == 143
    err = capsys.readouterr().err
    assert err == (
        "bamray: stopped by SIGTERM: MLflow run abc123 marked KILLED; "
        "continue it with `bamray train --resume abc123`\n"
    )
    assert _interrupted(KeyboardInterrupt()) == 130
    assert capsys.readouterr().err == "bamray: stopped by SIGINT\n"


def test_ray_train_still_registers_its_sigint_handler_where_the_driver_replaces_it():
    """The driver swaps this method on its trainer to keep Ray Train's handler (abort, then sys.exit(0))
    out; after a Ray upgrade that renames it, Ctrl-C in fit() would again end in exit 0."""
    from ray.train.torch import TorchTrainer

    assert callable(getattr(TorchTrainer, "_register_sigint_handler", None))
