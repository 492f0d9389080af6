"""Checkpoints inside an epoch: every N steps, every N minutes, and when the cloud announces that a node is
about to go (a spot / preemptible termination notice), plus what makes resuming inside an epoch exact.

Per-epoch checkpoints lose up to an epoch when a worker or node dies, hours on a large data set. These
checkpoints lose at most the steps since the last one. Resuming stays exact because each sample's views
are seeded by ``(seed, epoch, index)`` (:mod:`data.augment`): a checkpoint taken inside an epoch stores,
per rank, the indices of the samples trained on so far in that epoch (``epoch_samples_rank{r}.npy``);
the resumed epoch's stream leaves exactly those out (the epoch clock carries them to the map tasks,
:class:`data.run_actors.EpochClock`), so no sample is seen twice in the epoch and none is lost beyond what
an uninterrupted epoch drops at its end. With ``N`` samples split equally over ``W`` workers with batch
``B``, the stream left after ``s`` steps yields ``floor((N - s*W*B) / W / B) = steps_per_epoch - s``
batches per worker, so the resumed epoch ends at the same step as an uninterrupted one.

Termination notices (``train.preemption_notice``) are polled in a thread of every worker: ``aws`` (the
EC2 instance metadata ``spot/instance-action``, 404 until a notice), ``gcp`` (the metadata server's
``instance/preempted``, ``TRUE`` once preempted), any ``http(s)://`` URL read the same way (200 with a body
other than ``FALSE`` = notice), or a file path (the notice is the file existing, for a node agent or a
Kubernetes preStop hook to touch). A notice on any rank makes every rank checkpoint after the current
step; AWS gives two minutes, GCP 30 seconds, so the checkpoint must not wait for the epoch's end.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

from orchestrator.config import NOTICE_URLS
from trainers.fileio import atomic_write

_AWS_TOKEN_URL = "http://169.254.169.254/latest/api/token"
SAMPLES_GLOB = "epoch_samples_rank*.npy"
NOTICE_REASON = "termination notice"


def samples_file(rank: int) -> str:
    return f"epoch_samples_rank{rank}.npy"


def save_samples(directory: str | Path, rank: int, indices: list[np.ndarray]) -> Path:
    """This rank's sample indices of the current epoch, as a plain ``.npy`` (loaded without pickle)."""
    values = np.concatenate(indices).astype(np.int64) if indices else np.zeros(0, np.int64)
    return atomic_write(Path(directory) / samples_file(rank), lambda tmp: _save_npy(tmp, values))


def _save_npy(path: str, values: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, values, allow_pickle=False)


def load_samples(directory: str | Path, rank: int | None = None) -> np.ndarray:
    """One rank's sample indices of a checkpoint (``rank``), or every rank's together (``None``)."""
    files = (
        [Path(directory) / samples_file(rank)]
        if rank is not None
        else sorted(Path(directory).glob(SAMPLES_GLOB))
    )
    parts = [np.load(f, allow_pickle=False) for f in files if f.exists()]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


# ------------------------------------------------------------------------------------ termination notices
def notice_url(source: str) -> str:
    """The URL or file path a ``train.preemption_notice`` value names (``aws``/``gcp`` are presets)."""
    return NOTICE_URLS.get(source, source)


def notice_present(source: str, timeout_s: float = 1.0) -> bool:
    """Whether the termination notice ``source`` announces one now. Unreachable = no notice."""
    target = notice_url(source)
    if not target.startswith(("http://", "https://")):
        return Path(target).exists()
    headers = {"Metadata-Flavor": "Google"}  # GCP's metadata server requires it; others ignore it
    if target.startswith("http://169.254.169.254/"):  # EC2's IMDSv2 wants a session token
        try:
            req = urllib.request.Request(
                _AWS_TOKEN_URL, method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}
            )
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                headers["X-aws-ec2-metadata-token"] = r.read().decode()
        except OSError:
            pass  # IMDSv1, or not on EC2
    try:
        with urllib.request.urlopen(urllib.request.Request(target, headers=headers), timeout=timeout_s) as r:
            body = r.read(4096).decode(errors="replace").strip()
            return r.status == 200 and body.upper() not in ("", "FALSE")
    except OSError:  # 404 (no notice on EC2), refused, timed out
        return False


class NoticeWatch:
    """Polls a termination-notice source every ``poll_s`` in a daemon thread; the first probe runs in the
    constructor, so a notice already there is seen before the first step."""

    def __init__(self, source: str, poll_s: float = 5.0, probe: Callable[[str], bool] = notice_present):
        self.source, self._probe = source, probe
        self._seen, self._taken = threading.Event(), False
        if probe(source):
            self._seen.set()
        else:
            threading.Thread(target=self._poll, args=(poll_s,), daemon=True, name="bamray-notice").start()

    def _poll(self, poll_s: float) -> None:
        while not self._seen.wait(poll_s):
            if self._probe(self.source):
                self._seen.set()

    def pending(self) -> bool:
        """A notice arrived and has not been acted on yet (:meth:`take`)."""
        return self._seen.is_set() and not self._taken

    def take(self) -> None:
        self._taken = True


# ------------------------------------------------------------------------------------------------ policy
@dataclasses.dataclass
class MidEpochPolicy:
    """When a worker checkpoints inside an epoch. Every rank must decide alike at every step (a report is
    a barrier): the step rule is the same everywhere; the minute rule is rank 0's clock and a notice may
    reach one rank only, so with either of them the ranks agree through ``agree`` (an all-reduce MAX of
    the flags, one tiny collective per step), which the worker supplies."""

    every_steps: int = 0
    every_minutes: float = 0.0
    notice: NoticeWatch | None = None
    rank: int = 0
    agree: Callable[[list[float]], list[float]] | None = None
    last_s: float = dataclasses.field(default_factory=lambda: time.monotonic())
    #: the ranks agreed at an epoch's last step that a notice asks for a checkpoint: the epoch report takes it
    epoch_end_due: bool = False

    @property
    def enabled(self) -> bool:
        return self.every_steps > 0 or self.every_minutes > 0 or self.notice is not None

    def due(self, step: int, last_of_epoch: bool) -> str | None:
        """Why to checkpoint after global ``step`` (None: not now). Not at an epoch's last step: the
        epoch's own report follows at once, and takes the checkpoint a pending notice asks for."""
        if not self.enabled:
            return None
        timed = (
            self.rank == 0
            and self.every_minutes > 0
            and time.monotonic() - self.last_s >= self.every_minutes * 60
        )
        noticed = self.notice is not None and self.notice.pending()
        if self.agree is not None and (self.every_minutes > 0 or self.notice is not None):
            timed_f, noticed_f = self.agree([float(timed), float(noticed)])
            timed, noticed = timed_f > 0, noticed_f > 0
        if last_of_epoch:
            self.epoch_end_due = noticed
            return None
        if noticed:
            return NOTICE_REASON
        if self.every_steps > 0 and step % self.every_steps == 0:
            return f"every {self.every_steps} steps"
        if timed:
            return f"every {self.every_minutes:g} min"
        return None

    def checkpointed(self) -> None:
        """A checkpoint (mid-epoch or the epoch's own) was written: restart the clock, consume a notice."""
        self.last_s, self.epoch_end_due = time.monotonic(), False
        if self.notice is not None and self.notice.pending():
            self.notice.take()
