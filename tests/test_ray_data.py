"""The Ray Data streams on a real local Ray over real Fashion-MNIST shards: the batch contract, corrupt
rows skipped and counted, the epoch clock, bit-for-bit agreement with the torch Dataset twin, and the
class-balanced evaluation subsets."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data.config import DataConfig
from data.pipeline import (
    build_eval_datasets,
    build_train_dataset,
    configure_data_context,
)
from data.run_actors import corrupt_count, get_epoch_clock
from data.sources import prepare_fashion_mnist, read_split_table
from data.torch_dataset import CleanTorchDataset, MultiCropTorchDataset, collate_batch, select_eval_indices

pytestmark = pytest.mark.ray

N_TRAIN, N_TEST = 300, 100
LIMIT = 150  # train_limit of the epoch-clock test: rows 0..149 span the first two shard files
CORRUPT = {5: b"\x89PNG\r\n\x1a\n truncated", 150: b"garbage, not an image"}  # index -> bad bytes


@pytest.fixture(scope="module")
def shards(tmp_path_factory, fmnist_src) -> Path:
    """300 / 100 real images in shards of 100; two train rows (in different shards) made corrupt."""
    out = tmp_path_factory.mktemp("shards") / "fashion-mnist"
    prepare_fashion_mnist(out, src_dir=fmnist_src, shard_size=100, limit=N_TRAIN, test_limit=N_TEST)
    for part in sorted((out / "train").glob("part-*.parquet")):
        table = pq.read_table(part)
        images = table.column("image").to_pylist()
        index = table.column("index").to_pylist()
        if not CORRUPT.keys() & set(index):
            continue
        images = [CORRUPT.get(i, b) for i, b in zip(index, images)]
        table = table.set_column(0, "image", pa.array(images, pa.binary()))
        pq.write_table(table, part)
    return out


@pytest.fixture(scope="module")
def cfg(shards, ray_local) -> DataConfig:
    ctx = configure_data_context(cpus=3)
    before = ctx.execution_options.resource_limits
    yield DataConfig(path=str(shards), map_batch_size=64)
    ctx.execution_options.resource_limits = before


def _collect(ds) -> dict[str, np.ndarray]:
    batches = list(ds.iter_batches(batch_size=100, batch_format="numpy"))
    out = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    order = np.argsort(out["index"])
    return {k: v[order] for k, v in out.items()}


@pytest.fixture(scope="module")
def epoch0(cfg) -> dict[str, np.ndarray]:
    ds = build_train_dataset(cfg, seed=11, epoch_clock="test-clock", corrupt_counter="test-corrupt")
    return _collect(ds)


def test_train_stream_contract_and_corrupt_rows(cfg, epoch0):
    assert set(epoch0) == {"global", "local", "label", "index"}
    n = N_TRAIN - len(CORRUPT)
    assert epoch0["global"].shape == (n, 2, 1, 28, 28) and epoch0["global"].dtype == np.uint8
    assert epoch0["local"].shape == (n, 6, 1, 12, 12) and epoch0["local"].dtype == np.uint8
    assert epoch0["label"].dtype == np.int64 and epoch0["index"].dtype == np.int64
    assert epoch0["index"].tolist() == sorted(set(range(N_TRAIN)) - set(CORRUPT))  # each row once
    labels = read_split_table(cfg.path, "train", columns=["label"]).column("label").to_numpy()
    np.testing.assert_array_equal(epoch0["label"], labels[epoch0["index"]])
    assert corrupt_count("test-corrupt") == len(CORRUPT)


def test_ray_samples_equal_torch_dataset_bit_for_bit(cfg, epoch0):
    twin = MultiCropTorchDataset(cfg, split="train", seed=11)
    assert len(twin) == N_TRAIN
    items = twin.__getitems__(list(range(N_TRAIN)))
    assert [i for i, it in enumerate(items) if it is None] == sorted(CORRUPT)
    assert twin.corrupt_skipped == len(CORRUPT)
    batch = collate_batch(items)
    np.testing.assert_array_equal(batch["index"].numpy(), epoch0["index"])
    np.testing.assert_array_equal(batch["global"].numpy(), epoch0["global"])
    np.testing.assert_array_equal(batch["local"].numpy(), epoch0["local"])
    one = twin[42]  # single item path == batched path == Ray
    k = int(np.flatnonzero(epoch0["index"] == 42)[0])
    assert torch.equal(one["global"], torch.from_numpy(epoch0["global"][k]))
    loader = torch.utils.data.DataLoader(twin, batch_size=50, collate_fn=collate_batch)
    first = next(iter(loader))
    assert (
        first["global"].shape == (49, 2, 1, 28, 28) and first["label"].dtype == torch.int64
    )  # index 5 dropped


def test_epoch_clock_changes_views_and_limit_pushdown(cfg, epoch0):
    # The actor-pool path (the other tests use tasks), small batches: views must not depend on either.
    limited = DataConfig(path=cfg.path, map_batch_size=32, train_limit=LIMIT, map_compute="actors")
    ds = build_train_dataset(limited, seed=11, epoch_clock="test-clock-2", corrupt_counter="test-corrupt-2")
    get_epoch_clock("test-clock-2").set.remote(1)
    got = _collect(ds)
    assert got["index"].tolist() == [i for i in range(LIMIT) if i not in CORRUPT]
    assert corrupt_count("test-corrupt-2") == 1  # only index 5 is below the limit
    twin = MultiCropTorchDataset(limited, seed=11)
    assert len(twin) == LIMIT
    twin.set_epoch(1)
    expected = collate_batch(twin.__getitems__(list(range(LIMIT))))
    np.testing.assert_array_equal(got["global"], expected["global"].numpy())
    np.testing.assert_array_equal(got["local"], expected["local"].numpy())
    # Epoch 1 views differ from epoch 0 views of the same images.
    same = [np.array_equal(got["global"][k], epoch0["global"][k]) for k in range(len(got["index"]))]
    assert not any(same)
    # An epoch resumed inside itself: the clock's skip list leaves those samples out, the rest keep their views.
    skip = np.array([0, 1, 2, 40, 99, 149, 5000])
    get_epoch_clock("test-clock-2").set.remote(1, skip)
    rest = _collect(ds)
    keep = ~np.isin(got["index"], skip)
    np.testing.assert_array_equal(rest["index"], got["index"][keep])
    np.testing.assert_array_equal(rest["global"], got["global"][keep])


def test_eval_datasets_sizes_balance_and_twin(cfg):
    bank, val = build_eval_datasets(
        cfg, train_fraction=0.5, eval_fraction=1.0, seed=3, corrupt_counter="test-corrupt-eval"
    )
    b, v = _collect_eval(bank), _collect_eval(val)
    labels = read_split_table(cfg.path, "train", columns=["label"]).column("label").to_numpy()
    chosen = select_eval_indices(cfg.path, "train", 0.5, 3)
    expected_per_class = {c: max(1, round(0.5 * n)) for c, n in Counter(labels.tolist()).items()}
    assert Counter(labels[chosen].tolist()) == expected_per_class  # class-balanced selection
    corrupt_chosen = [i for i in CORRUPT if i in set(chosen.tolist())]
    assert len(b["label"]) == len(chosen) - len(corrupt_chosen)
    assert corrupt_count("test-corrupt-eval") == len(corrupt_chosen)
    # a run shares one counter between training and k-NN: these rows are not training's skipped ones
    assert corrupt_count("test-corrupt-eval", "eval/train") == len(corrupt_chosen) > 0
    assert corrupt_count("test-corrupt-eval", "train") == 0
    assert b["image"].shape[1:] == (1, 28, 28) and b["image"].dtype == np.uint8
    assert v["image"].shape == (N_TEST, 1, 28, 28)
    test_labels = read_split_table(cfg.path, "test", columns=["label"]).column("label").to_numpy()
    assert sorted(v["label"].tolist()) == sorted(test_labels.tolist())
    # The torch twin selects the same rows and produces the same clean images.
    twin = CleanTorchDataset(cfg, split="train", fraction=0.5, seed=3)
    t = collate_batch([twin[i] for i in range(len(twin))])
    key = lambda img: img.tobytes()  # noqa: E731
    assert sorted(map(key, t["image"].numpy())) == sorted(map(key, b["image"]))
    assert select_eval_indices(cfg.path, "train", 0.5, 4).tolist() != chosen.tolist()  # seed matters


def _collect_eval(ds) -> dict[str, np.ndarray]:
    batches = list(ds.iter_batches(batch_size=100, batch_format="numpy"))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


class _Shard:
    """Stands in for Ray Train's dataset shard: records which epochs' iterators were asked for."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def iter_torch_batches(self, **kwargs) -> list[str]:
        self.asked.append(kwargs["local_shuffle_seed"])
        return ["b0", "b1"]


def _per_epoch_data(clock):
    from orchestrator.config import load_config
    from orchestrator.training.epoch_data import EpochData

    data = EpochData.__new__(EpochData)
    data.cfg, data.rank, data.world = load_config("bam_fmnist"), 0, 1
    data.clock, data.shard, data.stream, data.early = clock, _Shard(), None, None
    data.opened_for = data.end_epoch = None
    return data


def test_the_per_epoch_stream_starts_early_only_on_a_clock_at_epoch_zero_leaving_nothing_out(ray_local):
    """A worker group restarted without a checkpoint may find the clock moved on (or holding a resumed
    epoch's skip list): then it must not pull epoch 0 early, rank 0 sets the clock as usual."""
    import ray

    clock = get_epoch_clock("test-early-clock")
    data = _per_epoch_data(clock)
    assert data._epoch_zero() == ["b0", "b1"]  # a new clock: epoch 0, nothing left out
    ray.get(clock.set.remote(1))
    assert data._epoch_zero() is None
    ray.get(clock.set.remote(0, np.array([3])))
    assert data._epoch_zero() is None
    ray.get(clock.set.remote(0))
    data.start_fresh(end_epoch=2)
    assert list(data.batches(0, 2, None)) == ["b0", "b1"]
    assert data.early is None and len(data.shard.asked) == 2  # handed over, not asked for again
    assert list(data.batches(1, 2, None)) == ["b0", "b1"] and len(data.shard.asked) == 3
    ray.kill(clock)


def test_local_shards_are_size_sampled_in_this_process_not_in_ray_tasks(cfg, monkeypatch):
    """``read_shards`` samples local files for Ray's size estimate in the calling process (no task, no
    pooled process to wait for; the estimate is Ray's function on Ray's fragments), and every row is
    read. Fails when a Ray upgrade renames the private functions the swap relies on."""
    import os

    from ray.data._internal.datasource import parquet_datasource as rpq

    from data.pipeline import read_shards
    from data.shards import split_path

    real, calls = rpq._fetch_parquet_file_info, []

    def counting(fragment, **kwargs):
        calls.append(os.getpid())  # runs in a Ray task's process if sampling went there: not recorded here
        return real(fragment, **kwargs)

    monkeypatch.setattr(rpq, "_fetch_parquet_file_info", counting)
    path = split_path(cfg.path, "train")
    ds = read_shards(path)
    assert calls and set(calls) == {os.getpid()}, calls  # 3 files: Ray samples 2, here, in this process
    assert rpq._fetch_file_infos.__name__ == "_fetch_file_infos"  # Ray's own function is back
    monkeypatch.setattr(rpq, "_fetch_parquet_file_info", real)
    assert ds.count() == N_TRAIN


def test_an_execution_knows_its_cpu_budget_at_its_first_read(ray_local):
    """Ray Data's coordinator client answers its first read with nothing (the question is only sent), so an
    execution would start on a budget of 0 CPUs for a second; with :mod:`data.ray_budget` (applied by
    importing the map callables) the first read waits for the coordinator's answer: this node's CPUs."""
    import time

    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        DefaultAutoscalingCoordinator,
    )
    from ray.data._internal.cluster_autoscaler.default_cluster_autoscaler_v2 import STANDARD_RESOURCE_TYPES

    import data.batch_maps  # noqa: F401 - applies the patch, as in every process running a pipeline
    from data.ray_budget import wait_for_first_reservation

    assert wait_for_first_reservation()  # already applied: nothing changes
    client = DefaultAutoscalingCoordinator(requester_id=f"test-first-read-{time.time_ns()}")
    client.request_resources(resources=[], expire_after_s=60, request_remaining=STANDARD_RESOURCE_TYPES)
    t0 = time.perf_counter()
    first = client.get_reserved_resources()
    assert sum(r.get("CPU", 0.0) for r in first.values()) > 0  # a share of them if other executions run
    assert time.perf_counter() - t0 < 2.0
    assert client.get_reserved_resources() == first  # later reads: Ray's own, the cached answer
    client.cancel_request()
