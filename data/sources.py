"""Importers: image sources -> shards in the ``bamray-shards-v1`` format (:mod:`data.shards`).

Three sources: the Fashion-MNIST IDX files (here), a folder tree of images, labelled by class folder or
unlabelled (:mod:`data.folder_source`), and Parquet files with an image-bytes column, with or without a
label column (a Hugging Face export, a local file or a URI; :mod:`data.parquet_source`); both re-exported.
Every importer measures the train split's per-channel ``mean`` / ``std`` into ``meta.json``
(:func:`data.shards.image_stats`). Every source is verified image by image while it is converted: a file or row that does not decode is skipped and counted in ``meta["skipped"]``, never a
crash. Nothing vanishes silently: every skipped file or row, every non-image file, empty class folder,
broken link and symlink loop is listed with its reason in ``skipped.csv`` next to the shards
(:class:`data.shards.SkipLog`); :func:`skipped_summary` is the one-line console summary.

The shard-format names (``read_meta``, ``ShardWriter``, ``is_uri`` ...) are re-exported here so
``from data.sources import ...`` keeps working for every caller.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np

from data.folder_source import IMAGE_EXTENSIONS, prepare_image_folder
from data.parquet_source import parquet_columns, prepare_parquet
from data.shards import (
    FORMAT,
    SCHEMA,
    SKIPPED_CSV,
    SPLITS,
    DataMissingError,
    ShardWriter,
    SkipLog,
    begin_shards,
    encode_or_skip,
    encode_png,
    filesystem_and_path,
    finish_shards,
    image_stats,
    is_uri,
    read_meta,
    read_split_table,
    resolve_shards,
    split_path,
    verify_and_encode,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "FORMAT",
    "IMAGE_EXTENSIONS",
    "SCHEMA",
    "SPLITS",
    "DataMissingError",
    "ShardWriter",
    "SkipLog",
    "encode_or_skip",
    "encode_png",
    "filesystem_and_path",
    "image_stats",
    "is_uri",
    "parquet_columns",
    "prepare_fashion_mnist",
    "prepare_image_folder",
    "prepare_parquet",
    "read_idx",
    "read_meta",
    "read_split_table",
    "resolve_shards",
    "skipped_summary",
    "split_path",
    "verify_and_encode",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


# ------------------------------------------------------------------------------------ Fashion-MNIST
def _fmnist_missing(src_dir: Path, missing: list[str]) -> DataMissingError:
    return DataMissingError(
        f"Fashion-MNIST not found in {src_dir} (missing {', '.join(missing)}). Get it with "
        "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; installs /usr/share/datasets/fashion-mnist) "
        "or point --src to a folder holding the 4 IDX .gz files (train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)."
    )


def read_idx(path: str | Path) -> np.ndarray:
    """Parse a (gzipped) IDX file: magic ``0 0 <type> <ndim>``, big-endian int32 dims, then the data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4]!r})")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX data type 0x{raw[2]:02x}")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    dtype = np.dtype(dtypes[raw[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise ValueError(
            f"{path}: expected {expected} data bytes for shape {dims}, found {len(raw) - offset}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims)


def prepare_fashion_mnist(
    out_dir: str | Path,
    src_dir: str | Path = "/usr/share/datasets/fashion-mnist",
    shard_size: int = 5000,
    limit: int | None = None,
    test_limit: int | None = None,
) -> dict[str, Any]:
    """Fashion-MNIST IDX gz files -> shards (60k train / 10k test, 28x28 grayscale, 10 classes).

    ``limit`` keeps the first N train images (and the first ``test_limit``, default ``limit``, test
    images): for tests and smoke runs. Returns the written ``meta``.
    """
    src = Path(src_dir)
    missing = [n for pair in FASHION_MNIST_FILES.values() for n in pair if not (src / n).is_file()]
    if missing:
        raise _fmnist_missing(src, missing)
    test_limit = limit if test_limit is None else test_limit
    out = begin_shards(out_dir)
    writers, skipped = {}, {}
    for split, (images_file, labels_file) in FASHION_MNIST_FILES.items():
        images = read_idx(src / images_file)
        labels = read_idx(src / labels_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{src}: {images_file} {images.shape} does not match {labels_file} {labels.shape}"
            )
        n = len(images)
        cap = limit if split == "train" else test_limit
        if cap is not None:
            n = min(n, int(cap))
        writer = ShardWriter(out, split, shard_size)
        for i in range(n):
            png, size, mode = encode_png(images[i])
            writer.add(png, int(labels[i]), size, mode)
        writers[split], skipped[split] = writer, 0
    return finish_shards(
        out,
        "fashion-mnist",
        list(FASHION_MNIST_CLASSES),
        writers,
        skipped,
        channels=1,
        extra={"source": str(src)},
    )


# ------------------------------------------------------------------------------------------ summary
def skipped_summary(meta: dict[str, Any], out_dir: str | Path) -> str:
    """One console line on what a prepare left out: counts by reason and where the list is.

    e.g. ``skipped 3: 2 corrupt, 1 not an image (listed in /data/x/skipped.csv)``; ``nothing skipped``.
    """
    reasons = meta.get("skipped_reasons") or {}
    total = sum(reasons.values())
    if not total:
        return "nothing skipped"
    parts = ", ".join(f"{n} {reason}" for reason, n in reasons.items())
    return f"skipped {total}: {parts} (listed in {Path(out_dir) / SKIPPED_CSV})"
