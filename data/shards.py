"""The shard format (``bamray-shards-v1``): Parquet of PNG bytes, the one format every pipeline reads.

A shard directory holds ``train/part-00000.parquet ...``, ``test/part-*.parquet`` and ``meta.json``.
Rows: ``image`` (PNG bytes, lossless, so a decoded shard equals the source pixels), ``label`` (int64),
``index`` (int64, 0..n-1 per split in write order). ``index`` is the sample's identity: the augmentation
is seeded by it, ``train_limit`` keeps ``index < N`` and evaluation subsets are lists of indices.

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

Image size bound: PIL refuses images above ~179 M pixels as "decompression bombs", which made a valid
14000x14000 PNG look corrupt. Importers accept up to ``BAMRAY_MAX_IMAGE_PIXELS`` pixels (environment
variable, default 300 M, i.e. ~0.9 GB of RGB pixels while one image is converted) and skip a larger one
with reason ``too large``, naming its size. High-bit-depth images are rescaled to 8 bits by
:mod:`data.bitdepth`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError

from data.bitdepth import nominal_bits, to_8bit
from data.config import DataConfig
from trainers.fileio import atomic_write

FORMAT = "bamray-shards-v1"
SPLITS = ("train", "test")
SKIPPED_CSV = "skipped.csv"
MAX_PIXELS_ENV = "BAMRAY_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 300_000_000
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("index", pa.int64())])
_DECODE_ERRORS = (
    OSError,
    UnidentifiedImageError,
    ValueError,
    SyntaxError,
    Image.DecompressionBombError,
    EOFError,
    TypeError,
)


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


def read_split_table(path: str, split: str, columns: list[str] | None = None) -> pa.Table:
    """One split of a shard directory as an Arrow table sorted by ``index`` (local path or URI)."""
    fs, base = filesystem_and_path(split_path(path, split))
    table = pq.read_table(base, columns=columns, filesystem=fs)
    if "index" in table.column_names:
        table = table.sort_by("index")
    return table


def filesystem_and_path(path: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem + path inside it; plain paths are local (made absolute)."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def is_uri(path: str) -> bool:
    """``scheme://...`` (s3, gs, file, ...), as opposed to a plain local path."""
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", str(path)))


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
) -> dict[str, Any]:
    """Close the writers, write ``skipped.csv`` and then ``meta.json`` last, which marks the directory
    complete; returns the meta.

    ``image_size`` is set only when every image has the same square size; ``channels`` (unless given) is 1
    only when every image is grayscale. ``skipped_reasons`` counts the ``skipped.csv`` entries by reason.
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
    meta = {
        "name": name,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "channels": channels,
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


# ---------------------------------------------------------------------------------------- encoding
@dataclass(frozen=True)
class Skip:
    """Why an image was not written: a short fixed ``reason`` (counted) and a free-form ``detail``."""

    reason: str
    detail: str = ""


def max_image_pixels() -> int:
    """The largest image (width x height) the importers accept: ``$BAMRAY_MAX_IMAGE_PIXELS`` or 300 M."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = float(raw.replace("_", ""))
    except ValueError:
        value = float("nan")
    if not (value >= 1 and value == int(value)):
        raise ValueError(f"{MAX_PIXELS_ENV}={raw!r}: expected a whole number of pixels >= 1 (e.g. 300000000)")
    return int(value)


def encode_png(
    image: Image.Image | np.ndarray, bits: int | None = None
) -> tuple[bytes, tuple[int, int], str]:
    """Image -> (PNG bytes, (height, width), mode). Modes other than L/RGB become L or RGB.

    16-bit / 32-bit / float grayscale is rescaled to 8 bits (:func:`data.bitdepth.to_8bit`, ``bits`` the
    file's declared depth), never clipped.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = to_8bit(image, bits)
    if image.mode in ("1", "LA", "La"):
        image = image.convert("L")
    elif image.mode == "P":  # palette (maybe with transparency): via RGBA, as PIL recommends
        image = image.convert("RGBA").convert("RGB")
    elif image.mode != "L" and image.mode != "RGB":
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue(), (image.height, image.width), image.mode


def encode_or_skip(
    data: bytes | str | Path, max_pixels: int | None = None
) -> tuple[bytes, tuple[int, int], str] | Skip:
    """Fully decode an image (file path or bytes) and re-encode it as PNG, or say why not (:class:`Skip`).

    ``Image.open`` only reads the header; ``load()`` decodes every pixel, which is what catches
    truncated and garbled files. EXIF rotation is applied so the stored pixels look like the photo.
    The size bound (``max_pixels``, default :func:`max_image_pixels`) is checked on the header, before
    any pixel is decoded; PIL's own decompression-bomb limit is lifted meanwhile (not thread-safe: the
    importers convert one image at a time).
    """
    limit = max_image_pixels() if max_pixels is None else int(max_pixels)
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    w = h = 0
    try:
        src = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
        with Image.open(src) as im:
            w, h = im.size
            if w < 1 or h < 1:
                return Skip("corrupt", f"empty image {w}x{h}")
            if w * h > limit:
                return Skip("too large", f"{w}x{h} = {w * h} pixels > {limit} (raise {MAX_PIXELS_ENV})")
            im.load()
            bits = nominal_bits(im)
            return encode_png(ImageOps.exif_transpose(im), bits)
    except MemoryError:
        return Skip("out of memory", f"{w}x{h} pixels; lower {MAX_PIXELS_ENV} to skip such images early")
    except _DECODE_ERRORS as err:
        return Skip("corrupt", f"{type(err).__name__}: {err}")
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def verify_and_encode(
    data: bytes | str | Path, max_pixels: int | None = None
) -> tuple[bytes, tuple[int, int], str] | None:
    """:func:`encode_or_skip` without the reason: ``None`` when the image cannot be written."""
    enc = encode_or_skip(data, max_pixels)
    return None if isinstance(enc, Skip) else enc
