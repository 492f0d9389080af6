"""Atomic file writes and an inter-process file lock, shared by data shards (``data/``), checkpoints and
the tracking store (``orchestrator/``).

They live here, at the bottom of the dependency graph, so every layer uses the one implementation."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def user_cache_dir() -> Path:
    """bamray's per-user cache: ``$BAMRAY_CACHE_DIR``, else ``$XDG_CACHE_HOME/bamray``, else
    ``~/.cache/bamray`` (timm's model names, the kept local Ray's address)."""
    root = os.environ.get("BAMRAY_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "bamray"
    )
    return Path(root)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then ``os.replace`` it onto ``path`` (same directory, so same filesystem):
    a reader sees the old file or the new one, never half of one, and a failed write leaves no temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (created with its folder): for one-time set-up that two
    processes may attempt at once (first data preparation, a fresh MLflow store). Released when the
    holder exits or dies, because ``fcntl.flock`` belongs to the open file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
