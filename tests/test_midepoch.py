"""Checkpoints inside an epoch (orchestrator/training/midepoch.py), without Ray: when the policy fires,
termination notices read from files and from real HTTP servers on 127.0.0.1, the per-rank sample lists,
and an epoch loop that continues a partial epoch's counts."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import numpy as np
import pytest
import torch

from orchestrator.config import load_config
from orchestrator.training import midepoch
from trainers.loop import EpochStats, train_one_epoch
from trainers.options import ConfigError


# ------------------------------------------------------------------------------------------------- notices
class _Metadata(http.server.BaseHTTPRequestHandler):
    """A metadata endpoint: answers ``status`` / ``body`` and records the headers it was sent."""

    status, body, seen_headers = 404, b"", []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).seen_headers.append(dict(self.headers))
        self.send_response(type(self).status)
        self.end_headers()
        self.wfile.write(type(self).body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def metadata():
    handler = type("Handler", (_Metadata,), {"seen_headers": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}/instance/preempted"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (404, b"", False),  # EC2 before a notice
        (200, b'{"action": "terminate", "time": "2026-12-01T08:22:00Z"}', True),  # EC2 with one
        (200, b"FALSE", False),  # GCP before preemption
        (200, b"TRUE", True),  # GCP preempted
        (200, b"", False),
        (500, b"TRUE", False),
    ],
)
def test_http_notice_is_read_like_the_clouds_metadata(metadata, status, body, expected):
    handler, url = metadata
    handler.status, handler.body = status, body
    assert midepoch.notice_present(url) is expected
    assert handler.seen_headers[-1].get("Metadata-Flavor") == "Google"  # GCP refuses requests without it


def test_unreachable_notice_source_is_no_notice():
    with socket.socket() as s:  # a closed port on loopback
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    assert midepoch.notice_present(f"http://127.0.0.1:{port}/x", timeout_s=0.5) is False
    assert time.monotonic() - t0 < 2.0


def test_file_notice_and_watch_sees_one_that_arrives_later(tmp_path):
    flag = tmp_path / "terminating"
    assert midepoch.notice_present(str(flag)) is False
    watch = midepoch.NoticeWatch(str(flag), poll_s=0.02)
    assert not watch.pending()
    flag.write_text("node is going\n")
    deadline = time.monotonic() + 5
    while not watch.pending() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert watch.pending()
    watch.take()
    assert not watch.pending()  # acted on once per worker, although the file stays


def test_watch_sees_a_notice_present_at_start_before_any_step(tmp_path):
    calls = []

    def probe(source: str) -> bool:
        calls.append(source)
        return True

    watch = midepoch.NoticeWatch("/any", poll_s=60, probe=probe)
    assert watch.pending() and calls == ["/any"]  # probed in the constructor, not by a later poll


def test_notice_setting_is_checked_before_anything_runs():
    for ok in ("aws", "gcp", "http://127.0.0.1:9/x", "/var/run/terminating"):
        assert load_config("bam_fmnist", [f"train.preemption_notice={ok}"]).train.preemption_notice == ok
    assert load_config("bam_fmnist", []).train.preemption_notice == ""  # off by default
    with pytest.raises(ConfigError) as err:
        load_config("bam_fmnist", ["train.preemption_notice=spot"])
    assert err.value.field == "train.preemption_notice" and "aws, gcp" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config("bam_fmnist", ["train.checkpoint_every_steps=-1"])
    assert err.value.field == "train.checkpoint_every_steps"


# -------------------------------------------------------------------------------------------------- policy
def test_step_rule_skips_the_epochs_last_step():
    policy = midepoch.MidEpochPolicy(every_steps=3)
    due = [s for s in range(1, 13) if policy.due(s, last_of_epoch=s % 4 == 0)]
    assert due == [3, 6, 9]  # 12 is the end of epoch 3: its own report checkpoints it
    assert not midepoch.MidEpochPolicy().enabled and midepoch.MidEpochPolicy().due(5, False) is None


def test_minute_rule_is_rank_zeros_clock_shared_through_agree(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(midepoch.time, "monotonic", lambda: now[0])
    peers: list[list[float]] = []

    def agree(flags: list[float]) -> list[float]:  # what the all-reduce MAX gives with one other rank
        peers.append(flags)
        return [max(f, 0.0) for f in flags]

    rank0 = midepoch.MidEpochPolicy(every_minutes=2, rank=0, agree=agree)
    rank1 = midepoch.MidEpochPolicy(every_minutes=2, rank=1, agree=lambda f: [1.0, 0.0])  # rank 0 said "time"
    now[0] += 119
    assert rank0.due(10, False) is None
    now[0] += 1
    assert rank0.due(11, False) == "every 2 min"
    assert rank1.due(11, False) == "every 2 min"  # its own clock says nothing, the agreement does
    rank0.checkpointed()
    assert rank0.due(12, False) is None
    assert peers == [[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]


def test_notice_on_another_rank_checkpoints_this_one_and_at_epoch_end_defers(tmp_path):
    watch = midepoch.NoticeWatch(str(tmp_path / "none"), poll_s=60)
    policy = midepoch.MidEpochPolicy(notice=watch, rank=1, agree=lambda f: [0.0, 1.0])
    assert policy.due(7, last_of_epoch=False) == midepoch.NOTICE_REASON
    policy = midepoch.MidEpochPolicy(notice=watch, rank=1, agree=lambda f: [0.0, 1.0])
    assert policy.due(8, last_of_epoch=True) is None and policy.epoch_end_due  # the epoch report takes it
    policy.checkpointed()
    assert not policy.epoch_end_due


# --------------------------------------------------------------------------------------------- sample lists
def test_sample_lists_per_rank_round_trip_without_pickle(tmp_path):
    midepoch.save_samples(tmp_path, 0, [np.array([5, 1]), np.array([9])])
    midepoch.save_samples(tmp_path, 1, [np.array([2, 7])])
    midepoch.save_samples(tmp_path, 2, [])
    assert midepoch.load_samples(tmp_path, 0).tolist() == [5, 1, 9]
    assert sorted(midepoch.load_samples(tmp_path).tolist()) == [1, 2, 5, 7, 9]
    assert midepoch.load_samples(tmp_path / "nowhere").size == 0
    assert np.load(tmp_path / midepoch.samples_file(1), allow_pickle=False).dtype == np.int64


# ------------------------------------------------------------------------------------------- the epoch loop
class _Engine:
    """The smallest engine ``train_one_epoch`` drives: one SGD step on a scalar, loss = step number."""

    def __init__(self) -> None:
        self.device, self.step = torch.device("cpu"), 0
        self.method = type("M", (), {"crop_usage": None})()

    def train_step(self, crops, loss_hook=None) -> dict[str, float]:
        self.step += 1
        return {"loss": float(self.step)}


def test_epoch_loop_continues_a_partial_epochs_counts(monkeypatch):
    import trainers.loop as loop

    monkeypatch.setattr(loop, "crops_from_batch", lambda batch, *a, **k: batch)
    engine, seen = _Engine(), []
    engine.step = 2  # two steps were done before the checkpoint
    resumed = EpochStats(steps=2, loss_sum=3.0, seconds=10.0, first_batch_s=0.5)
    out = train_one_epoch(
        engine,
        [{"x": 0}, {"x": 1}],
        type("D", (), {"mean": [0.5], "std": [0.5]})(),
        epoch=3,
        steps_per_epoch=4,
        global_batch=8,
        on_step=lambda logs: seen.append((logs["epoch"], out_seconds(resumed))),
        stats=resumed,
    )
    assert out is resumed and out.steps == 4 and out.loss_sum == 3.0 + 3.0 + 4.0
    assert out.mean_loss == pytest.approx(2.5)  # (1 + 2 + 3 + 4) / 4: the whole epoch's mean
    assert [e for e, _ in seen] == [3.75, 4.0]  # fractional epochs continue from 2/4
    assert all(s >= 10.0 for _, s in seen) and out.seconds >= 10.0 and out.first_batch_s == 0.5


def out_seconds(stats: EpochStats) -> float:
    return stats.seconds
