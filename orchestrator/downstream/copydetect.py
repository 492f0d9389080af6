"""``bamray eval copydetect``: a copy-detection benchmark built from any prepared set, scored on the
embeddings of :mod:`orchestrator.downstream.embed` beside random init and raw pixels.

Each query is a strong copy (:mod:`data.distort`) of a test image; the database holds the originals plus
train images as distractors; a query must find its own original (AP = 1 / its rank).
"""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np

from orchestrator.downstream.commands import (
    ROWS,
    JobOptions,
    _embed,
    _log_figures,
    _t,
    _work_dir,
    ray_for,
    resolve_data,
)
from orchestrator.downstream.embed import Rows, read_embeddings
from orchestrator.downstream.source import Backbone
from trainers.options import ConfigError


def copydetect_command(
    backbone: Backbone,
    *,
    data: str | None = None,
    queries: int = 500,
    distractors: int = 10000,
    seed: int = 0,
    options: JobOptions,
    work_dir: str | None = None,
) -> dict[str, dict[str, float]]:
    """``bamray eval copydetect``: ``queries`` originals from the test split, each distorted into a strong
    copy (:mod:`data.distort`); the database is the originals plus ``distractors`` train images; a query
    must find its own original (AP = 1 / its rank)."""
    from trainers.evaluation.retrieval import NO_MATCH, retrieval_metrics

    if queries < 1:
        raise ConfigError("--queries", f"got {queries}; must be >= 1")
    if distractors < 0:
        raise ConfigError("--distractors", f"got {distractors}; must be >= 0")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bamray-copydetect-") as tmp:
        path, meta = resolve_data(data, backbone, tmp)
        originals, distract, table = build_copy_benchmark(path, meta, queries, distractors, seed)
        parts = _copy_parts(path, originals, distract, table)
        with ray_for(options):
            for kind, _ in ROWS:
                out = _work_dir(work_dir, tmp, f"copydetect-{kind}")
                _embed(backbone, kind, path, parts, out, labelled=True, options=options)
                e = read_embeddings(out)
                db = e["split"] != "query"
                db_keys = np.where(e["split"][db] == "test", e["index"][db], NO_MATCH)  # originals: test rows
                q = e["split"] == "query"
                results[kind] = retrieval_metrics(
                    _t(e["embedding"][q]), _t(e["label"][q]), _t(e["embedding"][db]), _t(db_keys), ks=(1, 10)
                )
                results[kind].update(database=float(db.sum()), distractors=float(len(distract)))
    _log_figures(backbone, "copydetect", results)
    return results


def _copy_parts(path: str, originals: np.ndarray, distract: np.ndarray, table: Any) -> list[Rows]:
    """Originals and distractors read from the shards, the strong copies from memory. The ``split`` column
    says which is which; a row's ``index`` stays its index in its own shard split."""
    return [
        Rows("test", path=path, indices=originals),
        Rows("train", path=path, indices=distract),
        Rows("query", table=table),
    ]


def build_copy_benchmark(
    path: str, meta: dict[str, Any], queries: int, distractors: int, seed: int
) -> tuple[np.ndarray, np.ndarray, Any]:
    """``(original test indices, distractor train indices, query table)``. The query table has the shard
    columns: ``image`` (PNG of the strong copy), ``label`` (the index of its original), ``index``."""
    import pyarrow as pa
    from torchvision.io import encode_png

    from data.distort import distort
    from data.images import decode_image
    from data.shards import read_split_table

    counts = meta.get("counts", {})
    n_test, n_train = int(counts.get("test", 0)), int(counts.get("train", 0))
    if n_test < 2:
        raise ConfigError(
            "--data", f"copy detection takes its originals from the test split; it has {n_test} row(s)"
        )
    if queries > n_test:
        raise ConfigError("--queries", f"got {queries}; the test split has {n_test} images")
    if distractors > n_train:
        raise ConfigError("--distractors", f"got {distractors}; the train split has {n_train} images")
    rng = np.random.default_rng(seed)
    test_index = read_split_table(path, "test", columns=["index"]).column("index").to_numpy()
    order = rng.permutation(test_index)
    train_index = read_split_table(path, "train", columns=["index"]).column("index").to_numpy()
    distract = (
        np.sort(rng.choice(train_index, size=distractors, replace=False)) if distractors else train_index[:0]
    )
    channels = int(meta["channels"])
    decoded: dict[int, Any] = {}
    start = 0
    while len(decoded) < queries and start < len(order):  # corrupt originals are passed over
        take = order[start : start + 2 * (queries - len(decoded))]
        start += len(take)
        rows = read_split_table(
            path, "test", columns=["image", "index"], filters=[("index", "in", take.tolist())]
        )
        for i, data in zip(rows.column("index").to_pylist(), rows.column("image").to_pylist()):
            image = decode_image(data, channels)
            if image is not None and len(decoded) < queries:
                decoded[int(i)] = image
    if len(decoded) < queries:
        raise ConfigError("--queries", f"got {queries}; the test split has {len(decoded)} decodable images")
    originals = np.sort(np.fromiter(decoded, dtype=np.int64))
    images, labels = [], []
    for q, idx in enumerate(originals):
        other = decoded[int(originals[(q + 1) % len(originals)])]  # the pasted patch's source
        copy, _ = distort(decoded[int(idx)], other, seed, int(idx))
        images.append(bytes(encode_png(copy).numpy()))
        labels.append(int(idx))
    table = pa.table(
        {
            "image": pa.array(images, pa.binary()),
            "label": pa.array(labels, pa.int64()),
            "index": pa.array(np.arange(len(images)), pa.int64()),
        }
    )
    return originals, distract, table
