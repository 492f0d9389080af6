"""Ctrl-C and SIGTERM for ``bamray train``: stop at any moment, cleanly, with exit code 128 + signal.

Without this, the driver's signals are at the mercy of whoever installed a handler last. Python's
default SIGINT handler raises ``KeyboardInterrupt`` wherever the main thread happens to be: inside
``ray.init`` half a cluster is started and never shut down; inside a ``__del__`` or a weakref callback
the exception is printed as "Exception ignored" and the run goes on. ``ray.init`` installs a C++
handler for SIGTERM that prints a stack and aborts (a core dump, rc 134), with the MLflow run left
RUNNING. Ray Train's ``fit()`` installs its own SIGINT handler, which aborts the run and then
``sys.exit(0)``: a stopped run that reports success.

:func:`stop_on_signals` installs one handler for both signals that raises :class:`Interrupted` in the
main thread, and remembers the signal. Two things make that safe:

* **Deferred sections** (:meth:`SignalGuard.deferred`): starting Ray and creating the MLflow run are not
  cut in half; the signal is acted on right after them, when there is a Ray to shut down and a run id
  to mark KILLED. A second signal while waiting exits at once.
* **Checks between phases** (:meth:`SignalGuard.check`): a signal whose exception was swallowed (raised
  inside a ``__del__``, say) is raised again at the next phase boundary instead of being lost.

Once the driver is cleaning up (:meth:`SignalGuard.stopping`), a further signal means "now": the process
exits at once, leaving the rest to the local Ray's watchdog (:mod:`orchestrator.local_ray`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

#: The signals that stop a run; SIGTERM is what a scheduler, a container runtime or ``kill`` sends.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop signal, raised in the main thread. A ``KeyboardInterrupt`` so that every ``except Exception``
    (retry loops, best-effort logging) lets it through. ``run_id``: the MLflow run it marked KILLED."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.run_id: str | None = None

    @property
    def exit_code(self) -> int:
        """128 + signal number, what a shell reports for a process the signal ended (130, 143)."""
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class SignalGuard:
    """The state of :func:`stop_on_signals`: the first signal received and what the driver is doing."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self.signum: int | None = None
        self._deferring: str | None = None
        self._stopping = False

    def handle(self, signum: int, frame: Any) -> None:
        """The signal handler (also callable directly in tests)."""
        name = signal.Signals(signum).name
        if self._stopping or (self._deferring and self.signum is not None):
            print(f"bamray: {name} again: exiting at once, without cleaning up", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = self.signum or signum
        if self._deferring:
            notice = f"stopping as soon as {self._deferring} (send it again to exit at once)"
            print(f"bamray: {name} received: {notice}", file=sys.stderr, flush=True)
            return
        raise Interrupted(signum)

    def as_interrupted(self, err: BaseException) -> Interrupted:
        """``err`` as the :class:`Interrupted` of the signal received. Ray turns a signal handler's
        exception inside ``ray.get`` into a fresh ``KeyboardInterrupt`` (the signal is lost), and Ray
        Train's SIGINT handler, where it got installed after all, ends in ``SystemExit``."""
        if isinstance(err, Interrupted):
            return err
        return Interrupted(self.signum or signal.SIGINT)

    def check(self) -> None:
        """Raise the signal received earlier whose exception did not get through."""
        if self.signum is not None and not self._stopping:
            raise Interrupted(self.signum)

    @contextlib.contextmanager
    def deferred(self, what: str) -> Iterator[None]:
        """Hold a signal until the block has finished (``what``, e.g. "Ray has started"), then raise it.
        For steps whose half-done state nobody could clean up: a Ray started but not yet known to us, an
        MLflow run created but whose id we never got."""
        outer, self._deferring = self._deferring, what
        try:
            yield
        finally:
            self._deferring = outer
        self.check()

    def stopping(self) -> None:
        """The driver is cleaning up after a signal: a further one exits at once."""
        self._stopping = True

    def reinstall(self) -> None:
        """Take the signals back after ``ray.init`` (its SIGTERM handler aborts with a core dump) or
        ``fit()`` (its SIGINT handler ends in ``sys.exit(0)``)."""
        if self.active:
            for sig in STOP_SIGNALS:
                signal.signal(sig, self.handle)


_current: SignalGuard | None = None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[SignalGuard]:
    """SIGINT and SIGTERM raise :class:`Interrupted` for the duration of the block; the previous handlers
    are restored afterwards. Nested uses share the outer guard. Off the main thread (where Python allows
    no signal handler) the guard is inert: nothing is installed and :meth:`SignalGuard.check` never
    raises."""
    global _current
    if _current is not None:
        yield _current
        return
    if threading.current_thread() is not threading.main_thread():
        yield SignalGuard(active=False)
        return
    guard = SignalGuard(active=True)
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    _current = guard
    try:
        guard.reinstall()
        yield guard
    finally:
        _current = None
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
