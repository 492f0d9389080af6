"""What a bamray command prints: its own lines, the training's progress, and real problems; the rest of
Ray's output goes to a log file.

A Ray driver echoes every line its workers and actors print, and Ray logs INFO on the driver itself: a
3-epoch ``make run`` printed 250 lines (execution plans, ``TrainingReport(...)`` dicts of every rank,
worker-start warnings, a deprecation warning from inside Ray). Here every such line goes to the
command's log file (``.bamray/logs/``, and the run's ``logs/console.log`` artifact) and reaches the
console only when it is

* one of ours: workers print ``[bamray] ...`` lines (:data:`LINE_MARK`), shown without Ray's prefix;
* a progress update (:data:`PROGRESS_MARK` + JSON, from the training's rank 0), drawn as a live bar on a
  terminal and as a plain line every :data:`PLAIN_INTERVAL_S` otherwise;
* an error or warning that is not on the known-harmless list (:data:`HARMLESS`), with the lines of its
  traceback;
* anything at all with ``--verbose``, which restores Ray's own console.

The hook is Ray's driver-side dispatcher of forwarded worker output
(``ray._private.worker.global_worker_stdstream_dispatcher``, where ``ray.init`` registers its printer
as ``ray_print_logs``): :func:`route_ray_output` swaps that printer for :meth:`Console.ray_lines`. If a
Ray version lacks it, Ray's printing stays as it was (nothing is lost, the console is just louder).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

#: Prefix of the lines that workers print for the user (shown without Ray's ``(pid=...)`` prefix).
LINE_MARK = "[bamray] "
#: Prefix of rank 0's progress updates: the rest of the line is a JSON object (:func:`progress_line`).
PROGRESS_MARK = "[bamray:progress] "
#: Seconds between plain progress lines when the console is not a terminal (``BAMRAY_PROGRESS_S``).
PLAIN_INTERVAL_S = 30.0
#: Seconds between progress updates to a terminal.
TTY_INTERVAL_S = 1.0

#: Warnings Ray prints in normal operation, each checked harmless here: they go to the log file only.
HARMLESS = tuple(
    re.compile(p)
    for p in (
        r"PYTHON worker processes have been started on node",  # fractional-CPU tasks on a small node
        r"RayDeprecationWarning",  # from inside Ray (its own calls of its deprecated options)
        r"has constructor arguments in the object store and max_restarts > 0",  # Train's watcher actor
        r"Progress bars disabled",
        r"placement_group_cleaner",  # needs the dashboard, which a local Ray does not start
        r"Tip: to disable this warning",
        r"Token authentication is enabled for this Ray cluster",  # a local Ray on 127.0.0.1 only
    )
)
_ALERT = re.compile(r"Traceback|Error|ERROR|Exception|WARNING|Warning|CRITICAL|FATAL|\] [EF] |^[EF]\d{4} ")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: The Ray loggers of the driver process whose console output this module filters.
_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.air", "ray.serve", "mlflow", "alembic")


def plain_interval_s() -> float:
    """:data:`PLAIN_INTERVAL_S`, or ``BAMRAY_PROGRESS_S`` when set (0 = no progress lines)."""
    try:
        return max(0.0, float(os.environ.get("BAMRAY_PROGRESS_S", PLAIN_INTERVAL_S)))
    except ValueError:
        return PLAIN_INTERVAL_S


def progress_line(payload: dict[str, Any]) -> str:
    """The line a worker prints to report progress (``payload``: epoch, epochs, step, steps, images_per_sec,
    loss, eta_s, run_eta_s)."""
    return PROGRESS_MARK + json.dumps(payload, separators=(",", ":"))


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


def progress_text(p: dict[str, Any], *, bar_width: int = 0) -> str:
    """``epoch 1/2 [####------] 120/468 steps, 310 img/s, loss 4.1234, ETA 1:05 (run 4:40)``: the epoch's
    ETA and, when more epochs follow, the run's (training steps only: evaluations come on top)."""
    step, steps = int(p["step"]), max(1, int(p["steps"]))
    bar = ""
    if bar_width:
        done = round(bar_width * step / steps)
        bar = "[" + "#" * done + "-" * (bar_width - done) + "] "
    eta, run_eta = float(p.get("eta_s", 0.0)), float(p.get("run_eta_s", 0.0))
    text = (
        f"epoch {p['epoch']}/{p['epochs']} {bar}{step}/{steps} steps, {float(p['images_per_sec']):.0f} img/s, "
        f"loss {float(p['loss']):.4f}, ETA {_clock(eta)}"
    )
    return text + (f" (run {_clock(run_eta)})" if run_eta > eta + 0.5 else "")


class Console:
    """The process's console: a stream, a log file and the progress bar between them. Thread-safe: Ray's
    log thread and the main thread both write."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        verbose: bool = False,
        tty: bool | None = None,
        plain_interval: float | None = None,
    ) -> None:
        self._stream = stream
        self.verbose = verbose
        self.started = time.time()  # the command's launch, for the wall-time split of its summary
        self.tty = bool(tty if tty is not None else getattr(self.stream, "isatty", lambda: False)())
        if os.environ.get("TERM") == "dumb":
            self.tty = False
        self.plain_interval = plain_interval_s() if plain_interval is None else plain_interval
        self.log_path: Path | None = None
        self._log: TextIO | None = None
        self._lock = threading.RLock()
        self._bar = ""  # the progress text on the terminal's last line, redrawn after any other line
        self._last_plain = -float("inf")
        self._in_traceback = False
        self.hidden = 0  # forwarded lines kept out of the console (they are in the log file)

    @property
    def stream(self) -> TextIO:
        """The given stream, else the current ``sys.stdout`` (looked up at each write: a test's capture)."""
        return self._stream if self._stream is not None else sys.stdout

    def progress_interval_s(self) -> float:
        """How often the training's rank 0 should send progress: as often as this console shows it."""
        return TTY_INTERVAL_S if self.tty else self.plain_interval

    # ------------------------------------------------------------------------------------------ log file
    def open_log(self, path: str | os.PathLike) -> Path:
        """Append everything from now on to ``path`` as well (made with its folders)."""
        with self._lock:
            self.close_log()
            self.log_path = Path(path)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
            return self.log_path

    def close_log(self) -> None:
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None

    def to_log(self, line: str) -> None:
        with self._lock:
            if self._log is not None and not self._log.closed:
                self._log.write(line.rstrip("\n") + "\n")

    @contextlib.contextmanager
    def prints_to_log(self) -> Iterator[None]:
        """Inside: other code's ``print`` to ``sys.stdout`` goes to the log file only, while this console
        keeps writing to the stream it had. For Ray Tune, whose reporter prints its configuration box and
        a TensorBoard hint at every sweep's start whatever its verbosity. Nothing changes when verbose."""
        if self.verbose:
            yield
            return
        pinned, self._stream = self._stream, self.stream
        writer = _LogWriter(self)
        try:
            with contextlib.redirect_stdout(writer):
                yield
        finally:
            writer.flush()  # a last line without its newline
            self._stream = pinned

    # ------------------------------------------------------------------------------------------- console
    def say(self, line: str = "") -> None:
        """A line for the user: console and log file."""
        with self._lock:
            self.to_log(line)
            self._emit(line)

    def _emit(self, line: str) -> None:
        if self.tty and self._bar:
            self.stream.write("\r\x1b[K")
        self.stream.write(line + "\n")
        if self.tty and self._bar:
            self.stream.write(self._bar)
        self.stream.flush()

    def progress(self, payload: dict[str, Any]) -> None:
        """A progress update: redraw the terminal's bar; otherwise a plain line once per interval."""
        with self._lock:
            self.to_log(progress_text(payload))
            if self.tty:
                self._bar = progress_text(payload, bar_width=24)
                self.stream.write("\r\x1b[K" + self._bar)
                self.stream.flush()
                return
            now = time.monotonic()
            if self.plain_interval and now - self._last_plain >= self.plain_interval:
                self._last_plain = now
                self._emit("  " + progress_text(payload))

    def end_progress(self) -> None:
        """The epoch is over: the bar goes (the next line takes its place)."""
        with self._lock:
            if self.tty and self._bar:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
            self._bar = ""
            self._last_plain = -float("inf")

    # ------------------------------------------------------------------------------ forwarded Ray output
    def ray_lines(self, data: dict[str, Any]) -> None:
        """Handler for Ray's dispatcher of forwarded worker output (a batch of lines of one process)."""
        if data.get("pid") == "autoscaler":  # cluster scaling events: always worth a line
            for line in _autoscaler_events(data.get("lines", [])):
                self.say("(autoscaler) " + _ANSI.sub("", line))
            return
        source = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({source + ' ' if source else ''}pid={data.get('pid')}) "
        self._in_traceback = False
        for raw in data.get("lines", []):
            self.forwarded(_ANSI.sub("", raw), prefix)

    def forwarded(self, line: str, prefix: str = "") -> None:
        """One forwarded line: ours, progress, a problem, or the log file only."""
        with self._lock:
            if line.startswith(PROGRESS_MARK):
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    self.progress(json.loads(line[len(PROGRESS_MARK) :]))
                return
            if line.startswith(LINE_MARK):
                if line.startswith(LINE_MARK + "epoch "):
                    self.end_progress()
                self.say(line[len(LINE_MARK) :])
                return
            self.to_log(prefix + line)
            if self.verbose:
                self._emit(prefix + line)
                return
            if line.startswith("Traceback"):
                self._in_traceback = True
            if self._in_traceback or (_ALERT.search(line) and not is_harmless(line)):
                self._emit(prefix + line)
            else:
                self.hidden += 1


def _autoscaler_events(lines: list[str]) -> list[str]:
    try:
        from ray._private.worker import filter_autoscaler_events

        return list(filter_autoscaler_events(lines))
    except ImportError:
        return list(lines)


def in_ray_worker() -> bool:
    """This process is a Ray worker or actor (not a driver): its output reaches the user only through the
    driver's console."""
    if "ray" not in sys.modules:
        return False
    try:
        from ray._private import worker as ray_worker

        return ray_worker.global_worker.mode == ray_worker.WORKER_MODE
    except Exception:  # noqa: BLE001 - another Ray: treat as a driver
        return False


def is_harmless(line: str) -> bool:
    """A warning Ray prints in normal operation (:data:`HARMLESS`)."""
    return any(p.search(line) for p in HARMLESS)


class _DriverLogFilter(logging.Filter):
    """On the console handlers of Ray's driver-side loggers: warnings and errors only (not the harmless
    ones), unless ``--verbose``; every record also goes to the log file through :class:`_ToLog`."""

    def __init__(self, console: Console) -> None:
        super().__init__("bamray")
        self.console = console

    def filter(self, record: logging.LogRecord) -> bool:
        if self.console.verbose:
            return True
        return record.levelno >= logging.WARNING and not is_harmless(record.getMessage())


class _LogWriter(io.TextIOBase):
    """A text stream whose complete lines go to a console's log file."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self.console.to_log(line)
        return len(text)

    def flush(self) -> None:
        if self._partial:
            self.console.to_log(self._partial)
            self._partial = ""


class _ToLog(logging.Handler):
    def __init__(self, console: Console) -> None:
        super().__init__(logging.DEBUG)
        self.console = console
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.console.to_log(self.format(record))


_CONSOLE: Console | None = None


def get() -> Console:
    """The process's console (made on first use, quiet unless :func:`configure` said verbose)."""
    global _CONSOLE
    if _CONSOLE is None:
        _CONSOLE = Console()
    return _CONSOLE


def configure(*, verbose: bool = False, stream: TextIO | None = None, tty: bool | None = None) -> Console:
    """Set up the process's console once, from the command line (``--verbose``)."""
    global _CONSOLE
    _CONSOLE = Console(stream, verbose=verbose, tty=tty)
    return _CONSOLE


def say(line: str = "") -> None:
    """A line for the user on the process's console (and in its log file). In a Ray worker or actor (a
    training worker, a sweep's trial driver) it goes to the driver's console instead, marked as ours."""
    if in_ray_worker():
        to_driver(LINE_MARK + line)
    else:
        get().say(line)


def to_driver(text: str) -> None:
    """Raw text from a Ray worker or actor to the driver's console (:meth:`Console.ray_lines` reads the
    marks). Ray Train patches ``print`` in its workers to go through its logger and, when a library has
    wrapped ``sys.stdout`` (one here has), to the stream as well, so the driver showed every line twice;
    printing to the process's own stdout goes around both."""
    print(text, file=sys.__stdout__, flush=True)


def quiet_driver_loggers() -> None:
    """Ray's (and MLflow's) loggers in this process: warnings and errors to the console, everything to the
    log file. Call before ``ray.init`` (its start-up lines) and again after (handlers made since)."""
    import ray.data  # noqa: F401 - configures the 'ray.data' loggers: their handlers must exist first

    quiet_loggers(_RAY_LOGGERS)
    if not get().verbose:
        import warnings

        warnings.filterwarnings("ignore", message=r".*(deprecated|Deprecat).*", module=r"ray(\.|$)")


def quiet_mlflow_loggers() -> None:
    """MLflow's (and alembic's) loggers in a driver, as soon as MLflow is imported: a fresh store's
    "Creating initial MLflow database tables..." INFO lines otherwise reach the console of a first run,
    before Ray (and :func:`quiet_driver_loggers`) starts. Workers keep theirs."""
    if not in_ray_worker():
        quiet_loggers(("mlflow", "alembic"))


def quiet_loggers(names: tuple[str, ...]) -> None:
    """These loggers' console handlers show warnings and errors only (unless verbose); every record also
    goes to the log file. Idempotent."""
    console = get()
    for name in names:
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler) or any(
                isinstance(f, _DriverLogFilter) for f in handler.filters
            ):
                continue
            if isinstance(handler, logging.StreamHandler) or "RayHandler" in type(handler).__name__:
                handler.addFilter(_DriverLogFilter(console))
        if (name == "ray" or not logger.propagate) and not any(
            isinstance(h, _ToLog) for h in logger.handlers
        ):
            logger.addHandler(_ToLog(console))


def route_ray_output() -> bool:
    """After ``ray.init`` in this process: send forwarded worker output, the raylet's messages and Ray's
    driver-side logs through the console (see the module's docstring). Returns False when this Ray has no
    dispatcher to hook (its output then stays as Ray prints it)."""
    console = get()
    quiet_driver_loggers()
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return False
    dispatcher = getattr(ray_worker, "global_worker_stdstream_dispatcher", None)
    if dispatcher is None or not hasattr(dispatcher, "remove_handler"):
        return False
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("bamray_console")
    dispatcher.add_handler("bamray_console", console.ray_lines)
    if hasattr(ray_worker, "print_to_stdstream"):  # the raylet's messages (listen_error_messages) call it
        ray_worker.print_to_stdstream = lambda data, ignore_prefix=False: console.ray_lines(data)
    return True


def default_log_path(command: str, tracking_uri: str | None = None) -> Path:
    """``logs/<command>-<UTC time>-<pid>.log`` beside the SQLite store of ``tracking_uri`` (by default
    ``.bamray/``), else in the project's ``.bamray/``."""
    from orchestrator.tracking import BAMRAY_DIR, project_root, sqlite_path

    db = sqlite_path(tracking_uri) if tracking_uri else None
    root = db.parent if db is not None else project_root() / BAMRAY_DIR
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return root / "logs" / f"{command}-{stamp}-{os.getpid()}.log"


def log_to_run(uri: str, run_id: str) -> None:
    """The command's log so far (Ray's whole output included) as the run's ``logs/console.log``."""
    import shutil
    import tempfile

    from orchestrator import tracking

    path = get().log_path
    if path is None or not path.exists():
        return
    with tempfile.TemporaryDirectory(prefix="bamray-log-") as tmp:
        shutil.copy(path, os.path.join(tmp, "console.log"))
        tracking.log_artifacts(uri, run_id, tmp, "logs")
