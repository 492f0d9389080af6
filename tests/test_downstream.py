"""After training, without Ray: retrieval metrics by hand, the copy distortions, export to safetensors /
TorchScript / ONNX reloaded and compared, ``--init-from`` weights, and the refusals (unknown run, run
without a checkpoint, wrong channels, a pool the cluster cannot hold). Real MLflow stores, real images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FMNIST_DATA, TINY_N_TEST, TINY_N_TRAIN
from torch import nn

from data.distort import _APPLY, MIN_DISTORTIONS, OPERATIONS, distort
from orchestrator import checkpointing as ckpt
from orchestrator import tracking
from orchestrator.config import load_config
from orchestrator.downstream import export as ex
from orchestrator.downstream.embed import check_resources, embedding_table, read_embeddings
from orchestrator.downstream.init_from import describe_mismatch, init_weights
from orchestrator.downstream.source import resolve_backbone
from trainers.build import build_method
from trainers.evaluation.retrieval import NO_MATCH, retrieval_metrics
from trainers.options import ConfigError

RESNET = [
    "model.backbone=resnet18",
    "model.backbone_kwargs={layers: [1, 1, 1, 1], channels: [8, 16, 32, 64]}",
]
VIT = ["model.backbone=vit_tiny_patch16_224", "model.patch_size=4", "model.backbone_kwargs={depth: 1}"]


def _cfg(model: list[str], *extra: str):
    return load_config(
        "bam_fmnist",
        [*model, "method.top_k_sink=0", "optim.batch_size=4", "train.workers=1", *FMNIST_DATA, *extra],
    )


def _export(tmp: Path, model: list[str], seed: int = 0, *extra: str) -> Path:
    cfg = _cfg(model, f"seed={seed}", *extra)
    method = build_method(cfg, device="cpu", steps_per_epoch=1, batch_size=4)
    return ckpt.export_backbone(method, cfg, tmp)


def _fmnist_batch(tiny_shards: Path, n: int = 6) -> torch.Tensor:
    """Real clean views, normalised as the run normalises them."""
    from orchestrator.training.evaluate import clean_loader
    from trainers.engine import normalise_uint8

    cfg = _cfg(RESNET, f"data.path={tiny_shards}")
    batch = next(iter(clean_loader(cfg.data, "test", batch_size=n)))
    return normalise_uint8(batch["image"], cfg.data.mean, cfg.data.std, "cpu")


# ------------------------------------------------------------------------------------------ retrieval
def test_average_precision_and_recall_by_hand():
    # 1-D "embeddings" on the unit circle: similarity order is fixed by the angles
    angles = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4])
    bank = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    bank_labels = torch.tensor([1, 0, 1, 0, 1])
    queries = torch.tensor([[1.0, 0.0]])  # ranks bank items 0,1,2,3,4
    m = retrieval_metrics(queries, torch.tensor([1]), bank, bank_labels, ks=(1, 2))
    # relevant at ranks 1, 3, 5: AP = (1/1 + 2/3 + 3/5) / 3
    assert m["map"] == pytest.approx(100 * (1 + 2 / 3 + 3 / 5) / 3)
    assert m["recall@1"] == 100.0 and m["recall@2"] == 100.0
    m0 = retrieval_metrics(queries, torch.tensor([0]), bank, bank_labels, ks=(1, 2))
    assert m0["map"] == pytest.approx(100 * (1 / 2 + 2 / 4) / 2)  # ranks 2 and 4
    assert m0["recall@1"] == 0.0 and m0["recall@2"] == 100.0


def test_a_single_relevant_item_scores_one_over_its_rank_and_distractors_never_match():
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(50, 8, generator=g)
    keys = torch.full((50,), NO_MATCH)
    keys[7] = 7
    query = bank[7:8] + 0.01 * torch.randn(1, 8, generator=g)
    sims = torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    rank = int((sims[0] > sims[0, 7]).sum()) + 1
    m = retrieval_metrics(query, torch.tensor([7]), bank, keys, ks=(1,))
    assert m["map"] == pytest.approx(100 / rank)
    # a query labelled NO_MATCH has no relevant item: counted apart, not scored 0
    m2 = retrieval_metrics(torch.cat([query, query]), torch.tensor([7, NO_MATCH]), bank, keys, ks=(1,))
    assert m2["map"] == pytest.approx(m["map"]) and m2["queries_without_match"] == 1.0


def test_retrieval_is_independent_of_the_block_size_and_of_feature_scale():
    g = torch.Generator().manual_seed(1)
    q, b = torch.randn(37, 16, generator=g), torch.randn(90, 16, generator=g)
    ql, bl = torch.randint(0, 4, (37,), generator=g), torch.randint(0, 4, (90,), generator=g)
    whole = retrieval_metrics(q, ql, b, bl, chunk=1000)
    assert retrieval_metrics(q, ql, b, bl, chunk=5) == pytest.approx(whole)
    assert retrieval_metrics(3 * q, ql, 0.5 * b, bl, chunk=7) == pytest.approx(whole)
    # perfect features: every query's nearest items are its class
    onehot = torch.eye(4)
    perfect = retrieval_metrics(onehot[ql], ql, onehot[bl] + 1e-3 * b[:, :4], bl)
    assert perfect["map"] == pytest.approx(100.0) and perfect["recall@1"] == 100.0
    with pytest.raises(ValueError, match="queries and"):
        retrieval_metrics(q, ql, b[:, :8], bl)


# ------------------------------------------------------------------------------------------ distortions
@pytest.mark.parametrize("channels", [1, 3])
def test_distortions_are_seeded_strong_and_keep_shape(channels):
    g = torch.Generator().manual_seed(2)
    image = torch.randint(0, 256, (channels, 28, 28), generator=g, dtype=torch.uint8)
    other = torch.randint(0, 256, (channels, 28, 28), generator=g, dtype=torch.uint8)
    a, ops_a = distort(image, other, seed=0, query_id=5)
    b, ops_b = distort(image, other, seed=0, query_id=5)
    assert torch.equal(a, b) and ops_a == ops_b  # reproducible
    assert a.shape == image.shape and a.dtype == torch.uint8
    assert len(ops_a) >= MIN_DISTORTIONS and ops_a == [op for op in OPERATIONS if op in ops_a]  # fixed order
    chosen = {tuple(distort(image, other, seed=0, query_id=i)[1]) for i in range(40)}
    assert len(chosen) > 10  # the subset varies between queries
    assert not torch.equal(distort(image, other, seed=1, query_id=5)[0], a)
    rng = np.random.default_rng(0)
    for op in OPERATIONS:  # each operation on its own changes the image and keeps its shape
        out = _APPLY[op](image, rng, other)
        assert out.shape == image.shape and out.dtype == torch.uint8, op
        assert not torch.equal(out, image), op


def test_copy_benchmark_is_reproducible_and_points_queries_at_their_originals(tiny_shards):
    from data.images import decode_image
    from data.sources import read_meta
    from orchestrator.downstream.copydetect import build_copy_benchmark

    meta = read_meta(str(tiny_shards))
    o1, d1, t1 = build_copy_benchmark(str(tiny_shards), meta, 20, 50, seed=3)
    o2, d2, t2 = build_copy_benchmark(str(tiny_shards), meta, 20, 50, seed=3)
    assert np.array_equal(o1, o2) and np.array_equal(d1, d2) and t1.equals(t2)
    assert len(o1) == 20 == t1.num_rows and len(d1) == 50 and len(set(o1)) == 20
    assert sorted(t1.column("label").to_pylist()) == sorted(o1.tolist())
    copy = decode_image(t1.column("image")[0].as_py(), 1)
    assert copy is not None and copy.shape == (1, 28, 28)
    o3, _, _ = build_copy_benchmark(str(tiny_shards), meta, 20, 50, seed=4)
    assert not np.array_equal(o1, o3)
    with pytest.raises(ConfigError, match="--queries"):
        build_copy_benchmark(str(tiny_shards), meta, TINY_N_TEST + 1, 10, seed=0)
    with pytest.raises(ConfigError, match="--distractors"):
        build_copy_benchmark(str(tiny_shards), meta, 5, TINY_N_TRAIN + 1, seed=0)


# ------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("model", [RESNET, VIT], ids=["resnet-small-stem", "vit-patch4"])
def test_every_export_format_reloads_to_the_same_features_on_real_images(model, tmp_path, tiny_shards):
    from safetensors.torch import load_model

    src = _export(tmp_path / "run", model)
    backbone = resolve_backbone(str(src), tmp_path)
    assert backbone.run_id is None
    ref = backbone.load()
    x = _fmnist_batch(tiny_shards, n=5)  # a batch size the exports were not traced with
    with torch.no_grad():
        expected = ref(x)
    out = tmp_path / "out"
    results = {fmt: ex.export(backbone, fmt, out) for fmt in ex.FORMATS}
    assert all(r["max_abs_diff"] <= ex.TOLERANCE for r in results.values())
    # safetensors: the README's loader, timm alone
    spec = json.loads((out / ex.TIMM_SPEC).read_text())
    assert (spec["small_resnet_stem"] is not None) == (model is RESNET)
    net = ex.build_from_spec(spec)
    load_model(net, str(out / ckpt.BACKBONE_FILE), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            torch.jit.load(str(out / ex.FILES["torchscript"]))(x), expected, rtol=1e-5, atol=1e-5
        )
    got = ex.run_onnx(out / ex.FILES["onnx"], x.numpy())
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_timm_spec_without_the_small_stem_is_plain_create_model(tmp_path):
    src = _export(tmp_path, RESNET, 0, "model.stem=imagenet")
    backbone = resolve_backbone(str(src), tmp_path)
    spec = ex.timm_spec(backbone.cfg, backbone.load())
    assert spec["small_resnet_stem"] is None and spec["kwargs"]["in_chans"] == 1
    assert isinstance(ex.build_from_spec(spec).maxpool, nn.MaxPool2d)


# ------------------------------------------------------------------------------------------ MLflow runs
def _store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_a_run_is_found_by_id_and_refused_without_a_checkpoint_or_when_unknown(tmp_path):
    uri = _store(tmp_path)
    experiment = tracking.ensure_experiment(uri, "downstream")
    c = tracking.client(uri)
    empty = c.create_run(experiment).info.run_id  # a run that never finished an epoch: no export
    with pytest.raises(ConfigError, match="--checkpoint.*no 'final' checkpoint"):
        resolve_backbone(empty, tmp_path / "a", tracking_uri=uri)
    with pytest.raises(ConfigError, match="--run.*no MLflow run 'feedbeef'"):
        resolve_backbone("feedbeef", tmp_path / "b", tracking_uri=uri)
    with pytest.raises(ConfigError, match="not an exported backbone"):
        resolve_backbone(str(tmp_path), tmp_path / "c", tracking_uri=uri)
    with pytest.raises(ConfigError, match="--checkpoint"):
        resolve_backbone(empty, tmp_path / "d", checkpoint="last", tracking_uri=uri)
    run = c.create_run(experiment).info.run_id
    tracking.log_artifacts(uri, run, str(_export(tmp_path / "exp", RESNET)), "final")
    found = resolve_backbone(run, tmp_path / "e", tracking_uri=uri)
    assert found.run_id == run and found.cfg.model.backbone == "resnet18"
    with pytest.raises(ConfigError, match="no 'best_knn' checkpoint.*k-NN"):
        resolve_backbone(run, tmp_path / "f", checkpoint="best_knn", tracking_uri=uri)


def test_export_cli_logs_the_files_and_the_check_to_the_run(tmp_path, capsys):
    from orchestrator.cli import main

    uri = _store(tmp_path)
    c = tracking.client(uri)
    run = c.create_run(tracking.ensure_experiment(uri, "downstream")).info.run_id
    tracking.log_artifacts(uri, run, str(_export(tmp_path / "exp", RESNET)), "final")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("the user's own file")
    argv = [
        "export",
        "--run",
        run,
        "--tracking-uri",
        uri,
        "--format",
        "torchscript",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0
    assert "torchscript" in capsys.readouterr().out
    logged = {a.path for a in c.list_artifacts(run, "export")}
    assert logged == {"export/backbone.torchscript.pt"}  # not the user's other files
    assert c.get_run(run).data.metrics["export_torchscript_max_abs_diff"] <= ex.TOLERANCE
    assert main(["export", "--run", "0123abcd", "--tracking-uri", uri, "--out", str(tmp_path / "o2")]) == 2


# ------------------------------------------------------------------------------------------ --init-from
def test_init_from_loads_fitting_weights_into_student_and_teacher(tmp_path):
    src = _export(tmp_path / "src", RESNET, seed=7)
    cfg = _cfg(RESNET, f"model.init_from={src}")
    state = init_weights(cfg)
    assert state is not None
    method = build_method(cfg, device="cpu", steps_per_epoch=1, batch_size=4)
    fresh = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    method.init_backbone(state)
    for key, value in state.items():
        assert torch.equal(method.backbone.state_dict()[key], value), key
        assert torch.equal(method.teacher_backbone.state_dict()[key], value), key
    assert any(not torch.equal(fresh[k], state[k]) for k in state)  # seed 7 is not the run's own init
    assert init_weights(_cfg(RESNET)) is None


def test_init_from_refuses_weights_of_another_network_naming_the_field(tmp_path):
    src = _export(tmp_path / "src", RESNET)
    with pytest.raises(ConfigError, match=r"model.init_from.*do not fit model.backbone=vit_tiny.*missing"):
        init_weights(_cfg(VIT, f"model.init_from={src}"))
    wider = _cfg(
        RESNET,
        f"model.init_from={src}",
        "model.backbone_kwargs={layers: [1, 1, 1, 1], channels: [8, 16, 32, 128]}",
    )
    with pytest.raises(ConfigError, match=r"shape: layer4"):
        init_weights(wider)
    with pytest.raises(ConfigError, match="model.init_from.*no MLflow run"):
        init_weights(_cfg(RESNET, "model.init_from=0123abcd", f"tracking.tracking_uri={_store(tmp_path)}"))
    assert describe_mismatch({"a": torch.zeros(2)}, {"a": torch.zeros(2)}) == ""


def test_init_from_and_resume_are_exclusive_and_a_directory_is_made_absolute(tmp_path, monkeypatch):
    from orchestrator.cli import _config_overrides, build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--resume", "abc", "--init-from", "def"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp").mkdir()
    args = build_parser().parse_args(["train", "--init-from", "exp"])
    assert _config_overrides(args) == [f'model.init_from="{tmp_path / "exp"}"']
    args = build_parser().parse_args(
        ["train", "--init-from", "1234e5"]
    )  # a run id that YAML would read as a float
    assert load_config("bam_fmnist", _config_overrides(args)).model.init_from == "1234e5"


# ------------------------------------------------------------------------------------------ embed, no Ray
def test_embed_refuses_a_pool_the_cluster_cannot_hold():
    check_resources(1, 256, 1.0, 0.0, {"CPU": 2.0})
    with pytest.raises(ConfigError, match="--actors.*2.5 CPUs; the cluster has 2"):
        check_resources(2, 256, 1.0, 0.0, {"CPU": 2.0})
    with pytest.raises(ConfigError, match="--gpus-per-actor"):
        check_resources(1, 256, 1.0, 1.0, {"CPU": 8.0})
    for bad in [(0, 256, 1.0), (1, 0, 1.0), (1, 256, 0.0)]:
        with pytest.raises(ConfigError):
            check_resources(*bad, 0.0, {"CPU": 8.0})


def test_embedding_files_read_back_sorted_with_their_columns(tmp_path):
    import pyarrow.parquet as pq

    feats = np.arange(12, dtype=np.float32).reshape(4, 3)
    pq.write_table(embedding_table(["test", "train"], [5, 2], [1, 0], feats[:2]), tmp_path / "b.parquet")
    pq.write_table(embedding_table(["train", "test"], [1, 0], [3, 4], feats[2:]), tmp_path / "a.parquet")
    e = read_embeddings(str(tmp_path))
    assert e["split"].tolist() == ["test", "test", "train", "train"] and e["index"].tolist() == [0, 5, 1, 2]
    assert e["label"].tolist() == [4, 1, 3, 0]
    np.testing.assert_array_equal(e["embedding"], feats[[3, 0, 2, 1]])
    unlabelled = embedding_table(["train"], [0], None, feats[:1])
    assert unlabelled.column_names == ["split", "index", "embedding"]


def test_embed_data_with_other_channels_is_refused(tmp_path, tiny_shards):
    from orchestrator.downstream.commands import resolve_data

    backbone = resolve_backbone(
        str(
            _export(
                tmp_path / "rgb",
                RESNET,
                0,
                "data.channels=3",
                "data.mean=[0.5, 0.5, 0.5]",
                "data.std=[0.2, 0.2, 0.2]",
            )
        ),
        tmp_path,
    )
    with pytest.raises(ConfigError, match="--data.*1-channel images but the backbone.*takes 3"):
        resolve_data(str(tiny_shards), backbone, str(tmp_path))
    with pytest.raises(ConfigError, match="--data.*no prepared data set"):
        resolve_data(str(tmp_path / "nowhere"), backbone, str(tmp_path))


def test_the_readme_loader_runs_as_written_on_an_export(tmp_path, tiny_shards):
    """The README's safetensors snippet, cut from the README and run with timm alone."""
    import re
    import textwrap

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"```python\n(\s*import json, timm.*?)```", readme, re.S)
    assert block, "the loader snippet is not in the README"
    src = _export(tmp_path / "run", RESNET)
    backbone = resolve_backbone(str(src), tmp_path)
    ex.export(backbone, "safetensors", tmp_path / "DIR")
    code = textwrap.dedent(block.group(1)).replace('"DIR/', f'"{tmp_path}/DIR/')
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own README
    x = _fmnist_batch(tiny_shards, n=4)
    with torch.no_grad():
        torch.testing.assert_close(scope["m"](x), backbone.load()(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ fine-tuning
def test_label_subsets_are_class_balanced_and_seeded():
    from trainers.evaluation.finetune import label_subset

    y = np.repeat(np.arange(10), [600] * 9 + [200])
    one = label_subset(y, "1%", seed=0)
    assert np.bincount(y[one], minlength=10).tolist() == [6] * 9 + [2]
    assert np.array_equal(one, label_subset(y, "1%", seed=0)) and not np.array_equal(
        one, label_subset(y, "1%", seed=1)
    )


def test_a_label_fraction_that_leaves_a_class_empty_is_refused_naming_it():
    from trainers.evaluation.finetune import label_subset, parse_labels

    y = np.repeat(np.arange(10), [600] * 9 + [40])
    with pytest.raises(ConfigError, match=r"--labels.*1% leaves class 9 \(40 train images\)"):
        label_subset(y, "1%")
    ten = label_subset(y, "10%")
    assert np.bincount(y[ten]).tolist() == [60] * 9 + [4]
    n = label_subset(y, "25")
    assert np.bincount(y[n]).tolist() == [3] * 5 + [2] * 5
    with pytest.raises(ConfigError, match="one per class"):
        label_subset(y, "7")
    for bad in ("0%", "150%", "abc", "-3", "0"):
        with pytest.raises(ConfigError, match="--labels"):
            parse_labels(bad)
    assert parse_labels("10%") == ("fraction", pytest.approx(0.1)) and parse_labels("500") == ("count", 500.0)


def test_topk_counts_the_augmentation_and_the_schedule_by_hand():
    from orchestrator.downstream import FINETUNE_MODES
    from trainers.evaluation.finetune import MODES, Classifier, augment, cosine_lr, topk_correct

    assert FINETUNE_MODES == MODES  # the parser's torch-free copy

    logits = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    assert topk_correct(logits, torch.tensor([0, 0, 1]), ks=(1, 2)) == [1, 2]
    assert topk_correct(logits, torch.tensor([0, 0, 1]), ks=(1, 5)) == [1, 3]  # k capped at 3 classes
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8, generator=g)
    a = augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == torch.uint8 and not torch.equal(a, x)
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(1)))
    assert cosine_lr(1.0, 0, 100, warmup=10) == pytest.approx(0.1) and cosine_lr(1.0, 10, 100, 10) == 1.0
    assert cosine_lr(1.0, 100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    probe = Classifier(
        nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3)), 3, 2, frozen=True
    ).train()
    assert not probe.backbone.training and probe.head.training
    assert not any(p.requires_grad for p in probe.backbone.parameters())


def test_finetune_rows_are_the_clean_views_with_a_corrupt_row_skipped(tmp_path, tiny_shards, fmnist_src):
    import shutil

    from conftest import append_corrupt_row

    from data.config import DataConfig
    from data.encoding import encode_png
    from data.images import clean_transform, decode_image
    from data.sources import read_idx
    from orchestrator.downstream.finetune import _rows

    shards = tmp_path / "fashion-mnist"
    shutil.copytree(tiny_shards, shards)
    append_corrupt_row(shards, "test", TINY_N_TEST, label=3)
    view = DataConfig(path=str(shards), global_crop_size=20, channels=1)  # resolved, as a plan holds it
    x, y = _rows(view, "test", None)
    assert x.shape == (TINY_N_TEST, 1, 20, 20) and x.dtype == torch.uint8  # the corrupt row is left out
    labels = read_idx(Path(fmnist_src) / "t10k-labels-idx1-ubyte.gz")[:TINY_N_TEST]
    assert y.tolist() == labels.tolist()
    images = read_idx(Path(fmnist_src) / "t10k-images-idx3-ubyte.gz")
    for k in (0, TINY_N_TEST - 1):  # the view of the raw IDX image, encoded and decoded as prepared
        png, _, _ = encode_png(images[k])
        assert torch.equal(x[k], clean_transform(decode_image(png, 1), 20))
    x2, y2 = _rows(view, "test", np.array([5, 7, TINY_N_TEST]))
    assert x2.shape[0] == 2 and y2.tolist() == labels[[5, 7]].tolist() and torch.equal(x2[1], x[7])
