"""Smoke test of the performance suite: its smallest mode runs and writes a valid results file.

Not a timing assertion (figures on a shared 2-core box are noise at this size): it checks that the
suite runs end to end on real Ray and real Fashion-MNIST shards, that the JSON holds every raw repeat
with consistent summaries, that BAM's fused loss was checked equal to the loop form, and that the
markdown table is printed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # bench/ is a dev tool, not part of the installed bamray package
    sys.path.insert(0, str(REPO))


def test_cli_rejects_unknown_section_and_device():
    from bench.runner import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--only", "loss,warp"])
    with pytest.raises(SystemExit):
        parse_args(["--device", "tpu"])
    args = parse_args(["--only", "sweep", "--device", "cuda:1", "--quick"])
    assert args.only == ["sweep"] and args.device == "cuda:1" and args.quick


def test_results_path_keeps_partial_runs_apart(tmp_path):
    import datetime as dt

    from bench.common import SECTIONS, machine_name, results_path

    day = dt.date(2026, 1, 2)
    full = results_path("cpu", tmp_path, day)
    assert full.name == f"2026-01-02-{machine_name('cpu')}.json"
    assert results_path("cpu", tmp_path, day, sections=list(reversed(SECTIONS))) == full
    assert (
        results_path("cpu", tmp_path, day, sections=["step", "loss"]).name
        == f"2026-01-02-{machine_name('cpu')}-only-loss+step.json"
    )


def test_quick_mode_writes_valid_json(tmp_path, fmnist_src):
    out_dir = tmp_path / "results"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", BAMRAY_FMNIST_SRC=str(fmnist_src))
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "loss,data", "--out", str(out_dir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    files = list(out_dir.glob("*.json"))
    assert len(files) == 1, files
    name = files[0].name
    # <YYYY-MM-DD>-<host>-<N>cpu-only-<sections>.json: a partial run never replaces the day's full results
    assert name[:10].count("-") == 2 and name.endswith("cpu-only-loss+data.json"), name
    doc = json.loads(files[0].read_text())
    assert doc["quick"] is True and doc["device"] == "cpu" and doc["machine"].endswith("cpu")
    assert set(doc["sections"]) == {"loss", "data"}
    for sec_name, sec in doc["sections"].items():
        assert sec["error"] is None and sec["skipped"] is None, (sec_name, sec["error"] or sec["skipped"])
        assert sec["figures"], sec_name
        for fig in sec["figures"]:
            raw = fig["raw"]
            assert raw and all(math.isfinite(v) and v >= 0 for v in raw), fig["name"]
            assert fig["min"] == min(raw) and fig["max"] == max(raw), fig["name"]
            assert fig["min"] <= fig["median"] <= fig["max"], fig["name"]
            if fig["baseline"] is not None:
                assert fig["ratio"] > 0 and any(f["name"] == fig["baseline"] for f in sec["figures"])

    loss = doc["sections"]["loss"]
    names = {f["name"] for f in loss["figures"]}
    for kind in ("bam", "bam_loop", "dino", "simclr"):
        assert any(n.startswith(f"{kind} fwd+bwd") for n in names), kind
    # The fused BAM reduction was asserted equal to the loop form before being timed.
    assert loss["derived"]["bam_fused_vs_loop_max_grad_rel_diff"] <= 1e-5
    assert loss["derived"]["bam_fused_vs_loop_max_loss_abs_diff"] <= 1e-5
    # Peak memory grows with the crops (8 views vs 2 at the same batch): the measurement sees torch.
    mem = {f["name"]: f["median"] for f in loss["figures"] if "peak mem" in f["name"]}
    assert mem["bam peak mem 2g+6l B=32"] > mem["bam peak mem 2g B=32"] > 0
    # at scale: the blocked loss was checked against the fp64 loss, then compared with the dense one
    check = loss["derived"]["bam_blocked vs bam 2g+6l B=64"]
    assert check["blocked_fp32_loss_rel_err"] <= 1e-6 and check["blocked_fp32_grad_rel_err"] <= 1e-5
    blocked = next(f for f in loss["figures"] if f["name"] == "bam_blocked peak mem at scale B=64")
    assert blocked["baseline"] == "bam peak mem at scale B=64" and blocked["ratio"] > 0

    data = doc["sections"]["data"]
    assert any(f["name"].startswith("Ray Data multi-crop") and f["baseline"] for f in data["figures"])
    # the stream kept across epochs, against the per-epoch DataLoader and (derived) the persistent one
    one = next(f for f in data["figures"] if f["name"].startswith("Ray Data one execution multi-crop"))
    assert one["baseline"].startswith("torch DataLoader multi-crop") and one["ratio"] > 0
    assert any(f["name"].startswith("torch DataLoader persistent workers") for f in data["figures"])
    assert data["derived"]["one_execution_vs_persistent_dataloader_28px"] > 0
    assert data["derived"]["one_execution_start_s_28px"] > 0

    assert "| section | figure | median | min | max |" in proc.stdout
    assert str(files[0]) in proc.stdout
    # where the Ray pass leaves CPUs idle: shares of the timed passes with 0, 1, 2 ... tasks running,
    # from Ray's task timeline; they cover the whole window and at least one task ran at some point
    share = data["derived"]["ray_tasks_running_share_28px"]
    assert abs(sum(share.values()) - 1.0) < 0.01 and all(int(k) >= 0 for k in share), share
    assert sum(v for k, v in share.items() if int(k) > 0) > 0, share
