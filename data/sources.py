"""Importers: image sources -> shards in the ``bamray-shards-v1`` format (:mod:`data.shards`).

Three sources: the Fashion-MNIST IDX files, an ImageFolder tree and Parquet files with an image-bytes
column (a Hugging Face export, a local file or a URI). Every source is verified image by image while it
is converted: a file or row that does not decode is skipped and counted in ``meta["skipped"]``, never a
crash.

The shard-format names (``read_meta``, ``ShardWriter``, ``is_uri`` ...) are re-exported here so
``from data.sources import ...`` keeps working for every caller.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from data.shards import (
    FORMAT,
    SCHEMA,
    SPLITS,
    DataMissingError,
    ShardWriter,
    begin_shards,
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
def _class_dirs(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_files(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _folder_files(root: Path, val_fraction: float, seed: int) -> dict[str, list[tuple[Path, str]]]:
    """``(file, class name)`` per split: ``root/train`` + ``root/val|test|validation`` when both exist,
    else a random per-class split (``seed``) with ``val_fraction`` of each class in ``test``."""
    val_dir = next((root / d for d in ("val", "test", "validation") if (root / d).is_dir()), None)
    files: dict[str, list[tuple[Path, str]]] = {"train": [], "test": []}
    if (root / "train").is_dir() and val_dir is not None:
        for split, base in (("train", root / "train"), ("test", val_dir)):
            for cls in _class_dirs(base):
                files[split] += [(p, cls) for p in _image_files(base / cls)]
        return files
    rng = np.random.default_rng(seed)
    for cls in _class_dirs(root):
        paths = _image_files(root / cls)
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
) -> dict[str, Any]:
    """An ImageFolder tree (``root/<class>/*.jpg|png|...``) -> shards.

    If ``root/train`` and ``root/val`` (or ``root/test``) exist they are the splits; otherwise each class
    is split at random (``seed``) with ``val_fraction`` of its files in ``test``. Class ids follow the
    sorted class directory names (torchvision's ImageFolder convention). Undecodable files are skipped
    and counted per split. ``channels`` in meta is 1 only when every image is grayscale.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataMissingError(f"image folder {root} does not exist (expected {root}/<class>/<image files>)")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: got {val_fraction}; must be in [0, 1)")
    files = _folder_files(root, val_fraction, seed)
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
            enc = verify_and_encode(path)
            if enc is None:
                bad += 1
                continue
            writer.add(enc[0], label_of[cls], enc[1], enc[2])
        writers[split], skipped[split] = writer, bad
    return finish_shards(out, name or root.name, class_names, writers, skipped, extra={"source": str(root)})


# ------------------------------------------------------------------------------------------- Parquet
#: Parquet files to convert, keyed by destination split, or ``"all"`` when the split is still to be drawn.
_Groups = dict[str, tuple[pafs.FileSystem, list[str]]]


def _parquet_files(src: str) -> tuple[pafs.FileSystem, list[str]]:
    fs, base = filesystem_and_path(src)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise DataMissingError(f"Parquet source {src} does not exist")
    if info.type == pafs.FileType.File:
        return fs, [base]
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    paths = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    if not paths:
        raise DataMissingError(f"no .parquet files under {src}")
    return fs, paths


def _split_of(path: str, base: str) -> str | None:
    rel = path[len(base) :].lstrip("/").lower()
    for part in rel.split("/"):
        if part.startswith("train"):
            return "train"
        if part.startswith(("test", "val")):
            return "test"
    return None


def _parquet_groups(src: str, test_src: str | Path | None) -> _Groups:
    """``test_src`` if given; else the files under ``src`` named/placed by split when both splits are
    there (as Hugging Face exports are); else all files in one ``"all"`` group."""
    fs, paths = _parquet_files(src)
    if test_src is not None:
        test_fs, test_paths = _parquet_files(str(test_src))
        return {"train": (fs, paths), "test": (test_fs, test_paths)}
    base = filesystem_and_path(src)[1]
    by_split = {
        "train": [p for p in paths if _split_of(p, base) == "train"],
        "test": [p for p in paths if _split_of(p, base) == "test"],
    }
    if by_split["train"] and by_split["test"]:
        return {k: (fs, v) for k, v in by_split.items()}
    return {"all": (fs, paths)}


def _hf_class_names(schema: pa.Schema, label_column: str) -> list[str] | None:
    """Class names from the Hugging Face ``datasets`` schema metadata (a ``ClassLabel`` feature)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        feature = json.loads(raw)["info"]["features"][label_column]
    except (KeyError, TypeError, ValueError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    return list(names) if names else None


def _read_labels(groups: _Groups, label_column: str) -> tuple[dict[str, list[Any]], pa.Schema | None]:
    """The label column of every group (a cheap column read) and the first file's schema."""
    labels: dict[str, list[Any]] = {}
    schema = None
    for key, (gfs, gpaths) in groups.items():
        vals: list[Any] = []
        for path in gpaths:
            pf = pq.ParquetFile(path, filesystem=gfs)
            schema = schema or pf.schema_arrow
            if label_column not in pf.schema_arrow.names:
                raise ValueError(
                    f"{path}: no label column {label_column!r}; columns are {pf.schema_arrow.names}"
                )
            vals += pf.read(columns=[label_column]).column(0).to_pylist()
        labels[key] = vals
    return labels, schema


def _label_ids(
    labels: dict[str, list[Any]], schema: pa.Schema | None, label_column: str, class_names: list[str] | None
) -> tuple[list[str], Callable[[Any], int | None]]:
    """Class names and a raw label -> class id map (``None`` for a missing or unknown label).

    String labels map to ``class_names`` or their sorted set; integer ids are kept when they are in
    range, named by ``class_names``, the Hugging Face ClassLabel metadata or the ids themselves.
    """
    every = [v for vals in labels.values() for v in vals if v is not None]
    if every and isinstance(every[0], str):
        names = list(class_names or sorted(set(every)))
        to_id = {n: i for i, n in enumerate(names)}
        return names, lambda v: None if v is None else to_id.get(v)
    names = list(
        class_names
        or _hf_class_names(schema, label_column)
        or [str(i) for i in range(int(max(every)) + 1 if every else 0)]
    )
    return names, lambda v: None if v is None else (int(v) if 0 <= int(v) < len(names) else None)


def _stratified_split(ids: list[int | None], val_fraction: float, seed: int) -> list[str]:
    """Destination split per row: ``val_fraction`` of each class (drawn with ``seed``) goes to ``test``."""
    rng = np.random.default_rng(seed)
    dest = ["train"] * len(ids)
    for cls in sorted({i for i in ids if i is not None}):
        rows = [r for r, i in enumerate(ids) if i == cls]
        perm = rng.permutation(len(rows))[: int(round(val_fraction * len(rows)))]
        for r in perm:
            dest[rows[r]] = "test"
    return dest


def _iter_rows(
    fs: pafs.FileSystem, paths: Iterable[str], image_column: str, label_column: str
) -> Iterator[tuple[Any, Any]]:
    for path in paths:
        pf = pq.ParquetFile(path, filesystem=fs)
        for names in (image_column, label_column):
            if names not in pf.schema_arrow.names:
                raise ValueError(f"{path}: no column {names!r}; columns are {pf.schema_arrow.names}")
        for batch in pf.iter_batches(batch_size=1024, columns=[image_column, label_column]):
            yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())


def _image_bytes(value: Any) -> bytes | None:
    """Raw bytes, or a ``{"bytes": ..., "path": ...}`` struct as Hugging Face ``datasets`` writes images."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None


def prepare_parquet(
    src: str | Path,
    out_dir: str | Path,
    image_column: str = "image",
    label_column: str = "label",
    test_src: str | Path | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    shard_size: int = 5000,
    class_names: list[str] | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Parquet file(s) with an image-bytes column -> shards.

    ``src`` is a file, a directory or a URI. Splits: ``test_src`` if given; else, when the files under
    ``src`` are named/placed by split (``train*`` and ``test*``/``val*``, as Hugging Face exports are),
    those; else ``val_fraction`` of each class (``seed``) goes to ``test``. Images may be raw bytes or
    ``{"bytes": ...}`` structs; undecodable or empty ones are skipped and counted. Labels are integer
    ids, or strings mapped to sorted names. Class names come from ``class_names``, the Hugging Face
    ClassLabel metadata, or the ids.
    """
    src = str(src)
    groups = _parquet_groups(src, test_src)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: got {val_fraction}; must be in [0, 1)")
    # Labels first: needed for the string -> id mapping and the stratified split.
    labels, schema = _read_labels(groups, label_column)
    class_names, label_id = _label_ids(labels, schema, label_column, class_names)
    assign = (
        {"all": _stratified_split([label_id(v) for v in labels["all"]], val_fraction, seed)}
        if "all" in groups
        else {}
    )

    out = begin_shards(out_dir)
    writers = {split: ShardWriter(out, split, shard_size) for split in SPLITS}
    skipped = dict.fromkeys(SPLITS, 0)
    for key, (gfs, gpaths) in groups.items():
        for row, (value, label) in enumerate(_iter_rows(gfs, gpaths, image_column, label_column)):
            split = assign[key][row] if key == "all" else key
            lid = label_id(label)
            data = _image_bytes(value)
            enc = verify_and_encode(data) if data and lid is not None else None
            if enc is None:
                skipped[split] += 1
                continue
            writers[split].add(enc[0], lid, enc[1], enc[2])
    return finish_shards(
        out, name or Path(src.rstrip("/")).stem, class_names, writers, skipped, extra={"source": src}
    )
