"""Importer: Parquet files with an image-bytes column (a Hugging Face export, a local file or a URI) -> shards.

Row by row like the other importers (:mod:`data.sources`): a row without an image, without a label or with a
label outside the class list is skipped and listed in ``skipped.csv`` with its reason, never a crash.
Without a label column (``label_column=None``) the rows need only an image: an unlabelled set for
self-supervised pre-training, every label -1.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from data.shards import (
    NO_LABEL,
    SPLITS,
    ShardWriter,
    Skip,
    SkipLog,
    begin_shards,
    encode_or_skip,
    filesystem_and_path,
    finish_shards,
    parquet_files,
)

#: Parquet files to convert, keyed by destination split, or ``"all"`` when the split is still to be drawn.
_Groups = dict[str, tuple[pafs.FileSystem, list[str]]]


def parquet_columns(src: str | Path) -> list[str]:
    """Column names of the first Parquet file under ``src`` (a file, a folder or a URI); the files of one
    export share a schema. Lets the CLI ask whether there is a ``label`` column before converting."""
    fs, paths = parquet_files(str(src))
    return list(pq.ParquetFile(paths[0], filesystem=fs).schema_arrow.names)


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
    fs, paths = parquet_files(src)
    if test_src is not None:
        test_fs, test_paths = parquet_files(str(test_src))
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


def _random_split(n: int, val_fraction: float, seed: int) -> list[str]:
    """Destination split per row of an unlabelled set: ``val_fraction`` of all rows (``seed``) to ``test``."""
    dest = ["train"] * n
    for r in np.random.default_rng(seed).permutation(n)[: int(round(val_fraction * n))]:
        dest[r] = "test"
    return dest


def _iter_rows(
    fs: pafs.FileSystem, paths: Iterable[str], image_column: str, label_column: str | None
) -> Iterator[tuple[str, Any, Any]]:
    """``(where, image value, label)`` per row (label None without ``label_column``); ``where`` is
    ``<file>#row=<n>`` (n counted per file)."""
    columns = [image_column] if label_column is None else [image_column, label_column]
    for path in paths:
        pf = pq.ParquetFile(path, filesystem=fs)
        for names in columns:
            if names not in pf.schema_arrow.names:
                raise ValueError(f"{path}: no column {names!r}; columns are {pf.schema_arrow.names}")
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=columns):
            values = batch.column(0).to_pylist()
            labels = batch.column(1).to_pylist() if label_column is not None else [None] * len(values)
            for value, label in zip(values, labels):
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
    label_column: str | None = "label",
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
    ``skipped.csv`` as ``<file>#row=<n>``. Labels are integer ids, or strings mapped to sorted names.
    Class names come from ``class_names``, the Hugging Face ClassLabel metadata, or the ids.

    ``label_column=None``: an unlabelled set. Rows need only an image, every label is -1, the random
    split is over all rows (there are no classes to stratify by) and meta has ``num_classes`` 0 and
    ``labelled`` false.
    """
    src = str(src)
    groups = _parquet_groups(src, test_src)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: got {val_fraction}; must be in [0, 1)")
    assign: dict[str, list[str]] = {}
    if label_column is None:
        if class_names:
            raise ValueError("class_names needs a label column; got label_column=None (unlabelled)")
        class_names, label_id = [], lambda v: NO_LABEL
        if "all" in groups:
            gfs, gpaths = groups["all"]
            n_rows = sum(pq.ParquetFile(p, filesystem=gfs).metadata.num_rows for p in gpaths)  # footers
            assign["all"] = _random_split(n_rows, val_fraction, seed)
    else:
        # Labels first: needed for the string -> id mapping and the stratified split.
        labels, schema = _read_labels(groups, label_column)
        class_names, label_id = _label_ids(labels, schema, label_column, class_names)
        if "all" in groups:
            assign["all"] = _stratified_split([label_id(v) for v in labels["all"]], val_fraction, seed)

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
        labelled=label_column is not None,
    )
