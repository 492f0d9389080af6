"""Image sources -> Parquet shards (``bamray-shards-v1``), the one format every pipeline reads.

A shard directory holds ``train/part-00000.parquet ...``, ``test/part-*.parquet`` and ``meta.json``.
Rows: ``image`` (PNG bytes, lossless, so a decoded shard equals the source pixels), ``label`` (int64),
``index`` (int64, 0..n-1 per split in write order). ``index`` is the sample's identity: the augmentation
is seeded by it, ``train_limit`` keeps ``index < N`` and evaluation subsets are lists of indices.

Why Parquet of PNG bytes: one columnar format that Ray Data reads in parallel from local disk or object
storage (``shuffle="files"`` is free), small (PNG keeps 28x28 images at ~300 bytes), and independent of
how the source was laid out (IDX files, an ImageFolder tree, a Hugging Face Parquet export).

Every source is verified image by image while it is converted: a file or row that does not decode is
skipped and counted in ``meta["skipped"]``, never a crash. Each shard is written to a temporary name and
moved into place with ``os.replace``; ``meta.json`` is removed first and written last, so a directory with
a ``meta.json`` is always a complete data set.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError

from data.config import DataConfig
from trainers.fileio import atomic_write

FORMAT = "bamray-shards-v1"
SPLITS = ("train", "test")
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("index", pa.int64())])
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
_DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError,
                  EOFError, TypeError)


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
        hint = ("run: bamray data prepare fashion-mnist" if name == "fashion-mnist"
                else f"run: bamray data prepare <source> to write shards to {path} (e.g. bamray data prepare "
                     "fashion-mnist)")
        raise DataMissingError(f"no prepared data set at {path} (meta.json missing); {hint}") from err
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}; prepare the data again")
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
            {"image": pa.array(self._images, pa.binary()), "label": pa.array(self._labels, pa.int64()),
             "index": pa.array(np.arange(self.count, self.count + n), pa.int64())},
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


def _begin(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if is_uri(str(out_dir)):
        raise ValueError(f"out_dir must be a local directory (copy it to object storage afterwards), got {out_dir}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # incomplete until the new meta.json is written
    return out


def _finish(out: Path, name: str, class_names: list[str], writers: dict[str, ShardWriter],
            skipped: dict[str, int], channels: int | None = None, extra: dict | None = None) -> dict[str, Any]:
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
        "format": FORMAT,
        **(extra or {}),
    }
    text = json.dumps(meta, indent=2)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text + "\n")

    atomic_write(out / "meta.json", write)
    return meta


def encode_png(image: Image.Image | np.ndarray) -> tuple[bytes, tuple[int, int], str]:
    """Image -> (PNG bytes, (height, width), mode). Modes other than L/RGB become L or RGB."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.mode in ("1", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "LA", "La"):
        image = image.convert("L")  # 16-bit/float grayscale is clipped to 0..255
    elif image.mode == "P":  # palette (maybe with transparency): via RGBA, as PIL recommends
        image = image.convert("RGBA").convert("RGB")
    elif image.mode != "L" and image.mode != "RGB":
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue(), (image.height, image.width), image.mode


def verify_and_encode(data: bytes | str | Path) -> tuple[bytes, tuple[int, int], str] | None:
    """Fully decode an image (file path or bytes) and re-encode it as PNG; ``None`` when it is corrupt.

    ``Image.open`` only reads the header; ``load()`` decodes every pixel, which is what catches
    truncated and garbled files. EXIF rotation is applied so the stored pixels look like the photo.
    """
    try:
        src = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
        with Image.open(src) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.width < 1 or im.height < 1:
                return None
            return encode_png(im)
    except _DECODE_ERRORS:
        return None


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
        raise ValueError(f"{path}: expected {expected} data bytes for shape {dims}, found {len(raw) - offset}")
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
    out = _begin(out_dir)
    writers, skipped = {}, {}
    for split, (images_file, labels_file) in FASHION_MNIST_FILES.items():
        images = read_idx(src / images_file)
        labels = read_idx(src / labels_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{src}: {images_file} {images.shape} does not match {labels_file} {labels.shape}")
        n = len(images)
        cap = limit if split == "train" else test_limit
        if cap is not None:
            n = min(n, int(cap))
        writer = ShardWriter(out, split, shard_size)
        for i in range(n):
            png, size, mode = encode_png(images[i])
            writer.add(png, int(labels[i]), size, mode)
        writers[split], skipped[split] = writer, 0
    return _finish(out, "fashion-mnist", list(FASHION_MNIST_CLASSES), writers, skipped, channels=1,
                   extra={"source": str(src)})


# --------------------------------------------------------------------------------------- ImageFolder
def _class_dirs(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_files(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


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
    val_dir = next((root / d for d in ("val", "test", "validation") if (root / d).is_dir()), None)
    files: dict[str, list[tuple[Path, str]]] = {"train": [], "test": []}
    if (root / "train").is_dir() and val_dir is not None:
        for split, base in (("train", root / "train"), ("test", val_dir)):
            for cls in _class_dirs(base):
                files[split] += [(p, cls) for p in _image_files(base / cls)]
    else:
        rng = np.random.default_rng(seed)
        for cls in _class_dirs(root):
            paths = _image_files(root / cls)
            n_val = int(round(val_fraction * len(paths)))
            perm = rng.permutation(len(paths))
            val_ids = set(perm[:n_val].tolist())
            for i, p in enumerate(paths):
                files["test" if i in val_ids else "train"].append((p, cls))
    class_names = sorted({cls for split in files.values() for _, cls in split})
    if not class_names:
        raise DataMissingError(f"no class directories with images under {root} "
                               f"(expected {root}/<class>/<image files>, extensions {list(IMAGE_EXTENSIONS)})")
    label_of = {c: i for i, c in enumerate(class_names)}
    out = _begin(out_dir)
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
    return _finish(out, name or root.name, class_names, writers, skipped, extra={"source": str(root)})


# ------------------------------------------------------------------------------------------- Parquet
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
    rel = path[len(base):].lstrip("/").lower()
    for part in rel.split("/"):
        if part.startswith("train"):
            return "train"
        if part.startswith(("test", "val")):
            return "test"
    return None


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


def _iter_rows(fs: pafs.FileSystem, paths: Iterable[str], image_column: str,
               label_column: str) -> Iterator[tuple[Any, Any]]:
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
    fs, paths = _parquet_files(src)
    if test_src is not None:
        test_fs, test_paths = _parquet_files(str(test_src))
        groups = {"train": (fs, paths), "test": (test_fs, test_paths)}
    else:
        base = filesystem_and_path(src)[1]
        by_split = {"train": [p for p in paths if _split_of(p, base) == "train"],
                    "test": [p for p in paths if _split_of(p, base) == "test"]}
        groups = ({k: (fs, v) for k, v in by_split.items()} if by_split["train"] and by_split["test"]
                  else {"all": (fs, paths)})
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: got {val_fraction}; must be in [0, 1)")

    # Labels first (a cheap column read): needed for string->id mapping and the stratified split.
    labels: dict[str, list[Any]] = {}
    schema = None
    for key, (gfs, gpaths) in groups.items():
        vals: list[Any] = []
        for path in gpaths:
            pf = pq.ParquetFile(path, filesystem=gfs)
            schema = schema or pf.schema_arrow
            if label_column not in pf.schema_arrow.names:
                raise ValueError(f"{path}: no label column {label_column!r}; columns are {pf.schema_arrow.names}")
            vals += pf.read(columns=[label_column]).column(0).to_pylist()
        labels[key] = vals
    every = [v for vals in labels.values() for v in vals if v is not None]
    if every and isinstance(every[0], str):
        names_found = sorted(set(every))
        class_names = class_names or names_found
        to_id = {n: i for i, n in enumerate(class_names)}
    else:
        to_id = None
        class_names = class_names or _hf_class_names(schema, label_column) or \
            [str(i) for i in range(int(max(every)) + 1 if every else 0)]

    def label_id(v: Any) -> int | None:
        if v is None:
            return None
        if to_id is not None:
            return to_id.get(v)
        return int(v) if 0 <= int(v) < len(class_names) else None

    assign: dict[str, list[str]] = {}
    if "all" in groups:
        ids = [label_id(v) for v in labels["all"]]
        rng = np.random.default_rng(seed)
        dest = ["train"] * len(ids)
        for cls in sorted({i for i in ids if i is not None}):
            rows = [r for r, i in enumerate(ids) if i == cls]
            perm = rng.permutation(len(rows))[: int(round(val_fraction * len(rows)))]
            for r in perm:
                dest[rows[r]] = "test"
        assign["all"] = dest

    out = _begin(out_dir)
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
    return _finish(out, name or Path(src.rstrip("/")).stem, list(class_names), writers, skipped,
                   extra={"source": src})
