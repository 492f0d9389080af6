"""Inputs shared by the sections: Fashion-MNIST shards, a local Ray, the base experiment config.

Everything lives in the run's scratch directory (``BenchContext.workdir``) so a bench run never
touches the project's own ``.bamray`` store, and two sections reuse the same shards.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.common import BenchContext

FMNIST_SRC = os.environ.get("BAMRAY_FMNIST_SRC", "/usr/share/datasets/fashion-mnist")
TRAIN_IMAGES = 4000
TEST_IMAGES = 1000
#: ``bamray data prepare``'s default shard size: the bench measures the layout users get.
SHARD_SIZE = 5000


def shards(ctx: BenchContext) -> Path:
    """Fashion-MNIST shards (first 4000 train / 1000 test images) prepared once per bench run."""
    from data.sources import prepare_fashion_mnist, read_meta

    out = ctx.workdir / "fashion-mnist"
    if not (out / "meta.json").exists():
        if not Path(FMNIST_SRC, "train-images-idx3-ubyte.gz").exists():
            raise FileNotFoundError(
                f"Fashion-MNIST IDX files not found in {FMNIST_SRC} "
                "(apt-get install dataset-fashion-mnist, or set BAMRAY_FMNIST_SRC)"
            )
        prepare_fashion_mnist(
            out, src_dir=FMNIST_SRC, shard_size=SHARD_SIZE, limit=TRAIN_IMAGES, test_limit=TEST_IMAGES
        )
    read_meta(str(out))
    return out


def init_ray(ctx: BenchContext, num_cpus: float, num_gpus: int | None = None) -> None:
    """A fresh local Ray with ``num_cpus`` logical CPUs (short temp dir: socket paths < 108 chars)."""
    import logging
    import warnings

    import ray
    import ray.data

    from orchestrator.local_ray import start_local_ray

    if ray.is_initialized():
        ray.shutdown()
    # Ray Data logs every execution plan at INFO and warns about concurrency: pages of noise per pass.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"ray\.data.*")
    kwargs: dict[str, Any] = {}
    if num_gpus is not None:
        kwargs["num_gpus"] = num_gpus
    # The same local Ray as `bamray train` (its worker set-up hook included).
    start_local_ray(
        num_cpus,
        log_to_driver=False,
        configure_logging=False,
        object_store_memory=512 * 2**20,
        _temp_dir=str(ctx.workdir / "ray"),
        **kwargs,
    )


def tracking_uri(ctx: BenchContext, name: str) -> str:
    """A separate SQLite MLflow store per section (no writer contention between sections)."""
    path = (ctx.workdir / f"mlflow-{name}" / "mlflow.db").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path.as_posix()}"


def train_overrides(ctx: BenchContext, data_path: Path, **extra: Any) -> dict[str, Any]:
    """Overrides of ``bam_fmnist`` for the step / start-up / sweep sections.

    CPU: the shipped ResNet-18 at 28 px, 2 global + 2 local crops, as ``bam_fmnist`` trains.
    CUDA: ViT-S/16 at 224 px, 2 x 224 + 6 x 96 crops, batch 256, bf16 -- the published BAM crops on
    one GPU (the Fashion-MNIST images are upscaled by the random resized crop)."""
    o: dict[str, Any] = {
        "data.path": str(data_path),
        "train.storage_path": str(ctx.workdir / "ray_results"),
        "eval.knn_freq": 0,
        "eval.knn_train_fraction": 0.25,
        "data.val_limit": 200,
    }
    if ctx.cuda:
        o.update(
            {
                "model.backbone": "vit_small_patch16_224",
                "model.backbone_kwargs": {},
                "data.global_crop_size": 224,
                "data.local_crop_size": 96,
                "data.local_crops": 6,
                "optim.batch_size": 256,
                "train.precision": "bf16",
                "train.gpus_per_worker": 1.0,
                "data.map_workers": max(1, ctx.cpus - 2),
                "method.top_k_sink": 128,
            }
        )
    o.update(extra)
    return o
