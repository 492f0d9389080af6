"""The Ray Data map callables: PNG rows -> multi-crop training batches or clean evaluation views.

Kept apart from :mod:`data.pipeline`, and importing torch only inside the calls, because Ray ships them by
reference inside the dataset plan: every process that unpickles a plan (Ray Train's controller; with several
workers its dataset manager and one split coordinator per data set) imports this module, and none of those
processes runs a batch.
With torch and torchvision at the top, each of them paid about 3 s of CPU for the import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from data.config import DataConfig
from data.ray_budget import wait_for_first_reservation
from data.run_actors import clock_view

# every process that runs a bamray pipeline imports this module first (see data.ray_budget)
wait_for_first_reservation()

if TYPE_CHECKING:
    import torch


def decode_rows(images: Any, channels: int) -> tuple[list[torch.Tensor], np.ndarray]:
    """Decode a column of PNG bytes; returns the decoded images and a keep-mask (False = corrupt)."""
    from data.images import decode_image

    decoded, keep = [], np.zeros(len(images), dtype=bool)
    for k, data in enumerate(images):
        image = decode_image(data, channels)
        if image is not None:
            decoded.append(image)
            keep[k] = True
    return decoded, keep


class MultiCropBatch:
    """Ray Data map actor: PNG rows -> multi-crop batch (the contract). Corrupt rows are dropped and
    reported to the named :class:`data.run_actors.CorruptCounter`; the epoch comes from the :class:`data.run_actors.EpochClock`."""

    def __init__(self, cfg: DataConfig, seed: int, epoch_clock: Any, corrupt_counter: Any):
        import torch

        from data.augment import MultiCropAugment

        torch.set_num_threads(1)  # tiny tensors: threads only add contention with the other actors
        self.augment = MultiCropAugment(cfg)
        self.cfg, self.seed = cfg, int(seed)
        self.clock = epoch_clock  # actor handles (passed, not looked up by name: no namespace issues)
        self.counter = corrupt_counter

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        epoch, skip = clock_view(self.clock) if self.clock is not None else (0, None)
        if skip is not None and len(skip):
            fresh = ~np.isin(np.asarray(batch["index"], dtype=np.int64), skip)
            if not fresh.all():  # trained on before this epoch's checkpoint: not again
                batch = {k: v[fresh] for k, v in batch.items()}
        indices = np.asarray(batch["index"], dtype=np.int64)
        images, keep = decode_rows(batch["image"], self.cfg.channels)
        if not keep.all():
            self._report(indices[~keep])
        kept = indices[keep]
        g, loc = self.augment.augment_batch(images, self.seed, epoch, kept.tolist())
        out = {"global": g.numpy()}
        if self.cfg.local_crops > 0:
            out["local"] = loc.numpy()
        out["label"] = np.asarray(batch["label"], dtype=np.int64)[keep]
        out["index"] = kept
        return out

    def _report(self, bad: np.ndarray) -> None:
        # Waited for: the count must be recorded before this actor can be torn down.
        ray.get(self.counter.add.remote("train", bad.tolist()))


class CleanBatch:
    """Ray Data map actor for evaluation: PNG rows -> ``{"image", "label"}`` clean views."""

    def __init__(self, cfg: DataConfig, split: str, corrupt_counter: Any):
        import torch

        torch.set_num_threads(1)
        self.cfg, self.split, self.counter = cfg, split, corrupt_counter

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from data.images import clean_transform

        indices = np.asarray(batch["index"], dtype=np.int64)
        images, keep = decode_rows(batch["image"], self.cfg.channels)
        if not keep.all():
            ray.get(self.counter.add.remote(self.split, indices[~keep].tolist()))
        size, c = self.cfg.global_crop_size, self.cfg.channels
        views = [clean_transform(im, size) for im in images]
        stacked = torch.stack(views).numpy() if views else np.zeros((0, c, size, size), dtype=np.uint8)
        return {"image": stacked, "label": np.asarray(batch["label"], dtype=np.int64)[keep]}


def run_in_task(
    batch: dict[str, np.ndarray], fn_class: type, kwargs: dict[str, Any]
) -> dict[str, np.ndarray]:
    """``map_compute="tasks"``: build the (cheap) callable per batch in a pooled worker and apply it."""
    return fn_class(**kwargs)(batch)
