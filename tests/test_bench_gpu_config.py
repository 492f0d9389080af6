"""The GPU bench's configuration must build on a CPU-only machine: a GPU is lent rarely, and a config that
only fails there wastes the lease (the ViT overrides once inherited the shipped ResNet's backbone_kwargs)."""

import sys
from pathlib import Path

import torch

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # bench/ is a folder of the repo, not an installed package

from bench.common import BenchContext  # noqa: E402
from bench.fixtures import train_overrides  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from trainers.backbones import build_backbone  # noqa: E402
from trainers.build import crop_sizes  # noqa: E402


def test_cuda_overrides_give_a_vit_small_that_builds(tmp_path: Path) -> None:
    ctx = BenchContext(device="cuda", quick=False, workdir=tmp_path, cpus=16, log=print)
    fmnist = {"data.channels": 1, "data.mean": [0.2860], "data.std": [0.3530]}  # as a run resolves them
    cfg = load_config("bam_fmnist", {**train_overrides(ctx, tmp_path / "data"), **fmnist})
    assert cfg.model.backbone == "vit_small_patch16_224"
    assert cfg.train.precision == "bf16" and cfg.optim.batch_size == 256
    assert (cfg.data.global_crop_size, cfg.data.local_crop_size, cfg.data.local_crops) == (224, 96, 6)
    model, dim = build_backbone(
        cfg.model, in_chans=cfg.data.channels, default_img_size=cfg.data.global_crop_size
    )
    assert dim == 384  # ViT-S width
    with torch.no_grad():
        for size in crop_sizes(cfg.data):
            out = model(torch.zeros(1, cfg.data.channels, size, size))
            assert out.shape == (1, 384)
