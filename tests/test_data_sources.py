"""Sources -> shards on real Fashion-MNIST images: IDX parsing, ImageFolder and Parquet sources,
corrupt-file skipping, atomic rewrites and the missing-data messages; unlabelled Parquet and the meta's
mean / std, checked by hand on tiny synthetic sets."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from data.augment import decode_image
from data.config import DataConfig
from data.sources import (
    FASHION_MNIST_CLASSES,
    FORMAT,
    DataMissingError,
    image_stats,
    prepare_fashion_mnist,
    prepare_image_folder,
    prepare_parquet,
    read_idx,
    read_meta,
    read_split_table,
    resolve_shards,
)
from data.torch_dataset import CleanTorchDataset, MultiCropTorchDataset, collate_batch, select_eval_indices
from trainers.evaluation.knn import class_balanced_indices


@pytest.fixture(scope="module")
def idx(fmnist_src: Path) -> dict[str, np.ndarray]:
    return {
        "train_images": read_idx(fmnist_src / "train-images-idx3-ubyte.gz"),
        "train_labels": read_idx(fmnist_src / "train-labels-idx1-ubyte.gz"),
        "test_images": read_idx(fmnist_src / "t10k-images-idx3-ubyte.gz"),
        "test_labels": read_idx(fmnist_src / "t10k-labels-idx1-ubyte.gz"),
    }


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _decoded(table: pa.Table, channels: int = 1) -> list[np.ndarray | None]:
    out = []
    for b in table.column("image").to_pylist():
        t = decode_image(b, channels)
        out.append(None if t is None else t.numpy())
    return out


def test_idx_header_parsed_by_hand(idx):
    assert idx["train_images"].shape == (60000, 28, 28) and idx["train_images"].dtype == np.uint8
    assert idx["test_images"].shape == (10000, 28, 28)
    assert idx["train_labels"].shape == (60000,) and set(np.unique(idx["train_labels"])) == set(range(10))


def test_prepare_fashion_mnist_limited_is_lossless(tmp_path, fmnist_src, idx):
    meta = prepare_fashion_mnist(
        tmp_path / "fm", src_dir=fmnist_src, shard_size=128, limit=300, test_limit=100
    )
    assert meta["counts"] == {"train": 300, "test": 100}
    assert meta["skipped"] == {"train": 0, "test": 0} and meta["skipped_reasons"] == {}
    assert (tmp_path / "fm" / "skipped.csv").read_text() == "split,path,reason,detail\n"
    assert meta["format"] == FORMAT and meta["name"] == "fashion-mnist"
    assert meta["num_classes"] == 10 and meta["class_names"] == list(FASHION_MNIST_CLASSES)
    assert meta["class_names"][0] == "T-shirt/top" and meta["class_names"][9] == "Ankle boot"
    assert meta["channels"] == 1 and meta["image_size"] == 28 and meta["labelled"] is True
    assert len(meta["mean"]) == len(meta["std"]) == 1 and meta["stats_images"] == 300
    assert json.loads((tmp_path / "fm" / "meta.json").read_text()) == meta
    assert read_meta(str(tmp_path / "fm")) == meta
    parts = sorted(p.name for p in (tmp_path / "fm" / "train").iterdir())
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]  # 128 + 128 + 44
    assert pq.read_metadata(tmp_path / "fm" / "train" / "part-00002.parquet").num_rows == 44

    for split, n in (("train", 300), ("test", 100)):
        table = read_split_table(str(tmp_path / "fm"), split)
        assert table.schema.field("image").type == pa.binary()
        assert (
            table.schema.field("label").type == pa.int64() and table.schema.field("index").type == pa.int64()
        )
        assert table.column("index").to_pylist() == list(range(n))
        np.testing.assert_array_equal(table.column("label").to_numpy(), idx[f"{split}_labels"][:n])
        pixels = np.stack([d[0] for d in _decoded(table)])
        np.testing.assert_array_equal(pixels, idx[f"{split}_images"][:n])  # PNG is lossless


def test_prepare_fashion_mnist_full(tmp_path, fmnist_src, idx):
    """The whole 70k set: right counts, 12 + 2 shards, 6000 images per class, in bounded CPU time; its
    meta's mean / std (from 5000 evenly spaced train images) match the full train set's 0.2860 / 0.3530."""
    start = time.process_time()  # CPU time: wall time on a shared machine measures the neighbours
    meta = prepare_fashion_mnist(tmp_path / "fm", src_dir=fmnist_src)
    elapsed = time.process_time() - start
    assert meta["counts"] == {"train": 60000, "test": 10000}
    assert meta["labelled"] is True and meta["channels"] == 1 and meta["stats_images"] == 5000
    assert abs(meta["mean"][0] - 0.2860) < 0.002 and abs(meta["std"][0] - 0.3530) < 0.002, meta
    assert len(list((tmp_path / "fm" / "train").glob("part-*.parquet"))) == 12
    assert len(list((tmp_path / "fm" / "test").glob("part-*.parquet"))) == 2
    labels = read_split_table(str(tmp_path / "fm"), "train", columns=["label"]).column("label").to_numpy()
    assert np.bincount(labels).tolist() == [6000] * 10
    last = read_split_table(str(tmp_path / "fm"), "test").slice(9999, 1)
    np.testing.assert_array_equal(_decoded(last)[0][0], idx["test_images"][9999])
    assert elapsed < 60, f"full prepare took {elapsed:.1f} s of CPU"


def test_reprepare_replaces_stale_shards(tmp_path, fmnist_src):
    prepare_fashion_mnist(tmp_path / "fm", src_dir=fmnist_src, shard_size=100, limit=300, test_limit=10)
    meta = prepare_fashion_mnist(
        tmp_path / "fm", src_dir=fmnist_src, shard_size=100, limit=150, test_limit=10
    )
    assert sorted(p.name for p in (tmp_path / "fm" / "train").iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    assert meta["counts"]["train"] == 150
    assert read_split_table(str(tmp_path / "fm"), "train").num_rows == 150


def test_missing_fashion_mnist_source_says_how_to_get_it(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(DataMissingError) as err:
        prepare_fashion_mnist(tmp_path / "out", src_dir=tmp_path / "src")
    assert isinstance(err.value, FileNotFoundError)
    msg = str(err.value)
    assert "sudo apt-get install dataset-fashion-mnist" in msg and "--src" in msg
    assert "train-images-idx3-ubyte.gz" in msg
    assert not (tmp_path / "out" / "meta.json").exists()


def test_missing_shards_and_resolve(tmp_path, fmnist_src):
    with pytest.raises(DataMissingError, match="run: bamray data prepare fashion-mnist"):
        read_meta(str(tmp_path / "fashion-mnist"))
    cfg = DataConfig(data_root=str(tmp_path), dataset="fashion-mnist")
    assert resolve_shards(cfg) == str(tmp_path / "fashion-mnist")
    assert resolve_shards(DataConfig(path="s3://bucket/fm")) == "s3://bucket/fm"
    meta = prepare_fashion_mnist(tmp_path / "fashion-mnist", src_dir=fmnist_src, limit=20)
    assert read_meta(resolve_shards(cfg)) == meta
    assert read_meta("file://" + str(tmp_path / "fashion-mnist")) == meta  # pyarrow URI path


def _write_tree(base: Path, idx: dict, per_class: dict[str, list[int]], ext_of) -> dict[str, np.ndarray]:
    """Real FMNIST images saved under base/<class>/; returns {file stem: pixels} of the PNG ones."""
    originals = {}
    for cls, ids in per_class.items():
        (base / cls).mkdir(parents=True, exist_ok=True)
        for i in ids:
            arr = idx["train_images"][i]
            ext = ext_of(i)
            Image.fromarray(arr).save(base / cls / f"img{i:05d}{ext}")
            if ext == ".png":
                originals[f"{cls}/{i}"] = arr
    return originals


def test_image_folder_with_split_dirs_skips_corrupt(tmp_path, idx):
    root = tmp_path / "tree"
    train = _write_tree(
        root / "train",
        idx,
        {"bag": [0, 1, 2, 3], "coat": [4, 5, 6], "dress": [7, 8]},
        lambda i: ".jpg" if i % 3 == 0 else ".png",
    )
    _write_tree(root / "val", idx, {"bag": [10, 11], "coat": [12], "dress": [13]}, lambda i: ".png")
    good = (root / "train" / "bag" / "img00001.png").read_bytes()
    (root / "train" / "coat" / "broken.png").write_bytes(good[: len(good) // 2])  # truncated
    (root / "val" / "dress" / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 7)

    meta = prepare_image_folder(root, tmp_path / "shards", shard_size=4, shuffle=False)
    assert meta["skipped"] == {"train": 1, "test": 1}
    assert sum(meta["skipped"].values()) == 2
    assert meta["counts"] == {"train": 9, "test": 4}
    assert meta["class_names"] == ["bag", "coat", "dress"] and meta["num_classes"] == 3
    assert meta["channels"] == 1 and meta["image_size"] == 28
    table = read_split_table(str(tmp_path / "shards"), "train")
    assert table.column("label").to_pylist() == [0, 0, 0, 0, 1, 1, 1, 2, 2]  # sorted files per sorted class
    decoded = _decoded(table)
    # Files sort as img00000..img00003 in "bag": 0 and 3 are JPEG (lossy), 1 and 2 PNG (exact).
    np.testing.assert_array_equal(decoded[1][0], train["bag/1"])
    np.testing.assert_array_equal(decoded[2][0], train["bag/2"])
    jpeg_err = np.abs(decoded[0][0].astype(int) - idx["train_images"][0].astype(int)).mean()
    assert jpeg_err < 8  # re-encoded JPEG pixels stay close to the original
    assert all(d is not None and d.shape == (1, 28, 28) for d in decoded)


def test_image_folder_random_split_is_stratified_and_seeded(tmp_path, idx):
    root = tmp_path / "tree"
    _write_tree(root, idx, {"a": list(range(0, 10)), "b": list(range(10, 20))}, lambda i: ".png")
    (root / "b" / "zz_garbage.png").write_bytes(b"not an image at all")
    (root / "a" / "notes.txt").write_text("ignored: not an image extension")
    m1 = prepare_image_folder(root, tmp_path / "s1", val_fraction=0.2, seed=3)
    m2 = prepare_image_folder(root, tmp_path / "s2", val_fraction=0.2, seed=3)
    assert m2["counts"] == m1["counts"]
    # b has 11 image files (one corrupt): round(0.2*10)=2 + round(0.2*11)=2 go to test.
    assert m1["counts"]["train"] + m1["counts"]["test"] == 20
    assert m1["skipped"]["train"] + m1["skipped"]["test"] == 1
    # the .txt is not counted as a skipped image (as before) but it is listed, as is the corrupt file
    listed = (tmp_path / "s1" / "skipped.csv").read_text()
    assert (
        f"{root / 'a' / 'notes.txt'},not an image," in listed
        and f"{root / 'b' / 'zz_garbage.png'}," in listed
    )
    assert m1["skipped_reasons"] == {"not an image": 1, "corrupt": 1}
    labels = read_split_table(str(tmp_path / "s1"), "test").column("label").to_pylist()
    assert sorted(labels).count(0) == 2 and len(labels) == m1["counts"]["test"]
    t1 = read_split_table(str(tmp_path / "s1"), "test").column("image").to_pylist()
    t2 = read_split_table(str(tmp_path / "s2"), "test").column("image").to_pylist()
    assert t1 == t2  # same seed, same split


def test_image_folder_writes_classes_mixed_not_class_by_class(tmp_path, idx):
    """Shards of a class tree are written in a seeded random order: the first shard and the first
    ``train_limit`` rows hold every class, as they would not if the files went in folder by folder."""
    root = tmp_path / "tree"
    per_class = {c: list(range(k * 12, k * 12 + 12)) for k, c in enumerate(["a", "b", "c", "d"])}
    _write_tree(root, idx, per_class, lambda i: ".png")
    kept = prepare_image_folder(root, tmp_path / "kept", val_fraction=0.0, shard_size=12, shuffle=False)
    mixed = prepare_image_folder(root, tmp_path / "mixed", val_fraction=0.0, shard_size=12, seed=5)
    again = prepare_image_folder(root, tmp_path / "again", val_fraction=0.0, shard_size=12, seed=5)
    assert kept["counts"] == mixed["counts"] == again["counts"] == {"train": 48, "test": 0}
    first = pq.read_table(tmp_path / "kept" / "train" / "part-00000.parquet").column("label").to_pylist()
    assert first == [0] * 12  # folder by folder: the first shard is one class
    table = read_split_table(str(tmp_path / "mixed"), "train")
    labels = table.column("label").to_pylist()
    assert sorted(labels) == [k for k in range(4) for _ in range(12)]  # the same images, relabelled alike
    assert set(labels[:12]) == {0, 1, 2, 3} and labels != sorted(labels)
    assert table.column("index").to_pylist() == list(range(48))  # index still counts in write order
    assert labels == read_split_table(str(tmp_path / "again"), "train").column("label").to_pylist()  # seeded
    got: dict[int, list[bytes]] = {lab: [] for lab in range(4)}
    for lab, pixels in zip(labels, _decoded(table)):
        got[lab].append(pixels[0].tobytes())
    for lab in range(4):  # every image stays with its own class
        assert sorted(got[lab]) == sorted(o.tobytes() for o in idx["train_images"][lab * 12 : lab * 12 + 12])


def test_parquet_source_plain_bytes_and_corrupt_rows(tmp_path, idx):
    images = [_png(idx["train_images"][i]) for i in range(12)]
    images[3] = b"garbage bytes"
    images[7] = None
    labels = idx["train_labels"][:12].astype(np.int64)
    pq.write_table(pa.table({"img": pa.array(images, pa.binary()), "y": labels}), tmp_path / "data.parquet")
    meta = prepare_parquet(
        tmp_path / "data.parquet",
        tmp_path / "shards",
        image_column="img",
        label_column="y",
        val_fraction=0.25,
        seed=0,
    )
    assert meta["counts"]["train"] + meta["counts"]["test"] == 10
    assert meta["skipped"]["train"] + meta["skipped"]["test"] == 2
    assert meta["class_names"] == [str(i) for i in range(int(labels.max()) + 1)]
    rows = {}
    for split in ("train", "test"):
        t = read_split_table(str(tmp_path / "shards"), split)
        for b, y in zip(t.column("image").to_pylist(), t.column("label").to_pylist()):
            rows[decode_image(b, 1).numpy().tobytes()] = y
    for i in (0, 1, 2, 4, 5, 6, 8, 9, 10, 11):
        assert rows[idx["train_images"][i].tobytes()] == labels[i]


def test_parquet_source_hugging_face_struct_and_split_files(tmp_path, idx):
    """HF ``datasets`` layout: data/train-*.parquet + data/test-*.parquet, image = {bytes, path} struct,
    label a ClassLabel whose names are in the schema metadata."""
    names = list(FASHION_MNIST_CLASSES)
    hf_meta = {
        "info": {"features": {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}}
    }
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    (tmp_path / "hf" / "data").mkdir(parents=True)
    for split, start, n in (("train", 0, 8), ("test", 100, 4)):
        structs = [
            {"bytes": _png(idx["train_images"][i]), "path": f"{i}.png"} for i in range(start, start + n)
        ]
        if split == "train":
            structs[2] = {"bytes": _png(idx["train_images"][2])[:60], "path": "cut.png"}  # truncated
        table = pa.table(
            {
                "image": pa.array(structs, image_type),
                "label": pa.array(idx["train_labels"][start : start + n].astype(np.int64)),
            }
        )
        table = table.replace_schema_metadata({"huggingface": json.dumps(hf_meta)})
        pq.write_table(table, tmp_path / "hf" / "data" / f"{split}-00000-of-00001.parquet")
    meta = prepare_parquet("file://" + str(tmp_path / "hf"), tmp_path / "shards")
    assert meta["counts"] == {"train": 7, "test": 4}
    assert meta["skipped"] == {"train": 1, "test": 0}
    assert meta["class_names"] == names
    test = read_split_table(str(tmp_path / "shards"), "test")
    np.testing.assert_array_equal(np.stack([d[0] for d in _decoded(test)]), idx["train_images"][100:104])
    np.testing.assert_array_equal(test.column("label").to_numpy(), idx["train_labels"][100:104])


def test_missing_sources_raise_data_missing(tmp_path):
    with pytest.raises(DataMissingError):
        prepare_image_folder(tmp_path / "none", tmp_path / "out")
    with pytest.raises(DataMissingError):
        prepare_parquet(tmp_path / "none.parquet", tmp_path / "out")


# ------------------------------------------------------------- unlabelled Parquet; mean / std
def _all_labels(shards: Path) -> list[int]:
    """Every label of both splits (an empty split is a table without columns)."""
    tables = [read_split_table(str(shards), split) for split in ("train", "test")]
    return [y for t in tables if t.num_rows for y in t.column("label").to_pylist()]


def test_parquet_without_label_column_is_unlabelled(tmp_path):
    images = [_png(np.full((8, 8), 10 * i, np.uint8)) for i in range(10)]
    images[4] = b"junk"
    pq.write_table(pa.table({"image": pa.array(images, pa.binary())}), tmp_path / "nolabel.parquet")
    meta = prepare_parquet(
        tmp_path / "nolabel.parquet", tmp_path / "shards", label_column=None, val_fraction=0.3
    )
    assert meta["counts"]["train"] + meta["counts"]["test"] == 9 and meta["counts"]["test"] in (2, 3)
    assert sum(meta["skipped"].values()) == 1 and meta["skipped_reasons"] == {"corrupt": 1}
    assert meta["labelled"] is False and meta["num_classes"] == 0 and meta["class_names"] == []
    assert _all_labels(tmp_path / "shards") == [-1] * 9
    with pytest.raises(ValueError, match="no label column 'label'"):  # labelled (the default) needs one
        prepare_parquet(tmp_path / "nolabel.parquet", tmp_path / "other")
    # a label column is ignored when asked to: every row counts, even those without a label
    pq.write_table(
        pa.table({"image": pa.array(images[:4], pa.binary()), "label": [0, None, 1, 7]}),
        tmp_path / "l.parquet",
    )
    meta = prepare_parquet(tmp_path / "l.parquet", tmp_path / "ignored", label_column=None, val_fraction=0.0)
    assert meta["counts"] == {"train": 4, "test": 0} and _all_labels(tmp_path / "ignored") == [-1] * 4


# ------------------------------------------------------------------------------------ mean / std
def test_meta_mean_std_by_hand(tmp_path):
    """Pixel-weighted population statistics: a 2x2 image of 51 (0.2) and a 4x4 one of 204 (0.8) give
    mean (4 * 0.2 + 16 * 0.8) / 20 = 0.68 and std sqrt((4 * 0.04 + 16 * 0.64) / 20 - 0.68^2) = 0.24."""
    gray = tmp_path / "gray" / "x"
    gray.mkdir(parents=True)
    Image.new("L", (2, 2), 51).save(gray / "a.png")
    Image.new("L", (4, 4), 204).save(gray / "b.png")
    meta = prepare_image_folder(tmp_path / "gray", tmp_path / "g", val_fraction=0.0)
    assert meta["channels"] == 1 and meta["stats_images"] == 2
    np.testing.assert_allclose(meta["mean"], [0.68], atol=1e-12)
    np.testing.assert_allclose(meta["std"], [0.24], atol=1e-12)
    assert json.loads((tmp_path / "g" / "meta.json").read_text())["mean"] == meta["mean"]

    # RGB, one value per channel: R 255 / 0 -> mean 0.5 std 0.5; G 0 -> 0, 0; B 51 / 153 -> 0.4, 0.2
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    Image.new("RGB", (3, 3), (255, 0, 51)).save(rgb / "a.png")
    Image.new("RGB", (3, 3), (0, 0, 153)).save(rgb / "b.png")
    meta = prepare_image_folder(rgb, tmp_path / "c", val_fraction=0.0, labelled=False)
    assert meta["channels"] == 3 and meta["stats_images"] == 2
    np.testing.assert_allclose(meta["mean"], [0.5, 0.0, 0.4], atol=1e-12)
    np.testing.assert_allclose(meta["std"], [0.5, 0.0, 0.2], atol=1e-12)


def test_image_stats_samples_evenly_and_reads_older_shards(tmp_path):
    """Up to ``max_images`` evenly spaced rows; works on shards whose meta has no mean/std and on URIs."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for i, value in enumerate((51, 0, 0, 0, 204)):
        Image.new("L", (2, 2), value).save(tree / f"{i}.png")
    prepare_image_folder(
        tree, tmp_path / "s", val_fraction=0.0, labelled=False, shuffle=False
    )  # rows 0..4 in file order
    meta_path = tmp_path / "s" / "meta.json"
    old = {
        k: v for k, v in json.loads(meta_path.read_text()).items() if k not in ("mean", "std", "stats_images")
    }
    meta_path.write_text(json.dumps(old))  # as written before the statistics existed
    mean, std, n = image_stats(str(tmp_path / "s"), 1, max_images=2)  # rows 0 and 4
    assert n == 2
    np.testing.assert_allclose(mean, [0.5])
    np.testing.assert_allclose(std, [0.3])
    mean3, std3, n = image_stats("file://" + str(tmp_path / "s"), 3)  # all 5; gray repeated to RGB
    assert n == 5
    np.testing.assert_allclose(mean3, [0.2] * 3)
    np.testing.assert_allclose(std3, [np.sqrt((0.6**2 + 3 * 0.2**2) / 5)] * 3)  # deviations 0, 0.6, 3 x -0.2
    with pytest.raises(ValueError, match="channels"):
        image_stats(str(tmp_path / "s"), 2)


def test_empty_train_split_has_no_stats(tmp_path):
    """All images in the test folder: meta says so (None) instead of failing the prepare."""
    for split in ("train", "val"):
        (tmp_path / "tree" / split).mkdir(parents=True)
    Image.new("L", (4, 4), 9).save(tmp_path / "tree" / "val" / "0.png")
    meta = prepare_image_folder(tmp_path / "tree", tmp_path / "s", labelled=False)
    assert meta["counts"] == {"train": 0, "test": 1}
    assert meta["mean"] is None and meta["std"] is None and meta["stats_images"] == 0
    with pytest.raises(DataMissingError, match="empty"):
        image_stats(str(tmp_path / "s"), 1)


# ---------------------------------------------------------------- the Ray-free torch twins
def test_torch_dataset_module_does_not_import_ray():
    """The bare loop, the evaluation commands and the benchmarks read shards without a cluster."""
    code = "import data.torch_dataset, sys; assert 'ray' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_torch_twins_select_balanced_rows_and_collate(tmp_path, fmnist_src, idx):
    prepare_fashion_mnist(tmp_path / "fm", src_dir=fmnist_src, shard_size=100, limit=200, test_limit=50)
    cfg = DataConfig(path=str(tmp_path / "fm"), train_limit=150)
    chosen = select_eval_indices(cfg.path, "train", 0.5, seed=3, limit=cfg.train_limit)
    labels = idx["train_labels"][:150]
    expected = np.sort(class_balanced_indices(labels, 0.5, seed=3))  # index == row for Fashion-MNIST shards
    np.testing.assert_array_equal(chosen, expected)
    assert select_eval_indices(cfg.path, "test", 1.0, seed=3) is None  # everything: no filter at all

    clean = CleanTorchDataset(cfg, split="train", fraction=0.5, seed=3)
    batch = collate_batch([clean[i] for i in range(len(clean))])
    assert batch["image"].shape == (len(chosen), 1, 28, 28) and batch["image"].dtype == torch.uint8
    np.testing.assert_array_equal(batch["label"].numpy(), labels[chosen])
    np.testing.assert_array_equal(batch["image"][:, 0].numpy(), idx["train_images"][chosen])  # 28 px: as is

    train = MultiCropTorchDataset(cfg, split="train", seed=0)
    assert len(train) == 150
    train.set_epoch(2)
    items = train.__getitems__([0, 7])
    assert collate_batch(items + [None])["index"].tolist() == [0, 7]  # None (corrupt) rows are dropped
    assert torch.equal(items[1]["global"], train[7]["global"])  # batched == one at a time
    assert collate_batch([None]) == {}
