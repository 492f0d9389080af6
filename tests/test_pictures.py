"""The pictures of an evaluation epoch: the maps they draw are the network's own quantities (checked against
an independent computation), BAM's matrices are the loss's, and each picture is a real image."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from orchestrator import pictures
from trainers.evaluation.maps import ATTENTION, FEATURE_NORM, spatial_maps, vit_cls_attention
from trainers.losses.bam import BAMLoss, attention_entropies, positive_mask


def _vit():
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=16,
        patch_size=4,
        depth=2,
        in_chans=1,
    )


def test_vit_attention_is_the_last_blocks_own_softmax():
    """timm's unfused attention path applies ``attn_drop`` to the softmax weights: captured there, its
    [CLS] row over the patches must equal ours."""
    model = _vit().eval()
    x = torch.randn(3, 1, 16, 16)
    captured = {}
    last = model.blocks[-1].attn
    last.fused_attn = False
    last.attn_drop.register_forward_hook(lambda m, inp, out: captured.update(w=inp[0].detach()))
    with torch.no_grad():
        model(x)
    ours = vit_cls_attention(model, x)
    assert ours.shape == (3, last.num_heads, 4, 4)
    expected = captured["w"][:, :, 0, model.num_prefix_tokens :].reshape(3, last.num_heads, 4, 4)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    # a softmax row: the patches take all of it but the [CLS] token's own share
    self_share = captured["w"][:, :, 0, 0]
    torch.testing.assert_close(ours.sum(dim=(-2, -1)) + self_share, torch.ones_like(self_share))


def test_cnn_gets_its_feature_norm_map_and_the_mode_is_restored():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=1).train()
    x = torch.randn(2, 1, 64, 64)
    kind, maps = spatial_maps(model, x)
    assert kind == FEATURE_NORM and model.training
    model.eval()
    with torch.no_grad():
        expected = model.forward_features(x).norm(dim=1, keepdim=True)
    torch.testing.assert_close(maps, expected)
    assert spatial_maps(_vit(), torch.randn(1, 1, 16, 16))[0] == ATTENTION


def test_bam_matrices_are_the_losses_own():
    torch.manual_seed(0)
    b, crops, num_g = 6, 4, 2
    loss = BAMLoss(num_crops=crops, num_global_crops=num_g, num_target_crops=2, reg=0.05, temperature=0.1,
                   num_sink_iter=3, top_k_sink=0, positive_masking=True)  # fmt: skip
    z = torch.randn(crops * b, 8)
    p, q, stats = loss.matrices(z)
    _, p_loss, log_q = loss._loss(z, None, 0.05, b, 2, num_g, False, 1, 0)
    torch.testing.assert_close(p, p_loss)
    mask = positive_mask(crops, b, 2, 1, 0, device=z.device)[: b * num_g]
    assert torch.all(q[mask] == 0) and torch.all(p[mask] == 0)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(b * num_g))  # rows over the unmasked columns
    torch.testing.assert_close(p.sum(dim=1), torch.ones(b * num_g))
    expected = attention_entropies(p_loss, log_q, num_g, crops)
    assert stats.keys() == expected.keys()
    for k in stats:
        torch.testing.assert_close(stats[k], expected[k])


def test_pca_projection_keeps_the_two_main_directions():
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(200, 2)) * [10.0, 5.0]
    basis = np.linalg.qr(rng.normal(size=(32, 32)))[0][:2]
    x = signal @ basis + rng.normal(scale=0.01, size=(200, 32))
    points, how = pictures.project_2d(x, "pca")
    assert how == "PCA" and points.shape == (200, 2)
    # the projection recovers the planted plane: the signal is a linear map of it
    coef, *_ = np.linalg.lstsq(points, signal - signal.mean(0), rcond=None)
    assert np.abs(points @ coef - (signal - signal.mean(0))).max() < 0.1


def test_umap_projection_separates_two_far_clusters():
    pytest.importorskip("umap")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(60, 16)) + np.eye(16)[0] * 20
    b = rng.normal(size=(60, 16)) - np.eye(16)[0] * 20
    points, how = pictures.project_2d(np.vstack([a, b]), "umap")
    assert how == "UMAP" and np.isfinite(points).all()
    ca, cb = points[:60].mean(0), points[60:].mean(0)
    spread = max(points[:60].std(0).max(), points[60:].std(0).max())
    assert np.linalg.norm(ca - cb) > 3 * spread


UMAP_IN_A_PROCESS = """
import json, sys
import numpy as np
from orchestrator import pictures

def jitted():
    return [(name, fn) for name, fn in pictures.numba_functions() if fn.signatures]

import umap  # noqa: E402  its functions with a signature in the decorator compile here, uncached
at_import = {name for name, _ in jitted()}
x = np.random.default_rng(0).normal(size=(150, 24)).astype(np.float32)
points, how = pictures.project_2d(x, "umap")
np.save(sys.argv[1], points)
compiled = {
    name: [sum(fn.stats.cache_hits.values()), sum(fn.stats.cache_misses.values())]
    for name, fn in jitted()
    if name not in at_import
}
print(json.dumps({"how": how, "compiled": compiled}))
"""


def test_a_new_process_loads_umaps_compiled_code_instead_of_compiling_it(tmp_path):
    """umap-learn's numba functions are not cached by umap itself: each process compiled them at its first
    fit (~20 s). With :func:`pictures.cache_numba_functions` a second process finds every function the fit
    compiles in numba's cache (no miss, i.e. nothing compiled; a few tiny ones with a signature in their
    decorator compile at import, before anything can be cached), and the cached code gives the same points
    bit for bit as the first process's (which compiled them, on a fresh install)."""
    import json
    import subprocess
    import sys

    pytest.importorskip("umap")
    runs = []
    for i in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", UMAP_IN_A_PROCESS, str(tmp_path / f"{i}.npy")],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    second = runs[1]["compiled"]
    assert runs[1]["how"] == "UMAP"
    # the layout's epochs, the distance, the exact neighbours (under 4096 points), the fuzzy graph
    for fn in (
        "layouts._nb_optimize_layout_euclidean_single_epoch",
        "distances.cosine",
        "umap_.fast_knn_indices",
        "umap_.compute_membership_strengths",
    ):
        assert f"umap.{fn}" in second, sorted(second)
    assert {name: c for name, c in second.items() if c[1] or not c[0]} == {}  # every one a cache hit
    assert np.array_equal(np.load(tmp_path / "0.npy"), np.load(tmp_path / "1.npy"))


def test_a_cache_numba_cannot_write_costs_the_cache_not_the_picture(monkeypatch, tmp_path):
    """numba raises a failed cache write (a full disk, a read-only cache dir) out of the compile on Linux:
    the map is drawn again with the cache off, and the dispatchers are back to in-memory compiling."""
    import types

    from numba.core.caching import NullCache

    calls = []

    class UMAP:  # stands in for umap.UMAP: the first fit fails as numba's save does
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def fit_transform(self, x):
            calls.append(self.kwargs)
            if len(calls) == 1:
                raise PermissionError(13, "Permission denied", str(tmp_path / "index.nbi"))
            return x[:, :2] * 2

    numba = pytest.importorskip("numba")

    @numba.njit
    def plus_one(v):
        return v + 1

    plus_one.enable_caching()
    monkeypatch.setattr(pictures, "_CACHING", [plus_one])
    monkeypatch.setattr(pictures, "_umap", lambda: types.SimpleNamespace(UMAP=UMAP))
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    points, how = pictures.project_2d(x, "umap", seed=3)
    assert how == "UMAP" and np.array_equal(points, x[:, :2] * 2) and len(calls) == 2
    assert calls[0] == calls[1] == {"n_neighbors": 15, "metric": "cosine", "random_state": 3, "n_jobs": 1}
    assert isinstance(plus_one._cache, NullCache) and pictures._CACHING == []


def test_each_picture_is_a_real_image():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(4, 1, 16, 16), dtype=np.uint8)
    over = pictures.map_overlays(images, rng.random((4, 3, 4, 4)), ATTENTION, "t")
    assert over.size[0] > 200 and over.size[1] > 200
    emb = pictures.embedding_map(rng.normal(size=(50, 2)), rng.integers(0, 10, 50), "t")
    assert emb.size[0] > 200
    p = rng.random((8, 8))
    bam = pictures.bam_matrices(
        p / p.sum(1, keepdims=True), p / p.sum(1, keepdims=True), {"bam_target_entropy": 1.0}, "t"
    )
    assert bam.size[0] > 400
    rows = [{"optim.lr": 10**-i, "method.reg": 0.01 * i, "knn_top1": 50.0 + i} for i in range(1, 5)]
    coords = pictures.parallel_coordinates(rows, ["optim.lr", "method.reg"], "knn_top1", "t")
    arr = np.asarray(coords)
    assert coords.size[0] > 300 and arr.std() > 10  # something drawn, not a blank canvas


def test_viz_attention_cli_draws_a_users_images_and_logs_them_to_the_run(tmp_path, tiny_shards, capsys):
    """`bamray viz attention` on a ViT run (the user's PNG files) and on a CNN export (the data set's first
    test images: feature-norm maps); unreadable files are refused by name."""
    from PIL import Image

    from orchestrator import checkpointing as ckpt
    from orchestrator import tracking
    from orchestrator.cli import main
    from orchestrator.config import load_config
    from trainers.build import build_method

    def export(model: list[str], where: str):
        cfg = load_config(
            "bam_fmnist",
            [*model, "method.top_k_sink=0", "optim.batch_size=4", "train.workers=1", f"data.path={tiny_shards}",
             "data.channels=1", "data.mean=[0.2860]", "data.std=[0.3530]", "data.global_crop_size=16"],
        )  # fmt: skip
        method = build_method(cfg, device="cpu", steps_per_epoch=1, batch_size=4)
        return ckpt.export_backbone(method, cfg, tmp_path / where)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    run = c.create_run(tracking.ensure_experiment(uri, "viz")).info.run_id
    vit = ["model.backbone=vit_tiny_patch16_224", "model.patch_size=4", "model.backbone_kwargs={depth: 1}"]
    tracking.log_artifacts(uri, run, str(export(vit, "vit")), "final")
    files = []
    for i, size in enumerate(((40, 30), (16, 16))):  # any size and mode: resized and centre-cropped
        Image.new("RGB", size, (40 * i, 200, 90)).save(tmp_path / f"mine{i}.png")
        files.append(str(tmp_path / f"mine{i}.png"))
    out = tmp_path / "att.png"
    assert (
        main(["viz", "attention", "--run", run, "--tracking-uri", uri, "--images", *files, "--out", str(out)])
        == 0
    )
    assert "attention maps of 2 image(s)" in capsys.readouterr().out
    assert Image.open(out).size[0] > 200
    assert [a.path for a in c.list_artifacts(run, "viz")] == ["viz/att.png"]

    cnn = export(
        [
            "model.backbone=resnet18",
            "model.backbone_kwargs={layers: [1, 1, 1, 1], channels: [8, 16, 32, 64]}",
        ],
        "cnn",
    )
    assert main(["viz", "attention", "--run", str(cnn), "--out", str(tmp_path / "cnn.png")]) == 0
    assert "feature-norm maps (a CNN has no attention) of 6 image(s)" in capsys.readouterr().out
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert main(["viz", "attention", "--run", str(cnn), "--images", str(tmp_path / "bad.png")]) == 2
    assert "--images: cannot read" in capsys.readouterr().err
