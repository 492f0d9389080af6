"""Checkpoint scratch directories: removed on exit, kept while their process lives, removed by the next one
when their process was killed (as Ray kills every rank of a failed group, mid-``report``). The same for a
claimed file (the DDP rendezvous FileStore)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator.training.scratch import OWNER_SUFFIX, claim, release, scratch_dir, sweep_abandoned

REPO = Path(__file__).resolve().parents[1]
PREFIX = "bamray-test-scratch-"


def _holder(parent: Path) -> tuple[subprocess.Popen, Path]:
    """Another process inside a scratch dir of ``parent`` (with a file in it), until it is killed."""
    script = textwrap.dedent(f"""
        import sys, time
        from orchestrator.training.scratch import scratch_dir
        with scratch_dir({PREFIX!r}, {str(parent)!r}) as d:
            open(d + "/state.pt", "wb").write(b"x" * 4096)
            print(d, flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    line = proc.stdout.readline().strip()
    assert line, "the holder never entered its scratch dir"
    return proc, Path(line)


def test_a_scratch_dir_is_new_and_empty_and_gone_with_its_owner_file_on_exit(tmp_path):
    with scratch_dir(PREFIX, str(tmp_path)) as d:
        path = Path(d)
        assert path.is_dir() and not any(path.iterdir()) and path.name.startswith(PREFIX)
        assert path.parent == tmp_path and Path(d + OWNER_SUFFIX).is_file()
        (path / "state.pt").write_bytes(b"1")
    assert not path.exists() and not Path(d + OWNER_SUFFIX).exists()
    assert list(tmp_path.iterdir()) == []


def test_a_scratch_dir_is_removed_when_the_block_raises(tmp_path):
    with pytest.raises(RuntimeError), scratch_dir(PREFIX, str(tmp_path)) as d:
        raise RuntimeError("a failed save")
    assert not Path(d).exists() and list(tmp_path.iterdir()) == []


def test_a_killed_owners_dir_is_removed_by_the_next_one_and_a_live_owners_kept(tmp_path):
    live, live_dir = _holder(tmp_path)
    dead, dead_dir = _holder(tmp_path)
    try:
        dead.send_signal(signal.SIGKILL)  # no finally, no atexit: as Ray kills a worker
        dead.wait(timeout=30)
        assert (dead_dir / "state.pt").is_file()  # what used to stay in /tmp for good
        (tmp_path / f"{PREFIX}unowned").mkdir()  # no owner file: not ours to judge, left alone
        (tmp_path / "other.owner").write_text("")  # another prefix: left alone
        with scratch_dir(PREFIX, str(tmp_path)) as d:
            assert Path(d).is_dir()
            assert not dead_dir.exists() and not Path(str(dead_dir) + OWNER_SUFFIX).exists()
            assert (live_dir / "state.pt").is_file() and Path(str(live_dir) + OWNER_SUFFIX).is_file()
        assert (tmp_path / f"{PREFIX}unowned").is_dir() and (tmp_path / "other.owner").is_file()
        assert sweep_abandoned(PREFIX, str(tmp_path)) == []  # the live one stays on every sweep
    finally:
        live.kill()
        live.wait(timeout=30)
    assert sweep_abandoned(PREFIX, str(tmp_path)) == [str(live_dir)]
    assert not live_dir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{PREFIX}unowned", "other.owner"])


def test_the_worker_stages_its_checkpoints_in_scratch_dirs():
    """Both of the worker's checkpoint writes (inside and at the end of an epoch) go through
    :func:`scratch_dir`, never a plain temp dir that a killed worker leaves behind."""
    src = (REPO / "orchestrator" / "training" / "worker.py").read_text()
    assert src.count("scratch_dir(CHECKPOINT_SCRATCH)") == 2
    assert "TemporaryDirectory" not in src and "mkdtemp" not in src


FILE_HOLDER = """
import sys, time
from orchestrator.training import scratch
fd, path = scratch.claim(sys.argv[1], sys.argv[2])
open(path, "wb").write(b"store")  # what torch's FileStore writes there
print(path, flush=True)
time.sleep(600)
"""


def test_a_claimed_file_is_removed_on_release_and_after_its_owner_is_killed(tmp_path):
    """A claim names a path without creating it (torch creates the FileStore); a killed claimant's file is
    removed by the next claim, a released one at once, a live one's never."""
    fd, path = claim(PREFIX, str(tmp_path))
    assert not Path(path).exists() and Path(path + OWNER_SUFFIX).is_file()
    Path(path).write_bytes(b"store")
    release(fd, path)
    assert list(tmp_path.iterdir()) == []

    holders = [
        subprocess.Popen(
            [sys.executable, "-c", FILE_HOLDER, PREFIX, str(tmp_path)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for _ in range(2)
    ]
    (dead, dead_path), (live, live_path) = [(h, Path(h.stdout.readline().strip())) for h in holders]
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait(timeout=30)
        assert dead_path.read_bytes() == b"store"  # what used to stay in /tmp for good
        fd, path = claim(PREFIX, str(tmp_path))
        assert not dead_path.exists() and not Path(str(dead_path) + OWNER_SUFFIX).exists()
        assert live_path.read_bytes() == b"store"
        release(fd, path)
    finally:
        live.kill()
        live.wait(timeout=30)
    assert sweep_abandoned(PREFIX, str(tmp_path)) == [str(live_path)] and list(tmp_path.iterdir()) == []


def test_the_ddp_store_is_claimed_by_rank_0_and_released_at_shutdown():
    """Source check of the wiring (the runs' leftovers are asserted in tests/test_train_ray.py)."""
    src = (REPO / "orchestrator" / "training" / "loopback_ddp.py").read_text()
    assert "execute_single(0, _claim_store)" in src and "execute_single(0, _release_store, self.store)" in src
    assert "uuid" not in src and "tempfile" not in src
