"""Shards -> torch Datasets, without Ray: the twins of the Ray Data streams in :mod:`data.pipeline`.

Why a module of its own: the bare training loop, the evaluation commands and the benchmarks read the
shards through a plain ``DataLoader``; importing Ray for that would cost seconds at start-up and make
Ray a dependency of code that never starts a cluster. :mod:`data.pipeline` imports the shared parts
from here, never the other way round (a test checks that importing this module does not import Ray).

The twins run the same per-sample code as the Ray stream (:func:`data.augment.decode_image` then
:meth:`MultiCropAugment.augment_batch`, seeded by ``(seed, epoch, index)``) and select evaluation rows
with the same :func:`select_eval_indices`, so both paths give bit-identical views of the same rows.
Batches follow the contract described in :mod:`data.pipeline`.
"""

from __future__ import annotations

import numpy as np
import torch

from data.augment import MultiCropAugment
from data.config import DataConfig, for_reading
from data.eval_rows import select_eval_indices
from data.images import clean_transform, decode_image
from data.shards import read_meta, read_split_table, resolve_shards


class _ShardRows(torch.utils.data.Dataset):
    """A split's rows held in memory (PNG bytes are small: Fashion-MNIST train is ~30 MB)."""

    def __init__(self, cfg: DataConfig, split: str, indices: np.ndarray | None = None, limit: int = 0):
        path = resolve_shards(cfg)
        # fails fast with the "run: bamray data prepare ..." hint; channels 0 / no mean: the data set's
        self.cfg = cfg = for_reading(cfg, read_meta(path), path)
        # only the chosen rows are read when there is a choice: a sample of a large split stays small
        filters = [("index", "in", [int(i) for i in indices])] if indices is not None else None
        table = read_split_table(path, split, columns=["image", "label", "index"], filters=filters)
        index = table.column("index").to_numpy()
        keep = np.ones(len(index), dtype=bool)
        if limit > 0:
            keep &= index < limit
        if indices is not None:
            keep &= np.isin(index, indices)
        rows = np.flatnonzero(keep)
        # Kept as one Arrow array, not a list of Python bytes: forked DataLoader workers would otherwise
        # copy every page they touch (reference counts live next to the objects).
        self.images = table.column("image").take(rows).combine_chunks()
        self.labels = table.column("label").to_numpy()[rows].astype(np.int64)
        self.indices = index[rows].astype(np.int64)
        #: corrupt rows met by this process (DataLoader workers count their own copies)
        self.corrupt_skipped = 0

    def __len__(self) -> int:
        return len(self.indices)


class MultiCropTorchDataset(_ShardRows):
    """torch twin of :func:`data.pipeline.build_train_dataset`: the same sample for the same
    ``(seed, epoch, index)``.

    Items are ``{"global", "local"?, "label", "index"}`` (``None`` for a corrupt row; the collate drops
    it). ``__getitems__`` augments a whole DataLoader batch in one call (the fast path, identical
    results). Call :meth:`set_epoch` before each epoch; with ``persistent_workers=True`` the workers keep
    their copy, so re-create the iterator (the default) for the new epoch to reach them.
    """

    def __init__(
        self, cfg: DataConfig, split: str = "train", seed: int = 0, indices: np.ndarray | None = None
    ):
        """``indices``: only the rows with these ``index`` values (e.g. a fixed evaluation sample)."""
        limit = cfg.train_limit if split == "train" else cfg.val_limit
        super().__init__(cfg, split, indices=indices, limit=limit)
        self.augment = MultiCropAugment(self.cfg)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor] | None:
        return self.__getitems__([i])[0]

    def __getitems__(self, positions: list[int]) -> list[dict[str, torch.Tensor] | None]:
        decoded = [decode_image(self.images[p].as_py(), self.cfg.channels) for p in positions]
        ok = [k for k, im in enumerate(decoded) if im is not None]
        self.corrupt_skipped += len(positions) - len(ok)
        idx = [int(self.indices[positions[k]]) for k in ok]
        g, loc = self.augment.augment_batch([decoded[k] for k in ok], self.seed, self.epoch, idx)
        out: list[dict[str, torch.Tensor] | None] = [None] * len(positions)
        for j, k in enumerate(ok):
            item = {
                "global": g[j],
                "label": torch.tensor(self.labels[positions[k]]),
                "index": torch.tensor(idx[j]),
            }
            if self.cfg.local_crops > 0:
                item["local"] = loc[j]
            out[k] = item
        return out


class CleanTorchDataset(_ShardRows):
    """torch twin of :func:`data.pipeline.build_eval_datasets`: ``{"image", "label"}`` clean views of a
    class-balanced ``fraction`` of ``split`` (same selection as the Ray path for the same seed)."""

    def __init__(self, cfg: DataConfig, split: str = "test", fraction: float = 1.0, seed: int = 0):
        limit = cfg.train_limit if split == "train" else cfg.val_limit
        chosen = select_eval_indices(resolve_shards(cfg), split, fraction, seed, limit)
        super().__init__(cfg, split, indices=chosen, limit=limit)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor] | None:
        image = decode_image(self.images[i].as_py(), self.cfg.channels)
        if image is None:
            self.corrupt_skipped += 1
            return None
        return {
            "image": clean_transform(image, self.cfg.global_crop_size),
            "label": torch.tensor(self.labels[i]),
        }


def collate_batch(samples: list[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor]:
    """Stack samples into the batch contract, dropping ``None`` (corrupt) items."""
    samples = [s for s in samples if s is not None]
    if not samples:
        return {}
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
