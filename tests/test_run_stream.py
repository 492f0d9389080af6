"""One Ray Data execution for many epochs (:mod:`data.run_stream`): the per-rank plan, the stream on a real
local Ray over real Fashion-MNIST shards (epoch order, exact rows, views equal to the torch twin's, corrupt
rows counted and stood in for), and that the map actors start once for all epochs."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.config import DataConfig, for_reading
from data.decode_cache import MISS, ROW_OVERHEAD, DecodeCache
from data.pipeline import configure_data_context
from data.run_actors import corrupt_count
from data.run_stream import RunStreamBatch, _started, build_run_stream, epoch_batches, make_plan
from data.shards import read_meta
from data.sources import prepare_fashion_mnist
from data.torch_dataset import MultiCropTorchDataset

N_TRAIN = 300
CORRUPT = 7  # index of the row made undecodable
BATCH = 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory, fmnist_src) -> Path:
    """300 real images in shards of 100 (the last one partial: 100 / 100 / 100), one row made corrupt."""
    out = tmp_path_factory.mktemp("stream") / "fashion-mnist"
    prepare_fashion_mnist(out, src_dir=fmnist_src, shard_size=100, limit=N_TRAIN, test_limit=20)
    part = out / "train" / "part-00000.parquet"
    table = pq.read_table(part)
    images = [
        b"\x89PNG\r\n\x1a\n-garbage" if i == CORRUPT else b
        for i, b in zip(table["index"].to_pylist(), table["image"].to_pylist())
    ]
    pq.write_table(table.set_column(0, "image", pa.array(images, pa.binary())), part)
    return out


def test_plan_gives_each_rank_an_equal_disjoint_share_in_whole_batches(shards):
    cfg = DataConfig(path=str(shards), train_limit=250, map_batch_size=32)
    ranks = [make_plan(cfg, seed=3, rank=r, world=2, batch_size=BATCH) for r in range(2)]
    for epoch in (0, 1):
        shares = []
        for plan in ranks:
            fid, pos = plan.epoch_rows(epoch)
            shares.append({int(plan.indices[f][p]) for f, p in zip(fid, pos)})
            assert len(fid) == 112 == len(shares[-1])  # 250 // 2 = 125 rows, cut to 7 batches of 16
        assert not shares[0] & shares[1]
        assert max(shares[0] | shares[1]) < 250  # train_limit: index < 250
    plan = ranks[0]
    e0, e1 = plan.epoch_rows(0)[1], plan.epoch_rows(1)[1]
    assert not np.array_equal(e0, e1)  # a new order every epoch
    np.testing.assert_array_equal(
        make_plan(cfg, seed=3, rank=0, world=2, batch_size=BATCH).epoch_rows(1)[1], e1
    )
    assert plan.chunks(0) == 4  # 112 rows in chunks of 32
    # an epoch resumed inside it leaves out what its first attempt trained on, the next epoch does not
    seen = np.arange(0, 250, 2)
    resumed = make_plan(cfg, seed=3, rank=0, world=2, batch_size=BATCH, skip={1: seen})
    fid, pos = resumed.epoch_rows(1)
    left = {int(resumed.indices[f][p]) for f, p in zip(fid, pos)}
    assert not left & set(seen.tolist()) and len(left) == 48  # 125 // 2 = 62, cut to 3 batches
    assert resumed.rows_per_epoch(2) == 112
    with pytest.raises(ValueError, match="rank 2"):
        make_plan(cfg, seed=3, rank=2, world=2)


@pytest.mark.ray
def test_stream_runs_many_epochs_in_one_execution_with_the_torch_twins_views(shards, ray_local):
    import ray

    configure_data_context(cpus=3)
    cfg = DataConfig(path=str(shards), map_batch_size=32, map_workers=2, map_cpus=1.0)
    epochs = [0, 1, 2]
    ds, plan = build_run_stream(
        cfg, seed=5, epochs=epochs, batch_size=BATCH, corrupt_counter="stream-corrupt"
    )
    twin = MultiCropTorchDataset(cfg, split="train", seed=5)
    at = {int(i): k for k, i in enumerate(twin.indices)}
    # start=True: the execution begins in a background thread before the first next (as the worker opens it)
    for epoch, batches in epoch_batches(ds, BATCH, epochs, start=True):
        fid, pos = plan.epoch_rows(epoch)
        planned = [int(plan.indices[f][p]) for f, p in zip(fid, pos)]
        got = []
        for b in batches:
            assert b["global"].shape == (BATCH, 2, 1, 28, 28) and b["local"].shape == (BATCH, 6, 1, 12, 12)
            assert (b["epoch"] == epoch).all()
            got += b["index"].tolist()
            twin.set_epoch(epoch)
            for k in (0, BATCH - 1):  # the same views as the DataLoader twin, bit for bit
                i = int(b["index"][k])
                if i != CORRUPT:
                    item = twin[at[i]]
                    np.testing.assert_array_equal(b["global"][k].numpy(), item["global"].numpy())
                    np.testing.assert_array_equal(b["local"][k].numpy(), item["local"].numpy())
                    assert int(b["label"][k]) == int(item["label"])
        assert (
            got == planned and len(got) == 288
        )  # the plan's rows in the plan's order: 300 cut to 18 batches
    assert corrupt_count("stream-corrupt") == 1  # met in 3 epochs, counted once, stood in for (rows kept)
    # one execution: the map actors were started once for all three epochs
    actors = [
        a for a in ray._private.state.actors().values() if "RunStreamBatch" in a.get("ActorClassName", "")
    ]
    assert len(actors) == 2, [a.get("ActorClassName") for a in actors]


def test_a_started_stream_fetches_its_first_item_before_it_is_asked_and_keeps_every_item():
    asked = threading.Event()

    def source():
        asked.set()
        yield from range(5)

    it = _started(source())
    assert asked.wait(10), "the first item was not fetched in the background"
    assert list(it) == [0, 1, 2, 3, 4]
    assert list(_started(iter([]))) == []


def test_a_started_stream_raises_its_error_in_the_consumer_at_the_first_next():
    def broken():
        raise OSError("shard unreadable")
        yield  # pragma: no cover

    it = _started(broken())
    with pytest.raises(OSError, match="shard unreadable"):
        next(it)


def test_the_decode_cache_keeps_to_its_budget_and_evicts_the_least_recently_used_file():
    import torch

    image = torch.zeros((1, 28, 28), dtype=torch.uint8)
    row = ROW_OVERHEAD + 784
    cache = DecodeCache(budget_bytes=3 * row)
    assert cache.get(0, 5) is MISS and cache.misses == 1
    assert cache.put(0, 5, image) and cache.put(0, 6, None)  # a corrupt row is kept as None
    assert cache.get(0, 6) is None and cache.get(0, 5) is image and cache.hits == 2
    assert cache.bytes == row + ROW_OVERHEAD  # a corrupt row costs its overhead only
    assert cache.put(1, 0, image)  # fits beside file 0: 2 rows + 1 overhead <= 3 rows
    assert cache.put(2, 0, image)  # does not fit: file 0, the least recently used, goes whole
    assert cache.get(0, 5) is MISS and cache.get(1, 0) is image and len(cache) == 2
    assert cache.bytes == 2 * row <= cache.budget
    assert cache.put(1, 0, image) and cache.bytes == 2 * row  # a row already kept is not counted twice
    assert not DecodeCache(0).put(0, 0, image)  # 0 = off


@pytest.mark.ray
def test_an_actor_decodes_each_image_once_a_run_and_makes_the_same_views(shards, ray_local):
    """The cache changes where pixels come from, never the views: epoch 1 of an actor with the cache
    decodes nothing and equals, bit for bit, an actor without it; a budget of about one file evicts and
    still gives the same views."""
    from data.run_actors import get_corrupt_counter

    base = DataConfig(path=str(shards), map_batch_size=32)
    base = for_reading(base, read_meta(str(shards)), str(shards))
    plan = make_plan(base, seed=2, batch_size=BATCH)

    def planned(epoch: int) -> set[tuple[int, int]]:  # (file, row) pairs of an epoch
        return set(zip(*(a.tolist() for a in plan.epoch_rows(epoch))))

    assert len(planned(1) & planned(0)) >= 270  # most of epoch 1's 288 rows were met in epoch 0
    counter = get_corrupt_counter("cache-corrupt")
    actors = {
        mb: RunStreamBatch(dataclasses.replace(base, decode_cache_mb=mb), plan, counter) for mb in (256, 0)
    }
    small = RunStreamBatch(base, plan, counter)
    small.cache = DecodeCache(150_000)  # one file of 100 rows is 129,600 bytes
    for epoch in (0, 1):
        block = {"epoch": np.array([epoch]), "chunk": np.array([0]), "chunks": np.array([plan.chunks(epoch)])}
        outs = {name: list(actor(block)) for name, actor in [*actors.items(), ("small", small)]}
        assert len(outs[0]) == 9  # 288 rows in chunks of 32
        for a, b, c in zip(outs[256], outs[0], outs["small"]):
            for key in ("global", "local", "label", "index", "epoch"):
                np.testing.assert_array_equal(a[key], b[key])
                np.testing.assert_array_equal(a[key], c[key])
        # each row is decoded the first time the run meets it (the corrupt one too), then read from the cache
        assert actors[256].cache.misses == len(planned(0) | planned(epoch))
        assert actors[256].cache.hits == (len(planned(1) & planned(0)) if epoch else 0)
        assert actors[0].cache.misses == 288 * (epoch + 1) and len(actors[0].cache) == 0
        assert small.cache.bytes <= 150_000 and small.cache.hits < 288 * epoch + 1
