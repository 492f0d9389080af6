"""Scratch directories that a killed process does not leave behind.

A worker writes each checkpoint into a temp directory and hands it to ``ray.train.report``, which copies it
to the run's storage. ``tempfile.TemporaryDirectory`` removes it on the way out, but a process that Ray kills
there never gets that far, and Ray kills every rank of a group when one fails, the others usually waiting
inside ``report`` for it: each such failure left a whole checkpoint (the model, its optimiser state) in the
node's ``/tmp``, with nothing that would ever remove it (found in ``/tmp`` after the suite's worker- and
node-loss tests). On a cluster of preemptible nodes that fills a disk a failure at a time.

So each directory has an owner file beside it (``<dir>.owner``, outside the directory, which is uploaded
whole), exclusively ``flock``-ed by the process using it. The kernel drops the lock when that process dies
however it dies, so the next :func:`scratch_dir` on the node removes every directory whose owner file it
can lock. No pids or ages are guessed: a directory in use, by any process on the node, stays.

The same for a single file: :func:`claim` names a path and owns it, e.g. the DDP rendezvous ``FileStore``
of :mod:`orchestrator.training.loopback_ddp`, which torch removes only when the group closes normally.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator

OWNER_SUFFIX = ".owner"


def _path_of(owner: str) -> str:
    return owner[: -len(OWNER_SUFFIX)]


def _remove(path: str) -> None:
    """``path`` (file or directory), then its owner file, which stays while ``path`` could not be removed:
    a later sweep tries again."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)
    if not os.path.lexists(path):
        with contextlib.suppress(OSError):
            os.unlink(path + OWNER_SUFFIX)


def sweep_abandoned(prefix: str, parent: str | None = None) -> list[str]:
    """Remove the directories ``<parent>/<prefix>*`` whose owner is gone (its owner file unlocked), with
    their owner files; return them. Others' directories in use are left alone."""
    parent = parent or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(prefix) and name.endswith(OWNER_SUFFIX)):
            continue
        owner = os.path.join(parent, name)
        try:
            fd = os.open(owner, os.O_RDWR)
        except OSError:  # removed meanwhile by another sweep
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its owner is alive
            os.close(fd)
            continue
        try:
            path = _path_of(owner)
            _remove(path)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def _owned(prefix: str, parent: str) -> tuple[int, str]:
    """A fresh owner file, locked by this process, that no sweep removed before the lock was taken."""
    while True:
        fd, owner = tempfile.mkstemp(prefix=prefix, suffix=OWNER_SUFFIX, dir=parent)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(owner).st_ino == os.fstat(fd).st_ino:
                return fd, owner
        except FileNotFoundError:  # a sweep locked it between its creation and our lock
            pass
        os.close(fd)


def claim(prefix: str, parent: str | None = None) -> tuple[int, str]:
    """``(lock fd, path)``: a new name ``<parent>/<prefix>XXXXXXXX`` (``parent``: the temp dir; nothing is
    created at ``path``) owned by this process until :func:`release`; if the process dies first, a later
    claim or :func:`scratch_dir` of the same prefix on this node removes whatever was made there, a file
    or a directory. Removes abandoned ones first."""
    parent = parent or tempfile.gettempdir()
    sweep_abandoned(prefix, parent)
    fd, owner = _owned(prefix, parent)
    return fd, _path_of(owner)


def release(fd: int, path: str) -> None:
    """Remove ``path`` (file or directory) and its owner file, and drop the claim."""
    try:
        _remove(path)
    finally:
        os.close(fd)


@contextlib.contextmanager
def scratch_dir(prefix: str, parent: str | None = None) -> Iterator[str]:
    """A new empty directory ``<parent>/<prefix>XXXXXXXX`` (``parent``: the temp dir), removed on exit, and
    by a later call on this node if this process is killed before that. Removes abandoned ones first."""
    fd, path = claim(prefix, parent)
    try:
        os.mkdir(path, 0o700)
        yield path
    finally:
        release(fd, path)
