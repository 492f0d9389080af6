"""``bamray embed``, ``eval retrieval`` and ``eval copydetect`` on a real local Ray and a real MLflow store.

The run is an MLflow run holding an exported tiny ViT (as a training run logs its ``final`` backbone) over
the first 256 / 128 Fashion-MNIST images plus one corrupt test row. Every figure the Ray job produces is
compared with the single-process computation of the same rows (:mod:`orchestrator.training.evaluate`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import FMNIST_DATA, TINY_N_TEST, TINY_N_TRAIN, append_corrupt_row

from orchestrator import checkpointing as ckpt
from orchestrator import tracking
from orchestrator.config import load_config
from orchestrator.downstream.commands import (
    JobOptions,
    embed_command,
    retrieval_command,
)
from orchestrator.downstream.copydetect import copydetect_command
from orchestrator.downstream.embed import read_embeddings
from orchestrator.downstream.source import resolve_backbone
from orchestrator.training.evaluate import clean_features, raw_pixel_features
from trainers.build import build_method
from trainers.evaluation.retrieval import retrieval_metrics

pytestmark = pytest.mark.ray

CORRUPT_INDEX = TINY_N_TEST  # one undecodable PNG appended to the test split


@pytest.fixture(scope="module")
def shards(tiny_shards) -> Path:
    append_corrupt_row(tiny_shards, "test", CORRUPT_INDEX, label=2)
    return tiny_shards


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory):
    """``(backbone, config)``: an MLflow run whose ``final`` artifact is a ViT export (its weights moved off
    the seed-0 init, which the random-init row rebuilds)."""
    tmp = tmp_path_factory.mktemp("run")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = load_config(
        "bam_fmnist",
        [
            "model.backbone=vit_tiny_patch16_224",
            "model.patch_size=4",
            "model.backbone_kwargs={depth: 1}",
            "data.global_crop_size=16",
            "data.local_crop_size=8",
            "method.top_k_sink=0",
            f"data.path={shards}",
            "eval.knn_train_fraction=1.0",
            "eval.knn_eval_fraction=1.0",
            *FMNIST_DATA,
        ],
    )
    method = build_method(cfg, device="cpu", steps_per_epoch=1, batch_size=4)
    torch.manual_seed(5)
    for p in method.eval_backbone().parameters():  # the exported net: not the init the "random" row rebuilds
        p.data.add_(0.02 * torch.randn_like(p))
    export = ckpt.export_backbone(method, cfg, tmp / "export")
    c = tracking.client(uri)
    run_id = c.create_run(tracking.ensure_experiment(uri, "downstream")).info.run_id
    tracking.log_artifacts(uri, run_id, str(export), "final")
    return resolve_backbone(run_id, tmp / "dl", tracking_uri=uri), cfg


def test_embed_streams_every_row_through_two_actors_equal_to_one_process(ray_local, run, tmp_path):
    backbone, cfg = run
    out = str(tmp_path / "emb")
    options = JobOptions(actors=2, batch_size=32, cpus_per_actor=0.5)
    summary = embed_command(backbone, None, out, split="all", kind="backbone", options=options)
    assert summary["rows"] == TINY_N_TRAIN + TINY_N_TEST and summary["corrupt"] == 1
    assert len(summary["actors"]) == 2  # the pool spread the batches
    assert sum(a["rows"] for a in summary["actors"].values()) == summary["rows"]
    assert all(100 < a["peak_rss_mb"] < 8000 for a in summary["actors"].values())
    e = read_embeddings(out)
    assert set(e) == {"split", "index", "label", "embedding"}
    test = e["split"] == "test"
    assert CORRUPT_INDEX not in e["index"][test] and test.sum() == TINY_N_TEST
    model = backbone.load()
    feats, labels = clean_features(model, cfg.data, "test", "cpu")  # normalised, single process
    got = torch.nn.functional.normalize(torch.from_numpy(e["embedding"][test]), dim=1)
    torch.testing.assert_close(got, feats, rtol=1e-4, atol=1e-5)
    assert np.array_equal(e["label"][test], labels.numpy())
    metrics = tracking.client(backbone.tracking_uri).get_run(backbone.run_id).data.metrics
    assert metrics["embed_rows"] == summary["rows"]
    with pytest.raises(Exception, match="--out"):  # never appends to an earlier job's files
        embed_command(backbone, None, out, split="all", kind="backbone", options=options)


def test_retrieval_figures_equal_the_single_process_ones_and_are_logged(ray_local, run):
    backbone, cfg = run
    res = retrieval_command(backbone, queries=64, options=JobOptions(batch_size=64, cpus_per_actor=1.0))
    assert set(res) == {"backbone", "random", "pixels"}
    # 64 evenly spaced of the 129 test rows; the last is the corrupt one: skipped
    pick = np.linspace(0, TINY_N_TEST, 64).round().astype(np.int64)
    assert pick[-1] == CORRUPT_INDEX
    pick = pick[:-1]
    assert res["backbone"]["bank"] == TINY_N_TRAIN and res["backbone"]["queries"] == 63
    # the raw-pixel row by hand: the same test rows against the whole train split (row i is index i)
    bank, bank_y = raw_pixel_features(cfg.data, "train")
    q, qy = raw_pixel_features(cfg.data, "test")
    ref = retrieval_metrics(q[pick], qy[pick], bank, bank_y)
    for key in ("map", "recall@1", "recall@5", "recall@10"):
        assert res["pixels"][key] == pytest.approx(ref[key], abs=1e-4), key
    model = backbone.load()
    fb, fby = clean_features(model, cfg.data, "train", "cpu")
    fq, fqy = clean_features(model, cfg.data, "test", "cpu")
    learned = retrieval_metrics(fq[pick], fqy[pick], fb, fby)
    assert res["backbone"]["map"] == pytest.approx(learned["map"], abs=1e-3)
    assert res["backbone"]["map"] != pytest.approx(res["random"]["map"], abs=1e-6)
    metrics = tracking.client(backbone.tracking_uri).get_run(backbone.run_id).data.metrics
    assert metrics["retrieval_map"] == pytest.approx(res["backbone"]["map"])
    assert metrics["retrieval_recall_at_1_raw_pixels"] == pytest.approx(res["pixels"]["recall@1"])
    assert "retrieval_map_random_init" in metrics


def test_copy_detection_finds_originals_above_chance_and_logs(ray_local, run):
    backbone, _ = run
    res = copydetect_command(
        backbone, queries=24, distractors=60, options=JobOptions(batch_size=64, cpus_per_actor=1.0)
    )
    for figures in res.values():
        assert (
            figures["queries"] == 24 and figures["database"] == 84 and figures["queries_without_match"] == 0
        )
        assert 0.0 < figures["map"] <= 100.0
    chance = 100 * sum(1 / r for r in range(1, 85)) / 84  # AP of one relevant item at a random rank
    assert res["pixels"]["map"] > 2 * chance
    metrics = tracking.client(backbone.tracking_uri).get_run(backbone.run_id).data.metrics
    assert metrics["copydetect_map"] == pytest.approx(res["backbone"]["map"])
    assert metrics["copydetect_map_raw_pixels"] == pytest.approx(res["pixels"]["map"])


def test_finetune_runs_each_mode_on_two_train_workers_and_logs(ray_local, run):
    from orchestrator.downstream.finetune import finetune_command
    from trainers.evaluation.finetune import label_subset
    from trainers.options import ConfigError

    backbone, cfg = run
    with pytest.raises(ConfigError, match="--labels.*leaves class"):  # refused before any worker starts
        finetune_command(backbone, labels="0.1%")
    res = finetune_command(backbone, labels="10%", epochs=4, batch_size=16, lr=3e-3, workers=2)
    assert set(res) == {"finetune", "probe", "scratch"}

    labels = pq.read_table(Path(cfg.data.path) / "train", columns=["label"]).column("label").to_numpy()
    n = len(label_subset(labels, "10%"))
    for mode, r in res.items():
        assert r["labelled_images"] == n and r["test_images"] == TINY_N_TEST, mode  # corrupt row skipped
        assert r["steps"] == 4 * -(-n // (2 * 16)), mode  # every rank ran the same steps
        assert 0.0 <= r["top1"] <= r["top5"] <= 100.0, mode
        assert np.isfinite(r["train_loss"]), mode
    print({m: (round(r["top1"], 2), round(r["top5"], 2)) for m, r in res.items()})
    metrics = tracking.client(backbone.tracking_uri).get_run(backbone.run_id).data.metrics
    for mode in res:
        assert metrics[f"finetune_10pct_{mode}_top1"] == pytest.approx(res[mode]["top1"])
