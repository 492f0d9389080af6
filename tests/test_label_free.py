"""Unlabelled data end to end without Ray: data sets that carry their own channels and normalisation,
the label-free signals of every method on an unlabelled folder, the metric a sweep may optimise, the
collapse stop's rule, and the RankMe-vs-k-NN summary of a sweep (hand-computed values)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from conftest import FMNIST_DIR, write_unlabelled_tree

from data.config import DataConfig, with_dataset_stats
from orchestrator.config import load_config
from orchestrator.sweep import report
from orchestrator.sweep.collapse import CollapseWatch, check_metric, decision_epochs, logged_metrics
from orchestrator.training.data_prep import knn_source, prepare_data
from trainers.options import ConfigError

METHODS = ("bam", "byol", "dino", "simclr", "mae")
SMALL = [
    "optim.batch_size=8",
    "train.workers=1",
    "data.global_crop_size=16",
    "data.local_crop_size=8",
    "data.local_crops=2",
    "eval.signal_samples=24",
]
RESNET_KW = ["model.backbone_kwargs={layers: [1, 1, 1, 1], channels: [8, 8, 16, 16]}"]
SMALL_MODEL = {  # the shipped recipes' models, smaller (MAE keeps its ViT, with patch 4 at 16 px)
    "mae": ["model.backbone_kwargs={depth: 1, global_pool: avg, final_norm: false}", "model.patch_size=4"],
    "bam": [*RESNET_KW, "method.proj_hidden_dim=32", "method.top_k_sink=0"],
    "dino": [*RESNET_KW, "method.hidden_dim=32", "method.out_dim=64"],
}


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory, fmnist_src) -> Path:
    """A nested, mixed-format unlabelled folder of 96 images, prepared as `data prepare --unlabelled` does."""
    from data.sources import prepare_image_folder

    tmp = tmp_path_factory.mktemp("own")
    assert write_unlabelled_tree(tmp / "photos", fmnist_src, 96) == 96
    meta = prepare_image_folder(tmp / "photos", tmp / "shards", name="photos", labelled=False)
    assert meta["labelled"] is False and sum(meta["counts"].values()) == 96
    return tmp / "shards"


def _cfg(method: str, path: Path, *extra: str):
    model = SMALL_MODEL.get(method, [*RESNET_KW, "method.proj_hidden_dim=32"])
    return load_config(f"{method}_fmnist", [*SMALL, *model, f"data.path={path}", *extra])


# ------------------------------------------------------------------------------ the data set's own stats
def test_channels_and_normalisation_come_from_the_meta_unless_set():
    meta = {"channels": 3, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    got = with_dataset_stats(DataConfig(path="/x"), meta)
    assert (got.channels, got.mean, got.std) == (3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    own = with_dataset_stats(DataConfig(path="/x", mean=(0.1, 0.1, 0.1)), meta)  # explicit values win
    assert own.mean == (0.1, 0.1, 0.1) and own.std == (0.2, 0.25, 0.3)
    with pytest.raises(ConfigError) as err:
        with_dataset_stats(DataConfig(path="/x", channels=1), meta)
    assert err.value.field == "data.channels" and "3 channel(s)" in str(err.value)
    with pytest.raises(ConfigError) as err:
        with_dataset_stats(DataConfig(path="/x", mean=(0.5,)), meta)
    assert err.value.field == "data.mean"


def test_a_config_names_a_wrong_normalisation_before_any_data_is_read():
    with pytest.raises(ConfigError) as err:
        load_config("bam_fmnist", ["data.channels=3", "data.mean=[0.5]"])
    assert err.value.field == "data.mean" and "need 3" in str(err.value)
    assert (
        load_config("bam_fmnist", ["data.mean=[0.5, 0.5, 0.5]", "data.std=[0.2, 0.2, 0.2]"]).data.channels
        == 0
    )


def test_old_shards_without_stats_get_them_measured(tiny_shards, capsys):
    """Shards prepared before `data prepare` measured mean / std: measured when a run first reads them."""
    from data.shards import image_stats

    cfg, meta = prepare_data(load_config("bam_fmnist", [f"data.path={tiny_shards}"]))
    mean, std, n = image_stats(str(tiny_shards), 1)
    assert (
        cfg.data.channels == 1
        and cfg.data.mean == pytest.approx(tuple(mean))
        and n == meta["counts"]["train"]
    )
    assert "1 channel(s), mean (" in capsys.readouterr().out
    old = {k: v for k, v in meta.items() if k not in ("mean", "std")}
    assert with_dataset_stats(DataConfig(path=str(tiny_shards)), old).std == pytest.approx(tuple(std))


def test_eval_dataset_must_be_a_prepared_labelled_set(unlabelled, tiny_shards):
    with pytest.raises(ConfigError) as err:
        prepare_data(load_config("bam_fmnist", [f"data.path={unlabelled}", f"eval.path={unlabelled}"]))
    assert err.value.field == "eval.path" and "no labels" in str(err.value)
    with pytest.raises(ConfigError) as err:
        prepare_data(load_config("bam_fmnist", [f"data.path={unlabelled}", "eval.dataset=nowhere"]))
    assert err.value.field == "eval.dataset" and "no prepared data set" in str(err.value)
    cfg, meta = prepare_data(load_config("bam_fmnist", [f"data.path={unlabelled}"]))
    assert knn_source(cfg, meta) is None  # unlabelled, no eval set: the k-NN is skipped
    cfg, meta = prepare_data(
        load_config("bam_fmnist", [f"data.path={unlabelled}", f"eval.path={tiny_shards}"])
    )
    data, eval_meta = knn_source(cfg, meta)
    # the labelled bank, viewed and normalised as the training data
    assert data.path == str(Path(tiny_shards).resolve()) and eval_meta["num_classes"] == 10
    assert (data.mean, data.channels, data.train_limit) == (cfg.data.mean, 3, 0)
    from data.torch_dataset import CleanTorchDataset

    view = CleanTorchDataset(data, "test")[0]["image"]  # grayscale shards decoded for the RGB model
    assert view.shape[0] == 3 and bool((view[0] == view[2]).all())


# --------------------------------------------------------------------- every method on unlabelled data
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_unlabelled_images_and_gets_its_signals(method, unlabelled):
    """Two training steps on the unlabelled set, then the label-free signals of the evaluated network, as
    the worker computes them (one process here; test_train_ray checks the distributed figures)."""
    from torch.utils.data import DataLoader

    from data.torch_dataset import MultiCropTorchDataset, collate_batch
    from orchestrator.training.online_eval import SignalSample, label_free_signals
    from trainers.build import build_engine, build_method
    from trainers.loop import train_one_epoch

    cfg, meta = prepare_data(_cfg(method, unlabelled))
    assert cfg.data.channels == 3 and len(cfg.data.mean) == 3  # some files are RGB (with gray pixels)
    torch.manual_seed(0)
    model = build_method(cfg, device="cpu", steps_per_epoch=2, batch_size=8)
    engine = build_engine(cfg, model, device="cpu", steps_per_epoch=2, global_batch=8)
    ds = MultiCropTorchDataset(cfg.data, "train", seed=0)
    assert set(ds.labels.tolist()) == {-1}
    batches = DataLoader(ds, batch_size=8, collate_fn=collate_batch, drop_last=True)
    stats = train_one_epoch(
        engine, (b for b, _ in zip(batches, range(2))), cfg.data, epoch=0, steps_per_epoch=2, global_batch=8
    )
    assert stats.steps == 2 and math.isfinite(stats.mean_loss)
    sample = SignalSample(cfg, rank=0, world=1)
    out = label_free_signals(model, cfg, sample, torch.device("cpu"))
    assert len(sample.load()) == min(24, meta["counts"]["test"])
    kinds = ["", "_proj"] if method != "mae" else [""]
    names = ("rankme", "std", "std_norm") + (("align", "uniform") if cfg.data.global_crops > 1 else ())
    assert set(out) == {f"{s}{k}" for k in kinds for s in names}  # MAE: one view per image, no pairs
    assert set(out) <= set(logged_metrics(cfg, labelled=False))
    assert all(math.isfinite(v) for v in out.values()) and 1.0 <= out["rankme"] <= len(sample.load())
    assert 0.0 < out["std_norm"] and out.get("align", 0.0) >= 0.0 and out.get("uniform", 0.0) <= 0.0


# ----------------------------------------------------------------------------------- sweeps and collapse
def test_sweep_metrics_are_what_the_runs_log():
    bam, mae = load_config("bam_fmnist"), load_config("mae_fmnist")
    check_metric("rankme", "max", bam, labelled=False)
    check_metric("bam_target_entropy", "min", bam, labelled=True)
    check_metric("knn_top1", "max", bam, labelled=True)
    with pytest.raises(ConfigError) as err:
        check_metric("knn_top1", "max", bam, labelled=False)
    assert err.value.field == "--metric" and "eval.dataset" in str(err.value)
    with pytest.raises(ConfigError) as err:
        check_metric("rankme_proj", "max", mae, labelled=True)  # MAE has no projection head
    assert "rankme_proj" in str(err.value) and "'rankme'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        check_metric("rankme", "up", bam, labelled=True)
    assert err.value.field == "--mode"
    off = dataclasses.replace(bam, eval=dataclasses.replace(bam.eval, signal_samples=0))
    assert "rankme" not in logged_metrics(off, True) and "knn_top1" in logged_metrics(off, True)


def test_a_label_free_sweep_on_knn_is_refused_before_ray(unlabelled):
    from orchestrator.sweep import run_sweep

    cfg = load_config("bam_fmnist", [f"data.path={unlabelled}", "train.workers=1", "optim.batch_size=32"])
    with pytest.raises(ConfigError) as err:
        run_sweep(cfg, "bam_sinkhorn", trials=2)
    assert err.value.field == "--metric" and "no labels" in str(err.value)
    with pytest.raises(ConfigError) as err:
        run_sweep(cfg, "bam_sinkhorn", trials=2, metric="rankme", collapse_patience=0)
    assert err.value.field == "--collapse-patience"


def test_collapse_needs_the_signal_low_for_patience_evaluations_in_a_row():
    watch = CollapseWatch("std_norm", 0.05, 2)
    assert watch.see({"epoch": 1, "std_norm": 0.01}) is None  # one low evaluation is not a collapse
    assert watch.see({"epoch": 2, "loss": 1.0}) is None  # no evaluation this epoch: the streak stands
    assert watch.see({"epoch": 3, "std_norm": 0.2}) is None  # recovered: the streak starts again
    assert watch.see({"epoch": 4, "std_norm": 0.0}) is None
    reason = watch.see({"epoch": 5, "std_norm": 0.001})
    assert reason is not None and "std_norm 0.001 < 0.05 for 2 evaluations" in reason and "epoch 5" in reason
    assert CollapseWatch("std_norm", 0.0, 1).see({"std_norm": 0.0}) is None  # threshold 0: never


def test_workers_wait_for_the_verdict_only_where_the_watch_can_stop_the_trial():
    """The watch fires at the patience-th low report of its metric at the earliest (evaluation epochs for
    an evaluation metric, every epoch for the loss); the last epoch trains nothing after it, so it needs no
    wait; a metric the runs never log, or no watch: no waits at all."""
    watch = ("std_norm", 0.05, 2)
    every = load_config("bam_fmnist", ["optim.epochs=5", "eval.knn_freq=1"])
    assert decision_epochs(every, watch) == {2, 3, 4}
    assert decision_epochs(every, ("std_norm", 0.05, 1)) == {1, 2, 3, 4}
    assert decision_epochs(every, ("std_norm", 0.05, 5)) == set()  # only the last can fire
    every_2 = load_config("bam_fmnist", ["optim.epochs=7", "eval.knn_freq=2"])  # evaluated at 2, 4, 6, 7
    assert decision_epochs(every_2, watch) == {4, 6}
    assert decision_epochs(every, None) == set() and decision_epochs(every, ("std_norm", 0.0, 2)) == set()
    assert decision_epochs(every_2, ("loss", 0.05, 2)) == {2, 3, 4, 5, 6}  # reported every epoch
    no_signals = load_config("bam_fmnist", ["optim.epochs=5", "eval.signal_samples=0"])
    assert decision_epochs(no_signals, watch) == set()  # never logged: the watch cannot fire
    assert decision_epochs(no_signals, ("knn_top1", 0.05, 2)) == {2, 3, 4}


def test_an_epoch_reported_again_after_a_restart_does_not_count_twice():
    """A worker group restarted from epoch 1's checkpoint reports epoch 2 again: the streak is that of
    epochs 1-2, not three low reports."""
    watch = CollapseWatch("std_norm", 0.05, 3)
    assert watch.see({"epoch": 1, "std_norm": 0.01}) is None
    assert watch.see({"epoch": 2, "std_norm": 0.01}) is None
    assert watch.see({"epoch": 2, "std_norm": 0.01}) is None and watch.streak == 2  # the repeat
    assert watch.see({"epoch": 3, "std_norm": 0.01}) is not None  # the third low epoch
    again = CollapseWatch("std_norm", 0.05, 2)
    assert (
        again.see({"epoch": 1, "std_norm": 0.01}) is None and again.see({"epoch": 2, "std_norm": 0.9}) is None
    )
    assert again.see({"epoch": 2, "std_norm": 0.01}) is not None  # the repeat replaced the healthy report


def test_spearman_by_hand():
    assert report.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert report.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x = (1, 2, 3), y = (1, 3, 2): rho = 1 - 6 * (0 + 1 + 1) / (3 * 8) = 0.5
    assert report.spearman([1.0, 2.0, 3.0], [5.0, 9.0, 7.0]) == pytest.approx(0.5)
    # ties take average ranks: x = (1.5, 1.5, 3), y = (1, 2, 3): Pearson of the ranks = sqrt(3) / 2
    assert report.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)
    assert report.spearman([1, 2], [1, 2]) is None and report.spearman([1, 1, 1], [1, 2, 3]) is None


def test_label_free_summary_compares_the_rankme_pick_with_the_knn_pick():
    def row(t, knn, rankme, status="completed"):
        return {"trial_id": t, "status": status, "knn_top1": knn, "rankme": rankme, "metric": knn}

    rows = [
        row("a", 70.0, 30.0),
        row("b", 60.0, 40.0),
        row("c", 50.0, 10.0),
        row("d", 99.0, 99.0, "stopped_early"),
    ]
    out = report.label_free_summary(rows)  # d was stopped: not comparable
    assert out["spearman_rankme_knn"] == pytest.approx(0.5)  # ranks (3, 2, 1) vs (2, 3, 1)
    assert out["rankme_picks_best_knn"] == 0.0 and out["knn_top1_of_rankme_pick"] == 60.0
    assert out["knn_top1_of_knn_pick"] == 70.0
    assert report.label_free_summary([row("a", 70.0, None)]) == {}


def test_metrics_measured_on_evaluation_epochs_need_one_every_epoch():
    cfg = load_config("bam_fmnist", ["eval.knn_freq=2"])
    with pytest.raises(ConfigError) as err:
        check_metric("rankme", "max", cfg, labelled=True)
    assert err.value.field == "eval.knn_freq" and "every epoch's report" in str(err.value)
    check_metric("loss", "min", cfg, labelled=True)  # reported every epoch
    check_metric("std_norm", "min", cfg, labelled=True, field="--collapse-metric")  # a watch just waits
    no_locals = load_config("bam_fmnist", ["data.local_crops=0"])
    assert "bam_attn_entropy_local" not in logged_metrics(no_locals, True)
    assert "bam_attn_entropy_global" in logged_metrics(no_locals, True)
    with pytest.raises(ConfigError) as err:
        load_config("bam_fmnist", ["eval.signal_samples=1"])
    assert err.value.field == "eval.signal_samples"


def test_a_sweep_recorded_before_the_collapse_stop_resumes_without_one():
    """Its Tuner was built without the stopper: a resumed trial must not be tagged as collapsed."""
    import json

    from orchestrator.sweep.record import SweepRecord
    from orchestrator.sweep.settings import SweepSettings, sweep_space

    cfg = load_config("bam_fmnist")
    space = sweep_space({"name": "s", "params": {"method.reg": {"type": "grid", "values": [0.05]}}}, cfg)
    record = SweepRecord(
        settings=SweepSettings(name="n", trials=1),
        base=cfg,
        space=space,
        parent_run_id="p",
        experiment_id="e",
    )
    doc = json.loads(record.to_json())
    for key in ("metric", "mode", "collapse_metric", "collapse_threshold", "collapse_patience"):
        doc["settings"].pop(key)
    old = SweepRecord.from_json(json.dumps(doc))
    assert old.settings.collapse_threshold == 0.0 and old.settings.metric == "knn_top1"
    assert SweepRecord.from_json(record.to_json()).settings.collapse_threshold == 0.05  # new ones keep theirs


def test_the_signal_sample_is_spread_over_the_ranks_and_may_be_empty(unlabelled, tmp_path):
    """Evenly spaced rows, each rank its own share (none shared, none lost); a rank with no rows still
    yields a tensor of the right shape; a set without test images samples its train split."""
    from data.sources import prepare_image_folder
    from orchestrator.training.online_eval import SignalSample, label_free_signals
    from trainers.build import build_method

    cfg, meta = prepare_data(_cfg("simclr", unlabelled, "eval.signal_samples=5"))
    shares = [SignalSample(cfg, rank=r, world=3).load() for r in range(3)]
    assert [len(v) for v in shares] == [2, 2, 1] and shares[0].shape[1:] == (2, 3, 16, 16)
    whole = SignalSample(cfg, rank=0, world=1).load()
    assert torch.equal(
        torch.cat([shares[0][0:1], shares[1][0:1], shares[2][0:1], shares[0][1:], shares[1][1:]]), whole
    )
    lonely = SignalSample(cfg, rank=7, world=8)
    assert lonely.load().shape == (0, 2, 3, 16, 16)
    model = build_method(cfg, device="cpu", steps_per_epoch=1, batch_size=8)
    assert label_free_signals(model, cfg, lonely, torch.device("cpu")) == {}  # < 2 rows in one process

    write_unlabelled_tree(tmp_path / "few", FMNIST_DIR, 12)
    prepare_image_folder(tmp_path / "few", tmp_path / "few_shards", labelled=False, val_fraction=0.0)
    few, few_meta = prepare_data(_cfg("simclr", tmp_path / "few_shards"))
    assert few_meta["counts"]["test"] == 0 and len(SignalSample(few, 0, 1).load()) == 12
