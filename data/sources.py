"""Importers: image sources -> shards in the ``bamray-shards-v1`` format (:mod:`data.shards`).

Three sources: the Fashion-MNIST IDX files, an ImageFolder tree and Parquet files with an image-bytes
column (a Hugging Face export, a local file or a URI). Every source is verified image by image while it
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
import json
import os
import stat
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
) -> Iterator[tuple[str, Any, Any]]:
    """``(where, image value, label)`` per row; ``where`` is ``<file>#row=<n>`` (n counted per file)."""
    for path in paths:
        pf = pq.ParquetFile(path, filesystem=fs)
        for names in (image_column, label_column):
            if names not in pf.schema_arrow.names:
                raise ValueError(f"{path}: no column {names!r}; columns are {pf.schema_arrow.names}")
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=[image_column, label_column]):
            for value, label in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                yield f"{path}#row={row}", value, label
                row += 1


def _image_bytes(value: Any) -> tuple[bytes | None, str]:
    """Raw bytes, or a ``{"bytes": ..., "path": ...}`` struct as Hugging Face ``datasets`` writes images;
    with the struct's ``path`` (``""`` if none) to name the image in ``skipped.csv``."""
    name = ""
    if isinstance(value, dict):
        name = str(value.get("path") or "")
        value = value.get("bytes")
    return (bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None), name


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
    max_pixels: int | None = None,
) -> dict[str, Any]:
    """Parquet file(s) with an image-bytes column -> shards.

    ``src`` is a file, a directory or a URI. Splits: ``test_src`` if given; else, when the files under
    ``src`` are named/placed by split (``train*`` and ``test*``/``val*``, as Hugging Face exports are),
    those; else ``val_fraction`` of each class (``seed``) goes to ``test``. Images may be raw bytes or
    ``{"bytes": ...}`` structs; undecodable, too large (``max_pixels``, default
    ``$BAMRAY_MAX_IMAGE_PIXELS``), empty or unlabelled rows are skipped, counted and listed in
    ``skipped.csv`` as ``<file>#row=<n>``. Labels are integer ids, or strings mapped to sorted names. Class names come from ``class_names``, the Hugging Face
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
    log = SkipLog()
    for key, (gfs, gpaths) in groups.items():
        for row, (where, value, label) in enumerate(_iter_rows(gfs, gpaths, image_column, label_column)):
            split = assign[key][row] if key == "all" else key
            lid = label_id(label)
            data, image_name = _image_bytes(value)
            if not data:
                enc: Any = Skip("no image", f"column {image_column!r} is empty")
            elif lid is None:
                enc = Skip("missing label" if label is None else "unknown label", f"label {label!r}")
            else:
                enc = encode_or_skip(data, max_pixels)
            if isinstance(enc, Skip):
                detail = f"{enc.detail} (image {image_name})" if image_name else enc.detail
                log.add(split, where, enc.reason, detail)
                skipped[split] += 1
                continue
            writers[split].add(enc[0], lid, enc[1], enc[2])
    return finish_shards(
        out,
        name or Path(src.rstrip("/")).stem,
        class_names,
        writers,
        skipped,
        extra={"source": src},
        skip_log=log,
    )


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
