"""A label-free sweep on a user's own unlabelled images, with real Ray Tune and MLflow: Tune optimises
RankMe, and the trial whose encoder collapses is stopped after two low evaluations, tagged
``stopped: collapse`` and counted on the parent run, while the healthy trial runs its whole budget.

The collapsing configuration: a weight decay so large that AdamW's decoupled decay (lr x wd = 1 per step
at lr 2e-3 x 32 / 256 and wd 4000) sets every decayed weight to 0 in one step, so every image maps to the
same vector (measured: std_norm 0.64 -> 0.0, RankMe 21 -> 1.0). It stands for any run whose features
die: the check reads the features, not the cause. No teacher, so the evaluated network is the student.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import write_unlabelled_tree

from orchestrator.config import load_config
from orchestrator.sweep import run_sweep
from orchestrator.sweep.collapse import TAG_STOP_REASON, TAG_STOPPED

EPOCHS, HEALTHY_WD, COLLAPSING_WD = 3, 0.04, 4000.0


@pytest.fixture(scope="module")
def own_images(tmp_path_factory, fmnist_src) -> Path:
    from data.sources import prepare_image_folder

    tmp = tmp_path_factory.mktemp("own")
    write_unlabelled_tree(tmp / "photos", fmnist_src, 200)
    prepare_image_folder(tmp / "photos", tmp / "shards", name="photos", labelled=False, val_fraction=0.2)
    return tmp / "shards"


@pytest.mark.slow
def test_label_free_sweep_stops_the_collapsed_trial_and_keeps_the_healthy_one(
    ray_local, own_images, tmp_path
):
    space = tmp_path / "wd.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "name": "wd",
                "params": {
                    "optim.weight_decay": {"type": "grid", "values": [HEALTHY_WD, COLLAPSING_WD]},
                    "optim.weight_decay_end": {"type": "grid", "values": [HEALTHY_WD]},
                },
            }
        )
    )
    cfg = load_config(
        "bam_fmnist",
        [
            f"data.path={own_images}",
            "optim.batch_size=32",
            f"optim.epochs={EPOCHS}",
            "optim.warmup_epochs=0",
            "train.workers=1",
            "train.cpus_per_worker=0.5",
            "data.map_cpus=0.5",
            "data.global_crop_size=16",
            "data.local_crop_size=8",
            "method.top_k_sink=0",
            "method.teacher=false",
            "method.proj_hidden_dim=64",
            "method.proj_out_dim=32",
            "model.backbone=vit_tiny_patch16_224",
            "model.patch_size=4",
            "model.backbone_kwargs={depth: 2}",
            "tracking.experiment=label-free",
        ],
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_sweep(
        cfg,
        str(space),
        trials=2,
        scheduler="fifo",
        search="grid",
        max_concurrent=2,
        storage_path=str(tmp_path / "ray"),
        name="label-free",
        tracking_uri=uri,
        metric="rankme",
        mode="max",
    )
    rows = {r["params"]["optim.weight_decay"]: r for r in out["trials"]}
    healthy, collapsed = rows[HEALTHY_WD], rows[COLLAPSING_WD]
    assert (healthy["status"], healthy["epochs"], healthy["stop_reason"]) == ("completed", EPOCHS, None)
    assert (collapsed["status"], collapsed["epochs"], collapsed["stop_reason"]) == (
        "stopped_early",
        2,
        "collapse",
    )
    assert collapsed["rankme"] == pytest.approx(1.0, abs=0.05) and healthy["rankme"] > 3.0
    assert out["best_trial_id"] == healthy["trial_id"] and out["best_metric"] == healthy["rankme"]

    from mlflow import MlflowClient

    c = MlflowClient(uri)
    bad, good = c.get_run(collapsed["mlflow_run_id"]), c.get_run(healthy["mlflow_run_id"])
    assert bad.data.tags[TAG_STOPPED] == "collapse" and TAG_STOPPED not in good.data.tags
    reason = re.fullmatch(
        r"collapse: std_norm (\S+) < 0.05 for 2 evaluations in a row \(epoch 2\)",
        bad.data.tags[TAG_STOP_REASON],
    )
    assert reason is not None and float(reason.group(1)) < 1e-4, bad.data.tags[TAG_STOP_REASON]
    steps = [m.step for m in c.get_metric_history(good.info.run_id, "rankme")]
    assert len(steps) == EPOCHS and "knn_top1" not in good.data.metrics  # no labels, no k-NN
    assert {"std_norm", "align", "uniform", "rankme_proj", "epoch_bam_target_entropy"} <= set(
        good.data.metrics
    )
    parent = c.get_run(out["parent_run_id"])
    assert parent.data.metrics["trials_stopped_collapse"] == 1 and parent.data.params["metric"] == "rankme"
    assert parent.data.metrics["best_rankme"] == pytest.approx(healthy["rankme"])
    assert "spearman_rankme_knn" not in parent.data.metrics  # nothing to correlate without labels
