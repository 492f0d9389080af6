"""The shard format (``bamray-shards-v1``): Parquet of PNG bytes, the one format every pipeline reads.

A shard directory holds ``train/part-00000.parquet ...``, ``test/part-*.parquet`` and ``meta.json``.
Rows: ``image`` (PNG bytes, lossless, so a decoded shard equals the source pixels), ``label`` (int64;
-1 in every row of an unlabelled set, whose ``meta["labelled"]`` is false), ``index`` (int64, 0..n-1 per
split in write order). ``index`` is the sample's identity: the augmentation is seeded by it,
``train_limit`` keeps ``index < N`` and evaluation subsets are lists of indices. ``meta.json`` also holds
the train split's per-channel ``mean`` / ``std`` (:func:`image_stats`), which training normalises with.

Why Parquet of PNG bytes: one columnar format that Ray Data reads in parallel from local disk or object
storage (``shuffle="files"`` is free), small (PNG keeps 28x28 images at ~300 bytes), and independent of
how the source was laid out (IDX files, an ImageFolder tree, a Hugging Face Parquet export). The
importers that produce it live in :mod:`data.sources`.

Each shard is written to a temporary name and moved into place with ``os.replace``; ``meta.json`` is
removed first (:func:`begin_shards`) and written last (:func:`finish_shards`), so a directory with a
``meta.json`` is always a complete data set.

Nothing is dropped silently: every file or row an importer does not write is listed in ``skipped.csv``
next to ``meta.json`` (columns ``split,path,reason,detail``; see :class:`SkipLog`) and counted by reason
in ``meta["skipped_reasons"]``. ``meta["skipped"]`` keeps its meaning: per split, the images (files or
rows) that were found but not written -- undecodable, too large, unlabelled.

Source images are verified and turned into PNG bytes by :mod:`data.encoding` (re-exported here).
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from data.config import DataConfig
from data.encoding import (  # noqa: F401 - re-exported: the importers' and tests' one entry point
    DEFAULT_MAX_IMAGE_PIXELS,
    MAX_PIXELS_ENV,
    Skip,
    encode_or_skip,
    encode_png,
    max_image_pixels,
    verify_and_encode,
)
from trainers.fileio import atomic_write

FORMAT = "bamray-shards-v1"
SPLITS = ("train", "test")
SKIPPED_CSV = "skipped.csv"
NO_LABEL = -1  #: the label of every row of an unlabelled set
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("index", pa.int64())])


class DataMissingError(FileNotFoundError):
    """Source files or prepared shards are absent; the message says how to get them."""


# ----------------------------------------------------------------------------------------- reading
def resolve_shards(cfg: DataConfig) -> str:
    """The shard directory of ``cfg``: ``cfg.path`` or ``<data_root>/<dataset>``.

    Local paths are made absolute because Ray workers do not share the driver's working directory.
    """
    path = cfg.path or f"{cfg.data_root.rstrip('/')}/{cfg.dataset}"
    return path if is_uri(path) else os.path.abspath(path)


def read_meta(path: str) -> dict[str, Any]:
    """``meta.json`` of a shard directory (local path or URI such as ``s3://bucket/fmnist``).

    Raises :class:`DataMissingError` with the command that creates the shards when it is absent.
    """
    fs, base = filesystem_and_path(path)
    meta_path = f"{base.rstrip('/')}/meta.json"
    try:
        with fs.open_input_stream(meta_path) as f:
            meta = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError as err:
        name = os.path.basename(str(path).rstrip("/")) or "fashion-mnist"
        hint = (
            "run: bamray data prepare fashion-mnist"
            if name == "fashion-mnist"
            else f"run: bamray data prepare <source> to write shards to {path} (e.g. bamray data prepare "
            "fashion-mnist)"
        )
        raise DataMissingError(f"no prepared data set at {path} (meta.json missing); {hint}") from err
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}; prepare the data again"
        )
    return meta


def split_path(path: str, split: str) -> str:
    """``<shards>/<split>`` (the directory Ray's ``read_parquet`` reads)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return f"{path.rstrip('/')}/{split}"


def read_split_table(
    path: str, split: str, columns: list[str] | None = None, filters: Any = None
) -> pa.Table:
    """One split of a shard directory as an Arrow table sorted by ``index`` (local path or URI).

    ``filters`` (pyarrow's DNF form, e.g. ``[("index", "in", rows)]``) drops rows while the files are
    read, so a sample of a large split never holds the whole split in memory.
    """
    fs, base = filesystem_and_path(split_path(path, split))
    table = pq.read_table(base, columns=columns, filesystem=fs, filters=filters)
    if "index" in table.column_names:
        table = table.sort_by("index")
    return table


def update_meta(path: str, **fields: Any) -> bool:
    """Add ``fields`` to the ``meta.json`` of a local shard directory (atomically); False, and nothing
    written, for a URI (object stores are written by `data prepare` only) or an unwritable directory."""
    if is_uri(path):
        return False
    meta_path = Path(path) / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        text = json.dumps({**meta, **fields}, indent=2) + "\n"
        atomic_write(meta_path, lambda tmp: Path(tmp).write_text(text))
    except OSError:
        return False
    return True


def filesystem_and_path(path: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem + path inside it; plain paths are local (made absolute)."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def parquet_files(src: str) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem and the sorted ``*.parquet`` files of ``src`` (a file, or a folder read recursively;
    local or URI); :class:`DataMissingError` when there are none."""
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


def is_uri(path: str) -> bool:
    """``scheme://...`` (s3, gs, file, ...), as opposed to a plain local path."""
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", str(path)))


# -------------------------------------------------------------------------------------- statistics
def image_stats(path: str, channels: int, max_images: int = 5000) -> tuple[list[float], list[float], int]:
    """Per-channel pixel ``mean`` and ``std`` (values / 255) of the ``train`` split, and how many images
    they come from: the normalisation a data set of its own needs, instead of borrowed ImageNet numbers.

    Reads up to ``max_images`` evenly spaced rows (by ``index``) of the shards at ``path`` (local or URI),
    decodes them to ``channels`` (1: L, 3: RGB) with the decoder training uses
    (:func:`data.images.decode_image`) and weighs every pixel of every sampled image alike (population
    std). Exact 256-bin histograms, so a huge image costs no float copy of its pixels. Works on any
    shard directory, also one whose meta predates these fields. Raises :class:`DataMissingError` when the
    split has no decodable image.
    """
    from data.images import decode_image  # torch: kept out of the importers' and the CLI's start-up

    if channels not in (1, 3):
        raise ValueError(f"channels: got {channels!r}; must be 1 or 3")
    if max_images < 1:
        raise ValueError(f"max_images: got {max_images}; must be >= 1")
    fs, base = filesystem_and_path(split_path(path, "train"))
    n_rows = pads.dataset(base, format="parquet", filesystem=fs).count_rows()  # footers only
    if not n_rows:
        raise DataMissingError(f"the train split of {path} is empty: cannot measure mean/std")
    filters = None
    if n_rows > max_images:
        rows = np.unique(np.linspace(0, n_rows - 1, max_images).round().astype(np.int64))
        filters = [("index", "in", rows.tolist())]
    images = read_split_table(path, "train", columns=["image", "index"], filters=filters).column("image")
    hist = np.zeros((channels, 256), dtype=np.int64)
    used = 0
    for data in images.to_pylist():
        image = decode_image(data, channels)
        if image is None:
            continue
        for c in range(channels):
            hist[c] += image[c].reshape(-1).bincount(minlength=256).numpy()
        used += 1
    if not used:
        raise DataMissingError(f"no decodable image in the train split of {path}: cannot measure mean/std")
    values = np.arange(256, dtype=np.float64) / 255.0
    pixels = hist.sum(axis=1).astype(np.float64)
    mean = (hist * values).sum(axis=1) / pixels
    var = np.maximum((hist * values**2).sum(axis=1) / pixels - mean**2, 0.0)
    return [float(m) for m in mean], [float(s) for s in np.sqrt(var)], used


# ----------------------------------------------------------------------------------------- writing
class ShardWriter:
    """Streams ``(png_bytes, label)`` rows into ``<out>/<split>/part-NNNNN.parquet``, ``shard_size`` per file.

    Assigns ``index`` 0..n-1 in arrival order. Files are written under a temporary name and renamed, so a
    reader never sees a half-written shard; parts left from an earlier, larger preparation are removed.
    """

    def __init__(self, out_dir: str | Path, split: str, shard_size: int = 5000):
        if shard_size < 1:
            raise ValueError(f"shard_size: got {shard_size}; must be >= 1")
        self.dir = Path(out_dir) / split
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.count = 0
        self.sizes: set[tuple[int, int]] = set()
        self.modes: set[str] = set()
        self._images: list[bytes] = []
        self._labels: list[int] = []
        self._parts: list[str] = []

    def add(self, png: bytes, label: int, size: tuple[int, int], mode: str) -> None:
        self._images.append(png)
        self._labels.append(int(label))
        self.sizes.add(size)
        self.modes.add(mode)
        if len(self._images) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._images:
            return
        n = len(self._images)
        table = pa.table(
            {
                "image": pa.array(self._images, pa.binary()),
                "label": pa.array(self._labels, pa.int64()),
                "index": pa.array(np.arange(self.count, self.count + n), pa.int64()),
            },
            schema=SCHEMA,
        )
        name = f"part-{len(self._parts):05d}.parquet"
        atomic_write(self.dir / name, lambda tmp: pq.write_table(table, tmp, compression="none"))
        self._parts.append(name)
        self.count += n
        self._images, self._labels = [], []

    def close(self) -> int:
        self._flush()
        for old in self.dir.glob("part-*.parquet"):
            if old.name not in self._parts:
                old.unlink()
        return self.count


def begin_shards(out_dir: str | Path) -> Path:
    """Create the local shard directory and remove its ``meta.json``: incomplete until :func:`finish_shards`."""
    out = Path(out_dir)
    if is_uri(str(out_dir)):
        raise ValueError(
            f"out_dir must be a local directory (copy it to object storage afterwards), got {out_dir}"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)
    (out / SKIPPED_CSV).unlink(missing_ok=True)
    return out


class SkipLog:
    """Every file or row an importer did not write, with why: becomes ``skipped.csv`` next to the shards.

    A count alone ("skipped: 3") left users guessing which files and whether their data was damaged;
    the list names each one so it can be fixed or ignored knowingly.
    """

    COLUMNS = ("split", "path", "reason", "detail")

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, split: str, path: str | Path, reason: str, detail: str = "") -> None:
        """``split`` is ``""`` when the file was never assigned to one (e.g. a stray non-image file)."""
        self.rows.append((split, str(path), reason, detail))

    def counts(self) -> dict[str, int]:
        """Entries per reason, most frequent first."""
        return dict(Counter(r[2] for r in self.rows).most_common())

    def write(self, out: Path) -> None:
        """``<out>/skipped.csv`` (header only when nothing was skipped), written atomically."""

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(self.COLUMNS)
                w.writerows(self.rows)

        atomic_write(out / SKIPPED_CSV, write)


def finish_shards(
    out: Path,
    name: str,
    class_names: list[str],
    writers: dict[str, ShardWriter],
    skipped: dict[str, int],
    channels: int | None = None,
    extra: dict | None = None,
    skip_log: SkipLog | None = None,
    labelled: bool = True,
) -> dict[str, Any]:
    """Close the writers, write ``skipped.csv``, measure the train split and then write ``meta.json``
    last, which marks the directory complete; returns the meta.

    ``image_size`` is set only when every image has the same square size; ``channels`` (unless given) is 1
    only when every image is grayscale. ``skipped_reasons`` counts the ``skipped.csv`` entries by reason.
    ``mean`` / ``std`` / ``stats_images`` come from :func:`image_stats` (``None`` / ``None`` / 0 when the
    train split is empty), so training normalises with the data set's own statistics. ``labelled`` is
    False for a set without classes (every label -1).
    """
    skip_log = skip_log or SkipLog()
    skip_log.write(out)
    counts = {split: w.close() for split, w in writers.items()}
    sizes = set().union(*(w.sizes for w in writers.values()))
    image_size: int | None = None
    if len(sizes) == 1:
        h, w = next(iter(sizes))
        image_size = h if h == w else None
    if channels is None:
        modes = set().union(*(w.modes for w in writers.values()))
        channels = 1 if modes and modes <= {"L"} else 3
    mean: list[float] | None = None
    std: list[float] | None = None
    n_stats = 0
    if counts.get("train"):
        mean, std, n_stats = image_stats(str(out), channels)
    meta = {
        "name": name,
        "labelled": bool(labelled),
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "channels": channels,
        "mean": mean,
        "std": std,
        "stats_images": n_stats,
        "image_size": image_size,
        "counts": counts,
        "skipped": dict(skipped),
        "skipped_reasons": skip_log.counts(),
        "format": FORMAT,
        **(extra or {}),
    }
    text = json.dumps(meta, indent=2)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text + "\n")

    atomic_write(out / "meta.json", write)
    return meta
