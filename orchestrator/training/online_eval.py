"""The online k-NN at the end of an epoch: every worker embeds its share of the clean bank and queries,
``knn_evaluate`` all-gathers the bank, so every rank gets the global figure.

The clean views never change, so a worker loads its share once (:class:`EvalCache`, in a background
thread that starts with training) when the driver's estimate fits :data:`KNN_CACHE_BYTES`; otherwise
every evaluation streams its shards again.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import torch

from orchestrator.config import ExperimentConfig
from trainers.loop import embed

KNN_BATCH = 256
#: Per-worker host memory for caching the clean k-NN images between evaluations (uint8 bytes).
KNN_CACHE_BYTES = int(os.environ.get("BAMRAY_KNN_CACHE_BYTES", str(512 * 2**20)))
SHARDS = ("knn_train", "knn_val")

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def knn_cache_bytes(cfg: ExperimentConfig, meta: dict[str, Any]) -> int:
    """Estimated uint8 bytes of one worker's k-NN bank + validation shard."""
    train = min(meta["counts"]["train"], cfg.data.train_limit or meta["counts"]["train"])
    test = min(meta["counts"]["test"], cfg.data.val_limit or meta["counts"]["test"])
    rows = train * cfg.eval.knn_train_fraction + test * cfg.eval.knn_eval_fraction
    return int(rows / cfg.world_size * cfg.data.channels * cfg.data.global_crop_size**2)


class EvalCache:
    """This worker's clean k-NN images (uint8, host memory), loaded once by a background thread.

    Loading them while epoch 1 trains hides the eval pipelines' start-up (actor pools, split
    coordinators: most of a small evaluation's time).
    """

    def __init__(self) -> None:
        self.data: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @staticmethod
    def _stream(shard: Any) -> Batches:
        for b in shard.iter_torch_batches(batch_size=KNN_BATCH, drop_last=False, device="cpu"):
            yield b["image"], b["label"]

    def prefetch(self, shards: dict[str, Any]) -> None:
        def run() -> None:
            try:
                for name, shard in shards.items():
                    self.data[name] = list(self._stream(shard))
            except BaseException as err:  # noqa: BLE001 - re-raised in the training thread
                self._error = err

        self._thread = threading.Thread(target=run, name="bamray-knn-prefetch", daemon=True)
        self._thread.start()

    def batches(self, name: str, shard: Any) -> Batches:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._error is not None:
                raise self._error
        if name in self.data:
            return iter(self.data[name])
        return self._stream(shard)


def online_knn(
    method: Any,
    cfg: ExperimentConfig,
    num_classes: int,
    device: torch.device,
    cache: EvalCache,
    with_pixels: bool = False,
) -> dict[str, float]:
    """Weighted k-NN top-1 / top-5 of the eval backbone's features on the clean views.

    ``with_pixels``: also ``knn_pixels_top1``, the same k-NN on the raw pixels of the very same bank and
    queries (pixels / 255, flattened): the floor a learned feature must beat to mean anything."""
    import ray.train

    from trainers.evaluation.knn import knn_evaluate

    def knn(model: torch.nn.Module, pixels: bool) -> dict[str, float]:
        feats = {}
        for name in SHARDS:
            batches = cache.batches(name, ray.train.get_dataset_shard(name))
            feats[name] = embed(
                model,
                batches,
                device,
                data_cfg=None if pixels else cfg.data,
                channels_last=cfg.train.channels_last,
            )
        (train_f, train_y), (val_f, val_y) = feats["knn_train"], feats["knn_val"]
        return knn_evaluate(
            train_f,
            train_y,
            val_f,
            val_y,
            num_classes,
            k=cfg.eval.knn_k,
            temperature=cfg.eval.knn_temperature,
        )

    res = knn(method.eval_backbone(), pixels=False)
    out = {"knn_top1": res["top1"], "knn_top5": res["top5"]}
    if with_pixels:
        out["knn_pixels_top1"] = knn(torch.nn.Flatten(), pixels=True)["top1"]
    return out
