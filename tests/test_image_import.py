"""Image import never damages or drops data silently: high-bit-depth images are rescaled to 8 bits (not
clipped to a 0/255 mask), large valid images are accepted up to a configurable bound and refused above it
with a reason, and every file not imported is listed in ``skipped.csv`` with its reason. Any folder tree
of images imports unlabelled (label -1), also through ``bamray data prepare``."""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.bitdepth import high_depth_to_uint8
from data.images import decode_image, to_chw_uint8
from data.shards import DEFAULT_MAX_IMAGE_PIXELS, MAX_PIXELS_ENV, encode_or_skip, max_image_pixels
from data.sources import (
    DataMissingError,
    prepare_image_folder,
    prepare_parquet,
    read_split_table,
    skipped_summary,
)
from orchestrator.cli import main as cli_main

RAMP8 = np.tile(np.arange(256, dtype=np.uint8), (4, 1))  # the 8-bit ramp every test expects back
RAMP16 = RAMP8.astype(np.uint16) * 257  # 0..65535: i * 257 is exactly i in 8 bits


def _pixels(shards: Path, split: str = "train", channels: int = 1) -> list[np.ndarray]:
    table = read_split_table(str(shards), split)
    return [decode_image(b, channels).numpy() for b in table.column("image").to_pylist()]


def _rows(shards: Path) -> list[dict[str, str]]:
    with open(shards / "skipped.csv", newline="") as f:
        return list(csv.DictReader(f))


def _png_rgb16(path: Path, rgb: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG written by hand (PIL cannot write one)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def _pgm16(path: Path, gray: np.ndarray) -> None:
    """A binary PGM with maxval 65535 (PIL opens it as mode ``I``)."""
    h, w = gray.shape
    path.write_bytes(f"P5\n{w} {h}\n65535\n".encode() + gray.astype(">u2").tobytes())


# ------------------------------------------------------------------------------------- bit depth
def test_high_bit_depth_files_are_rescaled_not_clipped(tmp_path):
    """16-bit PNG / TIFF / PGM, 32-bit int TIFF, float TIFF and 16-bit RGB PNG all give the 8-bit ramp."""
    root = tmp_path / "tree"
    (root / "gray").mkdir(parents=True)
    (root / "rgb").mkdir()
    files = {
        "png16.png": lambda p: Image.fromarray(RAMP16).save(p),
        "tif16.tif": lambda p: Image.fromarray(RAMP16).save(p),
        "tif32.tif": lambda p: Image.fromarray(RAMP16.astype(np.int32)).save(p),
        "tiff_float.tiff": lambda p: Image.fromarray(RAMP16.astype(np.float32) / 65535).save(p),
        "pgm16.pgm": lambda p: _pgm16(p, RAMP16),
    }
    for name, write in files.items():
        write(root / "gray" / name)
    modes = {n: Image.open(root / "gray" / n).mode for n in files}
    assert modes == {"png16.png": "I;16", "tif16.tif": "I;16", "tif32.tif": "I", "tiff_float.tiff": "F"} | {
        "pgm16.pgm": modes["pgm16.pgm"]
    }
    assert modes["pgm16.pgm"] in ("I", "I;16", "I;16B")
    _png_rgb16(
        root / "rgb" / "rgb16.png", np.stack([RAMP16, RAMP16[:, ::-1], np.full_like(RAMP16, 65535)], -1)
    )

    meta = prepare_image_folder(
        root, tmp_path / "shards", val_fraction=0.0, shuffle=False
    )  # rows in file order
    assert meta["counts"] == {"train": 6, "test": 0} and meta["skipped"] == {"train": 0, "test": 0}
    gray = _pixels(tmp_path / "shards", channels=1)[:5]  # files sort: pgm16, png16, tif16, tif32, tiff_float
    for name, pix in zip(sorted(files), gray):
        np.testing.assert_array_equal(pix[0], RAMP8, err_msg=name)
    rgb = _pixels(tmp_path / "shards", channels=3)[5]
    np.testing.assert_array_equal(rgb[0], RAMP8)
    np.testing.assert_array_equal(rgb[1], RAMP8[:, ::-1])
    assert (rgb[2] == 255).all()


def test_parquet_16bit_png_rows_are_rescaled(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(RAMP16).save(buf, format="PNG")
    table = pa.table({"image": pa.array([buf.getvalue()] * 2, pa.binary()), "label": [0, 1]})
    pq.write_table(table, tmp_path / "d.parquet")
    meta = prepare_parquet(tmp_path / "d.parquet", tmp_path / "shards", val_fraction=0.0)
    assert meta["counts"]["train"] == 2 and meta["channels"] == 1
    for pix in _pixels(tmp_path / "shards"):
        np.testing.assert_array_equal(pix[0], RAMP8)


def test_in_memory_high_depth_images_and_range_rules():
    """``to_chw_uint8`` (clean view, augmentation) rescales too; the range rules of ``data.bitdepth``."""
    for image in (Image.fromarray(RAMP16), Image.fromarray(RAMP16.astype(np.int32))):
        np.testing.assert_array_equal(to_chw_uint8(image)[0].numpy(), RAMP8)
    np.testing.assert_array_equal(to_chw_uint8(Image.fromarray(RAMP16), 3)[2].numpy(), RAMP8)
    ramp = RAMP8.astype(np.float64)
    np.testing.assert_array_equal(high_depth_to_uint8(ramp / 255, "F"), RAMP8)  # 0..1
    np.testing.assert_array_equal(high_depth_to_uint8(ramp, "F"), RAMP8)  # 0..255 kept
    np.testing.assert_array_equal(high_depth_to_uint8(ramp * 257, "F"), RAMP8)  # 0..65535
    np.testing.assert_array_equal(high_depth_to_uint8(ramp * 1000 - 7, "F"), RAMP8)  # other: min..max
    np.testing.assert_array_equal(high_depth_to_uint8((ramp * 1e6).astype(np.int64), "I"), RAMP8)
    np.testing.assert_array_equal(high_depth_to_uint8(RAMP16 // 16, "I;16", bits=12), RAMP8)  # 12-bit TIFF
    nan = np.array([[np.nan, 0.5, 1.0]], np.float32)
    assert high_depth_to_uint8(nan, "F").tolist() == [[0, 128, 255]]


# ---------------------------------------------------------------------------------- large images
def test_valid_14000_square_png_is_imported(tmp_path):
    """196 M pixels: above PIL's decompression-bomb error (~179 M), below the 300 M default bound."""
    root = tmp_path / "tree"
    (root / "big").mkdir(parents=True)
    big = Image.new("1", (14000, 14000))
    big.paste(1, (0, 0, 7000, 14000))  # left half white
    big.save(root / "big" / "scan.png")
    limit_before = Image.MAX_IMAGE_PIXELS
    start = time.perf_counter()
    meta = prepare_image_folder(root, tmp_path / "shards", val_fraction=0.0)
    assert time.perf_counter() - start < 30
    assert meta["counts"]["train"] == 1 and meta["skipped"]["train"] == 0 and meta["skipped_reasons"] == {}
    assert meta["image_size"] == 14000 and meta["channels"] == 1
    assert Image.MAX_IMAGE_PIXELS == limit_before  # PIL's global limit is restored
    png = read_split_table(str(tmp_path / "shards"), "train").column("image")[0].as_py()
    pix = decode_image(png, 1)  # the training path's decoder has no such limit
    assert pix.shape == (1, 14000, 14000) and pix[0, 0, 0] == 255 and pix[0, -1, -1] == 0


def test_image_size_bound_is_configurable_and_reported(tmp_path, monkeypatch):
    assert max_image_pixels() == DEFAULT_MAX_IMAGE_PIXELS == 300_000_000
    root = tmp_path / "tree"
    (root / "a").mkdir(parents=True)
    Image.new("L", (10, 10), 7).save(root / "a" / "fits.png")  # exactly 100 pixels
    Image.new("L", (11, 10), 7).save(root / "a" / "over.png")  # 110 pixels
    monkeypatch.setenv(MAX_PIXELS_ENV, "100")
    assert max_image_pixels() == 100
    meta = prepare_image_folder(root, tmp_path / "shards", val_fraction=0.0)
    assert meta["counts"]["train"] == 1 and meta["skipped"]["train"] == 1
    assert meta["skipped_reasons"] == {"too large": 1}
    [row] = _rows(tmp_path / "shards")
    assert (
        row["split"] == "train"
        and row["path"] == str(root / "a" / "over.png")
        and row["reason"] == "too large"
    )
    assert "11x10 = 110 pixels > 100" in row["detail"] and MAX_PIXELS_ENV in row["detail"]
    # the explicit argument wins over the environment; sci notation and underscores are read
    assert isinstance(encode_or_skip(root / "a" / "over.png", max_pixels=110), tuple)
    monkeypatch.setenv(MAX_PIXELS_ENV, "3e8")
    assert max_image_pixels() == 300_000_000
    monkeypatch.setenv(MAX_PIXELS_ENV, "1_000")
    assert max_image_pixels() == 1000
    for bad in ("lots", "0", "-5", "1.5"):
        monkeypatch.setenv(MAX_PIXELS_ENV, bad)
        with pytest.raises(ValueError, match=MAX_PIXELS_ENV):
            max_image_pixels()


# -------------------------------------------------------------------------------- skipped.csv
def _tree_with_everything(root: Path) -> None:
    """Split folders holding: good images, a corrupt PNG, a stray .txt, an empty class folder, a symlink
    loop, a self-referencing link, a broken link, a linked image folder, a hidden folder, a file beside the
    classes and an unused third split folder."""
    for split, cls, n in (("train", "cat", 3), ("train", "dog", 2), ("val", "cat", 1), ("val", "dog", 1)):
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("L", (8, 8), 10 * i).save(root / split / cls / f"{i}.png")
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "train" / "cat" / "notes.txt").write_text("stray")
    (root / "train" / "bird").mkdir()  # empty class folder
    (root / "train" / "dog" / "loop").symlink_to(root / "train" / "dog", target_is_directory=True)
    (root / "train" / "dog" / "self.png").symlink_to(root / "train" / "dog" / "self.png")
    (root / "train" / "dog" / "gone.png").symlink_to(root / "nowhere.png")
    (root / "extra_dogs").mkdir()
    Image.new("L", (8, 8), 200).save(root / "extra_dogs" / "x.png")
    (root / "val" / "dog" / "more").symlink_to(root / "extra_dogs", target_is_directory=True)
    (root / "val" / ".ipynb_checkpoints").mkdir()
    (root / "train" / "README.md").write_text("about the data")
    (root / "test").mkdir()  # val/ is read, test/ is not


def test_every_skipped_file_is_listed_with_its_reason(tmp_path):
    root = tmp_path / "tree"
    _tree_with_everything(root)
    meta = prepare_image_folder(root, tmp_path / "shards")
    assert meta["counts"] == {"train": 5, "test": 3}  # val/dog/more/x.png (linked folder) included
    assert meta["class_names"] == ["cat", "dog"]  # the empty "bird" folder is no class
    assert meta["skipped"] == {"train": 1, "test": 0}  # images found but not written, as before
    rows = {(r["split"], os.path.relpath(r["path"], root), r["reason"]) for r in _rows(tmp_path / "shards")}
    assert rows == {
        ("train", "train/cat/broken.png", "corrupt"),
        ("train", "train/cat/notes.txt", "not an image"),
        ("train", "train/bird", "empty class folder"),
        ("train", "train/dog/loop", "symlink loop"),
        ("train", "train/dog/self.png", "symlink loop"),
        ("train", "train/dog/gone.png", "broken symlink"),
        ("train", "train/README.md", "not in a class folder"),
        ("test", "val/.ipynb_checkpoints", "hidden folder"),
        ("", "test", "outside the split folders"),
        ("", "extra_dogs", "outside the split folders"),
    }
    assert (
        meta["skipped_reasons"]["outside the split folders"] == 2
        and sum(meta["skipped_reasons"].values()) == 10
    )
    summary = skipped_summary(meta, tmp_path / "shards")
    assert summary.startswith("skipped 10: 2 outside the split folders, ") and "1 corrupt" in summary
    assert str(tmp_path / "shards" / "skipped.csv") in summary


def test_random_split_lists_strays_without_a_split(tmp_path):
    root = tmp_path / "tree"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (8, 8), i).save(root / cls / f"{i}.png")
    (root / "a" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (root / "a" / ".DS_Store").write_bytes(b"\x00\x01")
    (root / "empty").mkdir()
    (root / "labels.csv").write_text("x,y\n")
    (root / "a" / "again").symlink_to(root / "a", target_is_directory=True)
    meta = prepare_image_folder(root, tmp_path / "shards", val_fraction=0.25, seed=1)
    assert meta["class_names"] == ["a", "b"]
    assert meta["counts"]["train"] + meta["counts"]["test"] == 8
    rows = _rows(tmp_path / "shards")
    by_path = {os.path.relpath(r["path"], root): (r["split"], r["reason"]) for r in rows}
    bad_split = by_path.pop("a/bad.jpg")
    assert bad_split[1] == "corrupt" and bad_split[0] in ("train", "test")
    assert meta["skipped"][bad_split[0]] == 1
    assert by_path == {
        "a/.DS_Store": ("", "not an image"),
        "empty": ("", "empty class folder"),
        "labels.csv": ("", "not in a class folder"),
        "a/again": ("", "symlink loop"),
    }


def test_parquet_rows_listed_with_file_and_row(tmp_path):
    good = io.BytesIO()
    Image.new("L", (8, 8), 5).save(good, format="PNG")
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = [
        {"bytes": good.getvalue(), "path": "ok.png"},
        {"bytes": b"junk", "path": "junk.png"},
        None,
        {"bytes": good.getvalue(), "path": "nolabel.png"},
        {"bytes": good.getvalue(), "path": "ok2.png"},
    ]
    labels = pa.array(["x", "y", "x", None, "y"])
    pq.write_table(pa.table({"image": pa.array(images, image_type), "label": labels}), tmp_path / "d.parquet")
    meta = prepare_parquet(tmp_path / "d.parquet", tmp_path / "shards", val_fraction=0.0)
    assert meta["counts"]["train"] == 2 and meta["skipped"] == {"train": 3, "test": 0}
    rows = [(r["split"], r["path"], r["reason"]) for r in _rows(tmp_path / "shards")]
    src = str(tmp_path / "d.parquet")
    assert rows == [
        ("train", f"{src}#row=1", "corrupt"),
        ("train", f"{src}#row=2", "no image"),
        ("train", f"{src}#row=3", "missing label"),
    ]
    assert "junk.png" in _rows(tmp_path / "shards")[0]["detail"]
    assert meta["skipped_reasons"] == {"corrupt": 1, "no image": 1, "missing label": 1}


def test_nothing_skipped_still_writes_the_header(tmp_path):
    (tmp_path / "tree" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "tree" / "a" / "0.png")
    meta = prepare_image_folder(tmp_path / "tree", tmp_path / "shards", val_fraction=0.0)
    assert (tmp_path / "shards" / "skipped.csv").read_text().splitlines() == ["split,path,reason,detail"]
    assert meta["skipped_reasons"] == {} and skipped_summary(meta, tmp_path / "shards") == "nothing skipped"


# ------------------------------------------------------------------------------- unlabelled sets
def _labels(shards: Path) -> list[int]:
    """Every label of both splits (an empty split is a table without columns)."""
    tables = [read_split_table(str(shards), split) for split in ("train", "test")]
    return [y for t in tables if t.num_rows for y in t.column("label").to_pylist()]


def _messy_tree(root: Path) -> int:
    """Images at every depth in mixed formats and modes, beside non-image files and a hidden folder;
    returns the number of image files that must be read."""
    (root / "2021" / "june" / "raw").mkdir(parents=True)
    (root / "misc").mkdir()
    (root / ".thumbnails").mkdir()
    Image.new("L", (8, 8), 40).save(root / "top.png")  # a file right under the root
    Image.new("RGB", (8, 8), (200, 10, 10)).save(root / "2021" / "beach.jpg")
    Image.new("L", (6, 9), 90).save(root / "2021" / "june" / "gray.png")
    Image.new("RGB", (12, 8), (1, 2, 3)).save(root / "2021" / "june" / "raw" / "deep.png")  # sub-sub-folder
    Image.new("RGB", (8, 8), (5, 5, 5)).save(root / "misc" / "photo.JPG")
    Image.new("L", (8, 8)).save(root / ".thumbnails" / "thumb.png")  # hidden: not data
    (root / "misc" / "notes.txt").write_text("not an image")
    (root / "2021" / "june" / "index.csv").write_text("file,when\n")
    return 5


def test_unlabelled_tree_reads_every_image_at_any_depth(tmp_path):
    root = tmp_path / "photos"
    n_images = _messy_tree(root)
    meta = prepare_image_folder(root, tmp_path / "shards", val_fraction=0.4, seed=2, labelled=False)
    assert meta["counts"]["train"] + meta["counts"]["test"] == n_images
    assert meta["counts"]["test"] == 2  # round(0.4 * 5): a random split of the files, not per class
    assert meta["labelled"] is False and meta["num_classes"] == 0 and meta["class_names"] == []
    assert meta["channels"] == 3 and meta["image_size"] is None  # mixed modes and sizes
    assert _labels(tmp_path / "shards") == [-1] * n_images
    assert meta["skipped"] == {"train": 0, "test": 0}
    rows = {(os.path.relpath(r["path"], root), r["reason"]) for r in _rows(tmp_path / "shards")}
    assert rows == {
        ("misc/notes.txt", "not an image"),
        ("2021/june/index.csv", "not an image"),
        (".thumbnails", "hidden folder"),
    }
    assert meta["skipped_reasons"] == {"not an image": 2, "hidden folder": 1}
    prepare_image_folder(root, tmp_path / "again", val_fraction=0.4, seed=2, labelled=False)
    same = [
        read_split_table(str(p), "test").column("image").to_pylist()
        for p in (tmp_path / "shards", tmp_path / "again")
    ]
    assert same[0] == same[1]  # the seed fixes the split


def test_unlabelled_flat_folder_and_split_folders(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(5):
        Image.new("L", (8, 8), 20 * i).save(flat / f"{i}.png")
    meta = prepare_image_folder(flat, tmp_path / "s1", val_fraction=0.2, labelled=False)
    assert meta["counts"] == {"train": 4, "test": 1} and meta["labelled"] is False and meta["channels"] == 1
    assert _labels(tmp_path / "s1") == [-1] * 5
    with pytest.raises(DataMissingError, match="unlabelled"):  # labelled, a flat folder has no class
        prepare_image_folder(flat, tmp_path / "s2")

    split = tmp_path / "split"
    for name, n in (("train", 3), ("val", 2)):
        (split / name / "any" / "depth").mkdir(parents=True)
        for i in range(n):
            Image.new("L", (8, 8), i).save(split / name / ("any/depth" if i else "") / f"{i}.png")
    (split / "README.txt").write_text("about")
    meta = prepare_image_folder(split, tmp_path / "s3", val_fraction=0.5, labelled=False)
    assert meta["counts"] == {"train": 3, "test": 2}  # the split folders, not val_fraction
    assert {(r["path"], r["reason"]) for r in _rows(tmp_path / "s3")} == {
        (str(split / "README.txt"), "outside the split folders")
    }

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "a.txt").write_text("no images here")
    with pytest.raises(DataMissingError, match=str(empty)):
        prepare_image_folder(empty, tmp_path / "s4", labelled=False)


def test_labelled_folder_meta_says_labelled(tmp_path):
    (tmp_path / "tree" / "a").mkdir(parents=True)
    Image.new("L", (4, 4), 51).save(tmp_path / "tree" / "a" / "0.png")
    meta = prepare_image_folder(tmp_path / "tree", tmp_path / "shards", val_fraction=0.0)
    assert meta["labelled"] is True and meta["num_classes"] == 1 and _labels(tmp_path / "shards") == [0]


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# -------------------------------------------------------------------------------- the CLI
def test_cli_prepares_unlabelled_sets(tmp_path, capsys):
    root = tmp_path / "photos"
    n_images = _messy_tree(root)
    rc = cli_main(
        [
            "data",
            "prepare",
            "folder",
            str(root),
            "--name",
            "photos",
            "--out",
            str(tmp_path / "f"),
            "--unlabelled",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    meta = json.loads((tmp_path / "f" / "meta.json").read_text())
    assert meta["labelled"] is False and sum(meta["counts"].values()) == n_images
    assert "unlabelled, 3 channel(s), mean (" in out and "std (" in out
    assert f"train on it with: bamray train --set data.path={tmp_path / 'f'}" in out
    assert "--set eval.dataset=<labelled set>" in out and "data.channels" not in out

    images = [_png_bytes(Image.new("L", (8, 8), i)) for i in range(4)]
    pq.write_table(pa.table({"image": pa.array(images, pa.binary())}), tmp_path / "u.parquet")
    pq.write_table(
        pa.table({"image": pa.array(images, pa.binary()), "label": [0, 1, 0, 1]}), tmp_path / "l.parquet"
    )
    prepare = ["data", "prepare", "parquet"]
    cases = (
        (["u.parquet"], False),  # no label column: unlabelled without being told
        (["l.parquet"], True),  # a column named "label": used
        (["l.parquet", "--unlabelled"], False),  # forced
    )
    for i, (args, labelled) in enumerate(cases):
        out_dir = tmp_path / f"p{i}"
        rc = cli_main([*prepare, str(tmp_path / args[0]), *args[1:], "--name", "p", "--out", str(out_dir)])
        out = capsys.readouterr().out
        assert rc == 0, out
        assert json.loads((out_dir / "meta.json").read_text())["labelled"] is labelled
        assert ("labelled (2 class(es)), 1 channel(s)" in out) is labelled and (
            "eval.dataset" in out
        ) is not labelled
    with pytest.raises(SystemExit):  # argparse: one or the other
        cli_main(
            [*prepare, str(tmp_path / "l.parquet"), "--name", "p", "--label-column", "label", "--unlabelled"]
        )
