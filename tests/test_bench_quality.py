"""The quality benchmark's quick mode, end to end: a real `bamray train` under a time budget (Ray Train
with 2 workers, Ray Data, MLflow), its curve, the linear probe, and the raw-pixel and random-init rows.

Not a quality assertion (a few seconds of training on 2k images): it checks that the figures are what
they claim to be. The raw-pixel row must equal a k-NN computed here from the original IDX files, the
run's own online raw-pixel figure must agree with it (same bank), the curve must follow the training
clock, and the budget must hold.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # bench/ is a dev tool, not part of the installed package
    sys.path.insert(0, str(REPO))


def _idx(src: Path, prefix: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    with gzip.open(src / f"{prefix}-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(16 + n * 784), np.uint8, offset=16).reshape(n, 1, 28, 28).copy()
    with gzip.open(src / f"{prefix}-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(8 + n), np.uint8, offset=8).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def test_quick_quality_benchmark(tmp_path, fmnist_src):
    from bench.quality import QUICK
    from trainers.evaluation.knn import raw_pixel_baseline

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", BAMRAY_FMNIST_SRC=str(fmnist_src))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.quality",
            "--quick",
            "--out",
            str(tmp_path / "results"),
            "--tracking-uri",
            uri,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (json_file,) = (tmp_path / "results").glob("*-quality-quick.json")
    (png_file,) = (tmp_path / "results").glob("*-quality-quick.png")
    assert png_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (row,) = json.loads(json_file.read_text())["rows"]
    assert row["method"] == "bam" and row["stem"] == "auto"

    # raw pixels: the same figure as a k-NN on the first images of the original IDX files
    xb, yb = _idx(fmnist_src, "train", QUICK["train_limit"])
    xq, yq = _idx(fmnist_src, "t10k", QUICK["val_limit"])
    assert row["raw_pixels_knn_top1"] == pytest.approx(raw_pixel_baseline(xb, yb, xq, yq), abs=1e-9)
    for key in (
        "knn_top1",
        "random_init_knn_top1",
        "linear_top1",
        "random_init_linear_top1",
        "raw_pixels_linear_top1",
    ):
        assert 10.0 < row[key] <= 100.0, key  # above chance on 10 classes

    # the curve: one k-NN per planned epoch, on the training clock, within the budget's plan
    curve = row["curve"]
    assert 1 <= len(curve) <= QUICK["max_epochs"] and [p["epoch"] for p in curve] == list(
        range(1, len(curve) + 1)
    )
    minutes = [p["minutes"] for p in curve]
    assert all(a < b for a, b in zip([0.0] + minutes, minutes))  # > 0 and rising
    assert row["knn_top1"] == curve[-1]["knn_top1"] and row["epochs"] == len(curve)
    # the plan keeps floor(budget / first epoch) epochs, so the total is near the budget or one epoch
    assert row["train_minutes"] <= max(QUICK["budget_min"], minutes[0]) * 1.5

    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    run = c.get_run(row["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.time_budget_min"] == str(
        QUICK["budget_min"]
    )
    # the run's online raw-pixel k-NN ran on the very same bank and queries
    (pixels,) = c.get_metric_history(row["run_id"], "eval/knn_pixels_top1")
    assert pixels.value == pytest.approx(row["raw_pixels_knn_top1"], abs=1e-9)
    assert [m.value for m in c.get_metric_history(row["run_id"], "eval/linear_top1")] == [row["linear_top1"]]
    assert [a.path for a in c.list_artifacts(row["run_id"], "quality")] == ["quality/knn_vs_minutes.png"]
    assert "| bam |" in proc.stdout and "raw pixels" in proc.stdout
