"""What an evaluation epoch measures: the online k-NN (when a labelled set is there) and the label-free
signals (always, unless ``eval.signal_samples`` is 0).

k-NN: every worker embeds its share of the clean bank and queries, ``knn_evaluate`` all-gathers the
bank, so every rank gets the global figure.

The clean views never change, so a worker loads its share once (:class:`EvalCache`, in a background
thread that starts with training) when the driver's estimate fits
:data:`orchestrator.training.plan.KNN_CACHE_BYTES`; otherwise every evaluation streams its shards again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from orchestrator.config import ExperimentConfig
from orchestrator.training.shards import Shards
from trainers.loop import embed

KNN_BATCH = 256
#: Per-worker host memory for caching the clean k-NN images between evaluations (uint8 bytes).
SHARDS = ("knn_train", "knn_val")

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


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
    shards: Shards,
    with_pixels: bool = False,
    keep: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Weighted k-NN top-1 / top-5 of the eval backbone's features on the clean views.

    ``with_pixels``: also ``knn_pixels_top1``, the same k-NN on the raw pixels of the very same bank and
    queries (pixels / 255, flattened): the floor a learned feature must beat to mean anything.
    ``keep``: gets this worker's validation features and labels (``val``) and its first validation batch
    of images (``images``, uint8), for the run's pictures. ``shards`` gives this worker's iterators."""
    from trainers.evaluation.knn import knn_evaluate

    def knn(model: torch.nn.Module, pixels: bool) -> dict[str, float]:
        feats = {}
        for name in SHARDS:
            batches = cache.batches(name, shards(name))
            if keep is not None and not pixels and name == "knn_val":
                batches = _keep_first(batches, keep)
            feats[name] = embed(
                model,
                batches,
                device,
                data_cfg=None if pixels else cfg.data,
                channels_last=cfg.train.channels_last,
            )
        (train_f, train_y), (val_f, val_y) = feats["knn_train"], feats["knn_val"]
        if keep is not None and not pixels:
            keep["val"] = (val_f, val_y)
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


def _keep_first(batches: Batches, keep: dict[str, Any]) -> Batches:
    for i, (x, y) in enumerate(batches):
        if i == 0:
            keep["images"] = torch.as_tensor(x)[:16].clone()
        yield x, y


class SignalSample:
    """This worker's share of the fixed sample the label-free signals read: two views per image (one when
    the run has a single global crop) made by the run's own training augmentation at a fixed seed and
    epoch, so every evaluation sees the very same pairs and a change in a signal is the model's, not the
    sample's.

    The sample: ``eval.signal_samples`` evenly spaced images of the training set's ``test`` split (held out
    from training; its ``train`` split when it has no test images), no labels read. Each worker reads only
    its own rows, once, lazily, with the torch twin of the stream (no Ray Data pipeline to start)."""

    SEED_OFFSET = 7_654_321  # not the training stream's seed: the sample's views are their own draw

    def __init__(self, cfg: ExperimentConfig, rank: int, world: int) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world
        self.n_views = min(2, cfg.data.global_crops)
        self.views: torch.Tensor | None = None  # uint8 (n, n_views, C, S, S)

    def load(self) -> torch.Tensor:
        if self.views is None:
            self.views = self._read()
        return self.views

    def _read(self) -> torch.Tensor:
        import numpy as np

        from data.shards import read_meta, resolve_shards
        from data.torch_dataset import MultiCropTorchDataset

        data = self.cfg.data
        counts = read_meta(resolve_shards(data))["counts"]
        split = "test" if counts.get("test") else "train"
        count = int(counts[split])
        limit = data.val_limit if split == "test" else data.train_limit
        count = min(count, limit) if limit > 0 else count
        n = min(self.cfg.eval.signal_samples, count)
        chosen = np.unique(np.linspace(0, count - 1, n).round().astype(np.int64))[self.rank :: self.world]
        size = data.global_crop_size
        empty = torch.zeros((0, self.n_views, data.channels, size, size), dtype=torch.uint8)
        if len(chosen) == 0:
            return empty
        ds = MultiCropTorchDataset(data, split=split, seed=self.cfg.seed + self.SEED_OFFSET, indices=chosen)
        items = [it for it in ds.__getitems__(list(range(len(ds)))) if it is not None]  # corrupt: left out
        if not items:
            return empty
        return torch.stack([it["global"][: self.n_views] for it in items])


@torch.no_grad()
def label_free_signals(
    method: Any, cfg: ExperimentConfig, sample: SignalSample, device: torch.device
) -> dict[str, float]:
    """RankMe, the per-dimension std of normalised embeddings, alignment and uniformity
    (:mod:`trainers.evaluation.signals`) of the eval backbone's features (plain names: ``rankme``,
    ``std_norm`` ...) and of its projection head's outputs (``*_proj``), on the whole fixed sample: every
    rank embeds its share and the embeddings are all-gathered, so every rank gets the same figures. A rank
    whose share is empty still takes part in every gather (with no rows of the right width)."""
    from trainers.distributed import gather_rows
    from trainers.engine import normalise_uint8
    from trainers.evaluation.signals import signals

    views = sample.load()
    rows = len(views)
    if rows == 0:  # one blank image, its features dropped below: only their width is needed
        views = torch.zeros((1, *views.shape[1:]), dtype=torch.uint8)
    backbone, head = method.eval_backbone(), method.signal_head()
    modules = [m for m in (backbone, head) if m is not None]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    feats: dict[str, list[list[torch.Tensor]]] = {
        "backbone": [[] for _ in range(sample.n_views)],
        "proj": [[] for _ in range(sample.n_views)],
    }
    try:
        for start in range(0, len(views), KNN_BATCH):
            chunk = views[start : start + KNN_BATCH]
            for v in range(sample.n_views):
                x = normalise_uint8(
                    chunk[:, v], cfg.data.mean, cfg.data.std, device, channels_last=cfg.train.channels_last
                )
                f = backbone(x)
                feats["backbone"][v].append(f.float()[:rows])
                if head is not None:
                    feats["proj"][v].append(head(f).float()[:rows])
    finally:
        for m, flag in zip(modules, was_training):
            m.train(flag)
    out: dict[str, float] = {}
    for kind, per_view in feats.items():
        if kind == "proj" and head is None:
            continue
        zs = [gather_rows(torch.cat(parts)).cpu() for parts in per_view]
        # the backbone's figures carry the plain names (rankme, std_norm ...), the head's *_proj
        if len(zs[0]) >= 2:
            suffix = "" if kind == "backbone" else f"_{kind}"
            pair = zs[1] if len(zs) > 1 else None
            out.update({k.replace("_z", "") + suffix: v for k, v in signals("z", zs[0], pair).items()})
    return out


class Evaluation:
    """One worker's evaluations: the k-NN (its eval images cached, the raw-pixel floor measured once) and
    the label-free signals on the fixed sample."""

    def __init__(
        self, cfg: ExperimentConfig, *, knn: bool, prefetch: bool, rank: int, world: int, shards: Shards
    ) -> None:
        self.knn = knn
        self.shards = shards
        self.cache = EvalCache()
        self._prefetch = knn and prefetch
        self.sample = SignalSample(cfg, rank, world) if cfg.eval.signal_samples > 0 else None
        self.pixels_knn: float | None = None  # the raw-pixel k-NN of this run's bank, at its first evaluation
        #: rank 0's validation features / labels and first images of the last k-NN, for the pictures
        self.kept: dict[str, Any] | None = {} if rank == 0 and cfg.eval.pictures else None

    def after_first_step(self) -> None:
        """Start loading the k-NN images in the background, once: after the run's first optimiser step, so
        the evaluation pipelines (their read tasks and actor pools, each a process importing torch) do not
        compete with the training pipeline for the CPUs before that step. Without it, start-up on 2 CPUs
        paid for booting all three pipelines at once."""
        if self._prefetch:
            self._prefetch = False
            self.cache.prefetch({n: self.shards(n) for n in SHARDS})

    def run(
        self, method: Any, cfg: ExperimentConfig, num_classes: int, device: torch.device
    ) -> dict[str, float]:
        """The evaluation epoch's metrics, with ``eval_time_s``."""
        t0 = time.perf_counter()
        out: dict[str, float] = {}
        if self.knn:
            out.update(
                online_knn(
                    method,
                    cfg,
                    num_classes,
                    device,
                    self.cache,
                    self.shards,
                    with_pixels=self.pixels_knn is None,
                    keep=self.kept,
                )
            )
            self.pixels_knn = out.get("knn_pixels_top1", self.pixels_knn)
            out["knn_time_s"] = time.perf_counter() - t0
        if self.sample is not None:
            out.update(label_free_signals(method, cfg, self.sample, device))
        out["eval_time_s"] = time.perf_counter() - t0
        return out
