"""Importers: image sources -> shards in the ``bamray-shards-v1`` format (:mod:`data.shards`).

Three sources: the Fashion-MNIST IDX files, an ImageFolder tree (both here) and Parquet files with an
image-bytes column (a Hugging Face export, a local file or a URI; :mod:`data.parquet_source`, re-exported). Every source is verified image by image while it
is converted: a file or row that does not decode is skipped and counted in ``meta["skipped"]``, never a
crash. Nothing vanishes silently: every skipped file or row, every non-image file, empty class folder,
broken link and symlink loop is listed with its reason in ``skipped.csv`` next to the shards
(:class:`data.shards.SkipLog`); :func:`skipped_summary` is the one-line console summary.

The shard-format names (``read_meta``, ``ShardWriter``, ``is_uri`` ...) are re-exported here so
``from data.sources import ...`` keeps working for every caller.
"""

from __future__ import annotations

import errno
import gzip
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np

from data.parquet_source import prepare_parquet
from data.shards import (
    FORMAT,
    SCHEMA,
    SKIPPED_CSV,
    SPLITS,
    DataMissingError,
    ShardWriter,
    Skip,
    SkipLog,
    begin_shards,
    encode_or_skip,
    encode_png,
    filesystem_and_path,
    finish_shards,
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
    "is_uri",
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
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")


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


# --------------------------------------------------------------------------------------- ImageFolder
def _entries(folder: Path, split: str, log: SkipLog) -> list[tuple[Path, os.stat_result]]:
    """``(path, stat following links)`` of every entry of ``folder``, sorted by name; entries that cannot
    be stat'ed (broken links, symlink loops, no permission) are logged instead."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as err:
        log.add(split, folder, "unreadable folder", f"{type(err).__name__}: {err.strerror or err}")
        return []
    out = []
    for name in names:
        path = folder / name
        try:
            out.append((path, os.stat(path)))
        except OSError as err:
            if not os.path.islink(path):
                log.add(split, path, "unreadable", f"{type(err).__name__}: {err.strerror or err}")
            elif err.errno == errno.ELOOP:
                log.add(split, path, "symlink loop", f"-> {os.readlink(path)}")
            else:
                log.add(split, path, "broken symlink", f"-> {os.readlink(path)}")
    return out


def _image_files(class_dir: Path, split: str, log: SkipLog) -> list[Path]:
    """Image files under ``class_dir`` at any depth, sorted; everything else goes to ``log``.

    Directory links are followed (a linked folder of images is data, not noise) unless they point back
    to a folder already being walked: that is a symlink loop, logged and not followed.
    """
    found: list[Path] = []

    def visit(folder: Path, ancestors: frozenset[tuple[int, int]]) -> None:
        for path, st in _entries(folder, split, log):
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    log.add(
                        split, path, "symlink loop", f"-> {os.readlink(path)}" if path.is_symlink() else ""
                    )
                else:
                    visit(path, ancestors | {key})
            elif not stat.S_ISREG(st.st_mode):
                log.add(split, path, "not a regular file", "")
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(path)
            else:
                log.add(split, path, "not an image", f"extension {path.suffix or '(none)'!s}")

    top = os.stat(class_dir)
    visit(class_dir, frozenset({(top.st_dev, top.st_ino)}))
    if not found:
        log.add(split, class_dir, "empty class folder", "no image files; not a class")
    return sorted(found)


def _class_dirs(base: Path, split: str, log: SkipLog, keep: tuple[str, ...] = ()) -> list[str]:
    """Class folder names under ``base``, sorted; files beside them and hidden folders are logged.

    ``keep`` names folders that are read otherwise (the split folders), so they are not logged."""
    classes = []
    for path, st in _entries(base, split, log):
        if path.name in keep:
            continue
        if not stat.S_ISDIR(st.st_mode):
            log.add(split, path, "not in a class folder", f"expected {base}/<class>/<image files>")
        elif path.name.startswith("."):
            log.add(split, path, "hidden folder", "folders starting with '.' are not classes")
        else:
            classes.append(path.name)
    return classes


def _folder_files(
    root: Path, val_fraction: float, seed: int, log: SkipLog
) -> dict[str, list[tuple[Path, str]]]:
    """``(file, class name)`` per split: ``root/train`` + ``root/val|test|validation`` when both exist,
    else a random per-class split (``seed``) with ``val_fraction`` of each class in ``test``."""
    val_dir = next((root / d for d in ("val", "test", "validation") if (root / d).is_dir()), None)
    files: dict[str, list[tuple[Path, str]]] = {"train": [], "test": []}
    if (root / "train").is_dir() and val_dir is not None:
        for path, _ in _entries(root, "", log):
            if path.name not in ("train", val_dir.name):
                log.add("", path, "outside the split folders", f"only train/ and {val_dir.name}/ are read")
        for split, base in (("train", root / "train"), ("test", val_dir)):
            for cls in _class_dirs(base, split, log):
                files[split] += [(p, cls) for p in _image_files(base / cls, split, log)]
        return files
    rng = np.random.default_rng(seed)
    for cls in _class_dirs(root, "", log):
        paths = _image_files(root / cls, "", log)
        n_val = int(round(val_fraction * len(paths)))
        perm = rng.permutation(len(paths))
        val_ids = set(perm[:n_val].tolist())
        for i, p in enumerate(paths):
            files["test" if i in val_ids else "train"].append((p, cls))
    return files


def prepare_image_folder(
    root: str | Path,
    out_dir: str | Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    shard_size: int = 5000,
    name: str | None = None,
    max_pixels: int | None = None,
) -> dict[str, Any]:
    """An ImageFolder tree (``root/<class>/*.jpg|png|...``) -> shards.

    If ``root/train`` and ``root/val`` (or ``root/test``) exist they are the splits; otherwise each class
    is split at random (``seed``) with ``val_fraction`` of its files in ``test``. Class ids follow the
    sorted class directory names (torchvision's ImageFolder convention); a class folder without image
    files is no class. Undecodable and too large (``max_pixels``, default ``$BAMRAY_MAX_IMAGE_PIXELS``)
    files are skipped and counted per split; they and every other file not read are listed in
    ``skipped.csv``. ``channels`` in meta is 1 only when every image is grayscale.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataMissingError(f"image folder {root} does not exist (expected {root}/<class>/<image files>)")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: got {val_fraction}; must be in [0, 1)")
    log = SkipLog()
    files = _folder_files(root, val_fraction, seed, log)
    class_names = sorted({cls for split in files.values() for _, cls in split})
    if not class_names:
        raise DataMissingError(
            f"no class directories with images under {root} "
            f"(expected {root}/<class>/<image files>, extensions {list(IMAGE_EXTENSIONS)})"
        )
    label_of = {c: i for i, c in enumerate(class_names)}
    out = begin_shards(out_dir)
    writers, skipped = {}, {}
    for split in SPLITS:
        writer = ShardWriter(out, split, shard_size)
        bad = 0
        for path, cls in files[split]:
            enc = encode_or_skip(path, max_pixels)
            if isinstance(enc, Skip):
                log.add(split, path, enc.reason, enc.detail)
                bad += 1
                continue
            writer.add(enc[0], label_of[cls], enc[1], enc[2])
        writers[split], skipped[split] = writer, bad
    return finish_shards(
        out, name or root.name, class_names, writers, skipped, extra={"source": str(root)}, skip_log=log
    )


# ------------------------------------------------------------------------------------------- Parquet
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
