"""Atomic file writes, shared by data shards (``data/``) and checkpoints (``orchestrator/``).

It lives here, at the bottom of the dependency graph, so both layers can use the one implementation."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


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
