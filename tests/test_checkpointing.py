"""Checkpoint files: a restored engine continues bit-for-bit, RNG streams resume, writes are atomic,
everything loads with ``weights_only=True``, and the exported backbone rebuilds the teacher exactly."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FMNIST_DATA

from orchestrator import checkpointing as ckpt
from orchestrator.config import load_config
from trainers.backbones import build_backbone
from trainers.engine import Engine, crops_from_batch
from trainers.methods import MethodContext, get_method


def _fmnist_images(src: Path, n: int) -> np.ndarray:
    """The first ``n`` real Fashion-MNIST training images, (n, 1, 28, 28) uint8."""
    with gzip.open(src / "train-images-idx3-ubyte.gz", "rb") as f:
        raw = f.read(16 + n * 784)
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, 1, 28, 28).copy()


def _tiny_cfg():
    return load_config(
        "bam_fmnist",
        [
            "model.backbone=vit_tiny_patch16_224",
            "model.patch_size=4",
            "model.backbone_kwargs={depth: 1}",
            *FMNIST_DATA,
            "data.local_crops=2",
            "data.local_crop_size=12",
            "method.top_k_sink=0",
            "method.proj_hidden_dim=64",
            "method.proj_out_dim=32",
            "optim.batch_size=8",
            "optim.epochs=2",
            "train.workers=1",
            "method.momentum=0.9",
        ],
    )


def _batch(images: np.ndarray) -> dict[str, torch.Tensor]:
    """Two global views (the image, its horizontal flip) and two 12-px local corners: real pixels."""
    x = torch.from_numpy(images)
    glob = torch.stack([x, x.flip(-1)], dim=1)
    loc = torch.stack([x[..., :12, :12], x[..., 16:, 16:]], dim=1)
    return {"global": glob, "local": loc}


def _engine(cfg, steps_per_epoch: int = 4):
    torch.manual_seed(0)
    backbone, dim = build_backbone(cfg.model, in_chans=1, default_img_size=cfg.data.global_crop_size)
    ctx = MethodContext(
        backbone=backbone,
        feat_dim=dim,
        num_global_crops=2,
        num_local_crops=2,
        batch_size=cfg.optim.batch_size,
        world_size=1,
        steps_per_epoch=steps_per_epoch,
        epochs=cfg.optim.epochs,
        in_chans=1,
        image_size=28,
    )
    method = get_method("bam")(cfg.method, ctx)
    return Engine(method, cfg.optim, steps_per_epoch=steps_per_epoch, global_batch=cfg.optim.batch_size)


def _leaves(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v)
    else:
        yield obj


def test_restored_engine_continues_bit_for_bit(tmp_path, fmnist_src):
    cfg = _tiny_cfg()
    images = _fmnist_images(fmnist_src, 16)
    batches = [_batch(images[:8]), _batch(images[8:])]
    crops = [crops_from_batch(b, cfg.data.mean, cfg.data.std, "cpu") for b in batches]

    a = _engine(cfg)
    for c in crops:
        a.train_step(c)
    ckpt.save_training_state(
        tmp_path,
        engine_state=a.state_dict(),
        epoch=1,
        mlflow_run_id="abc123",
        config=cfg.to_dict(),
        extra={"best_knn_top1": 12.5},
    )
    # a different engine (other init seed) gets the checkpoint
    torch.manual_seed(123)
    b = _engine(cfg)
    b.method.projector.net[0].weight.data.add_(1.0)
    state = ckpt.load_training_state(tmp_path)
    b.load_state_dict(state["engine"])
    assert (
        state["epoch"] == 1 and state["mlflow_run_id"] == "abc123" and state["extra"]["best_knn_top1"] == 12.5
    )
    assert b.step == a.step == 2
    # only tensors and primitives: loadable without unpickling arbitrary objects
    assert all(isinstance(v, (torch.Tensor, int, float, str, bool, type(None))) for v in _leaves(state))

    # the next step (same schedule position, optimiser moments, teacher) is identical on both
    out_a, out_b = a.train_step(crops[0]), b.train_step(crops[0])
    assert out_a["loss"] == out_b["loss"]
    assert out_a["lr"] == out_b["lr"] and out_a["teacher_momentum"] == out_b["teacher_momentum"]
    for (name, pa), pb in zip(a.method.state_dict().items(), b.method.state_dict().values()):
        assert torch.equal(pa, pb), name
    # and a fresh engine that did NOT load differs (the test can fail)
    c = _engine(cfg)
    assert c.train_step(crops[0])["lr"] != out_a["lr"]


def test_rng_state_roundtrip_weights_only(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    ckpt.save_rng_state(tmp_path, rank=3)
    expected = (
        torch.rand(5),
        np.random.rand(5),
        [random.random() for _ in range(5)],
        np.random.standard_normal(),
    )
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    assert not torch.equal(torch.rand(5), expected[0])
    state = ckpt.load_rng_state(tmp_path, rank=3)
    assert ckpt.load_rng_state(tmp_path, rank=4) is None  # a checkpoint from fewer workers
    ckpt.set_rng_state(state)
    got = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], np.random.standard_normal())
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2] and got[3] == expected[3]


def test_atomic_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "state.pt"
    ckpt.atomic_torch_save({"v": torch.tensor([1.0])}, target)

    def broken(tmp: str) -> None:
        Path(tmp).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_write(target, broken)
    assert torch.equal(ckpt.load_pt(target)["v"], torch.tensor([1.0]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_not_a_checkpoint_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        ckpt.load_training_state(tmp_path)


def test_export_backbone_rebuilds_the_teacher(tmp_path, fmnist_src):
    cfg = _tiny_cfg()
    images = _fmnist_images(fmnist_src, 8)
    crops = crops_from_batch(_batch(images), cfg.data.mean, cfg.data.std, "cpu")
    engine = _engine(cfg)
    for _ in range(3):
        engine.train_step(crops)
    method = engine.method
    out = ckpt.export_backbone(method, cfg, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == [ckpt.BACKBONE_FILE, ckpt.CONFIG_FILE]

    rebuilt, rcfg = ckpt.load_backbone(out)
    assert rcfg.model.backbone == cfg.model.backbone and rcfg.data.channels == 1
    x = crops[0]
    method.eval()
    with torch.no_grad():
        teacher = method.eval_backbone()(x)
        student = method.backbone(x)
        got = rebuilt(x)
    torch.testing.assert_close(got, teacher, rtol=0, atol=0)
    # momentum 0.9 over 3 steps: the teacher is not the student, so the export picked the teacher
    assert not torch.allclose(teacher, student)
