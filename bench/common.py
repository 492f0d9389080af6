"""Shared machinery of the suite: repeat-timing, peak memory, figures, the JSON file and the table.

Every figure is the median of several repeats taken after warm-up, reported with min and max and every
raw repeat, so a reader can judge the spread instead of trusting one number. A figure may name a
*baseline* (the plain alternative it is compared with); its ratio is then "how much better bamray is":
``value / baseline`` for throughputs and ``baseline / value`` for times and memory, so > 1 always means
bamray is ahead and < 1 means it is behind.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import re
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).parent / "results"
SECTIONS = ("loss", "data", "step", "startup", "sweep", "embed", "pictures")


@dataclasses.dataclass
class BenchContext:
    """What every section needs: where it runs and how hard it may try."""

    device: str = "cpu"
    quick: bool = False
    workdir: Path = Path(".")
    cpus: int = 1
    log: Callable[[str], None] = print

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


@dataclasses.dataclass
class Figure:
    """One measured quantity: raw repeats + summary, optionally compared with a plain baseline."""

    section: str
    name: str
    unit: str
    raw: list[float]
    higher_is_better: bool = False
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    baseline: str | None = None  # ``name`` of the figure (same section) this one is compared with
    ratio: float | None = None
    note: str = ""

    @property
    def median(self) -> float:
        return float(statistics.median(self.raw)) if self.raw else float("nan")

    @property
    def min(self) -> float:
        return float(min(self.raw)) if self.raw else float("nan")

    @property
    def max(self) -> float:
        return float(max(self.raw)) if self.raw else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(median=self.median, min=self.min, max=self.max)
        return d


@dataclasses.dataclass
class SectionResult:
    """Figures of one section plus derived numbers (growth, shares) and free-text findings."""

    name: str
    figures: list[Figure] = dataclasses.field(default_factory=list)
    derived: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    skipped: str | None = None

    def add(self, fig: Figure) -> Figure:
        self.figures.append(fig)
        return fig

    def get(self, name: str) -> Figure | None:
        return next((f for f in self.figures if f.name == name), None)

    def compare(self, name: str, baseline: str) -> float | None:
        """Set the ratio of figure ``name`` against figure ``baseline`` (> 1 = ``name`` is better)."""
        fig, base = self.get(name), self.get(baseline)
        if fig is None or base is None or not fig.raw or not base.raw or fig.median == 0 or base.median == 0:
            return None
        fig.baseline = baseline
        fig.ratio = fig.median / base.median if fig.higher_is_better else base.median / fig.median
        return fig.ratio

    def to_dict(self) -> dict[str, Any]:
        return {
            "figures": [f.to_dict() for f in self.figures],
            "derived": self.derived,
            "notes": self.notes,
            "seconds": self.seconds,
            "error": self.error,
            "skipped": self.skipped,
        }


def measure(
    fn: Callable[[], Any], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None
) -> list[float]:
    """Seconds per call of ``fn`` for ``repeats`` calls after ``warmup`` untimed ones.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock read so asynchronous device work
    is inside the interval it belongs to.
    """
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        out.append(time.perf_counter() - t0)
    return out


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, not the host's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def gpu_name() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a broken CUDA install must not stop a CPU run
        return None
    return None


def machine_name(device: str) -> str:
    """``<host>-<N>cpu`` or ``<host>-<gpu-name>``: names the result file, so runs on different
    machines never overwrite one another."""
    host = socket.gethostname().split(".")[0] or "host"
    tag = f"{cpu_count()}cpu"
    if device.startswith("cuda"):
        tag = gpu_name() or "cuda"
    return re.sub(r"[^A-Za-z0-9]+", "-", f"{host}-{tag}").strip("-").lower()


def environment(device: str) -> dict[str, Any]:
    import numpy
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": numpy.__version__,
        "device": device,
        "gpu": gpu_name() if device.startswith("cuda") else None,
    }
    for mod in ("ray", "timm", "torchvision", "mlflow"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a version string is informative only
            env[mod] = None
    return env


def results_path(
    device: str,
    out_dir: Path | None = None,
    date: _dt.date | None = None,
    sections: list[str] | tuple[str, ...] = SECTIONS,
) -> Path:
    """``<date>-<machine>.json`` for a full run; a run of some sections only (``--only``) gets
    ``<date>-<machine>-only-<sections>.json``, so it never replaces the day's full results."""
    date = date or _dt.date.today()
    name = f"{date.isoformat()}-{machine_name(device)}"
    if set(sections) != set(SECTIONS):
        name += "-only-" + "+".join(s for s in SECTIONS if s in sections)
    return Path(out_dir or RESULTS_DIR) / f"{name}.json"


def write_results(path: Path, payload: dict[str, Any]) -> None:
    """Atomic write (temp file + ``os.replace``) so an interrupted run never leaves half a JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=_json_default, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None or x != x:  # None or NaN
        return "-"
    if unit == "s" and abs(x) < 1.0:
        return f"{x * 1e3:.2f} ms"
    if unit == "MiB" and abs(x) < 1.0:
        return f"{x * 1024:.0f} KiB"
    a = abs(x)
    text = f"{x:.0f}" if a >= 1000 else f"{x:.1f}" if a >= 10 else f"{x:.3g}"
    return f"{text} {unit}".strip() if unit != "s" else f"{text} s"


def markdown_table(sections: dict[str, SectionResult]) -> str:
    """One table of every figure: median, min, max and the ratio against its plain alternative."""
    lines = [
        "| section | figure | median | min | max | ratio vs plain (>1 = bamray better) |",
        "|---|---|---|---|---|---|",
    ]
    for name, sec in sections.items():
        if sec.error or sec.skipped:
            lines.append(
                f"| {name} | {'ERROR' if sec.error else 'skipped'}: "
                f"{(sec.error or sec.skipped or '').splitlines()[-1][:150]} | | | | |"
            )
            continue
        for f in sec.figures:
            ratio = f"{f.ratio:.2f}x vs {f.baseline}" if f.ratio is not None else ""
            label = f.name + (f" ({f.unit})" if f.unit not in ("s", "MiB") else "")
            lines.append(
                f"| {name} | {label} | {_fmt(f.median, f.unit)} | {_fmt(f.min, f.unit)} | "
                f"{_fmt(f.max, f.unit)} | {ratio} |"
            )
    derived = [
        (n, k, v)
        for n, s in sections.items()
        for k, v in s.derived.items()
        if not isinstance(v, (dict, list))
    ]
    if derived:
        lines += ["", "| section | derived figure | value |", "|---|---|---|"]
        for n, k, v in derived:
            lines.append(f"| {n} | {k} | {v:.3g} |" if isinstance(v, float) else f"| {n} | {k} | {v} |")
    notes = [(n, t) for n, s in sections.items() for t in s.notes]
    if notes:
        lines += [""] + [f"- **{n}**: {t}" for n, t in notes]
    return "\n".join(lines)


def launch(
    cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> tuple[float, list[tuple[float, str]], int]:
    """Run ``cmd`` (stdout + stderr merged); returns ``(unix launch time, [(unix arrival time, line)], exit
    code)``. Lines are time-stamped as they arrive by a reader thread; past ``timeout`` the process is
    killed (exit code then negative)."""
    import subprocess
    import threading

    lines: list[tuple[float, str]] = []
    t0 = time.time()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    reader.join(timeout=10)
    return t0, lines, rc


def output_tail(lines: list[tuple[float, str]], n: int = 40) -> str:
    return "\n".join(line for _, line in lines[-n:])
