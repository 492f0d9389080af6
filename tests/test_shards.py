"""A one-worker run's worker iterates the datasets its plan carries (``orchestrator.training.shards``): it
takes the driver's Ray Data context with them, keeps one iterator per dataset, and reads every row once.
Real Ray Data on the suite's local Ray."""

from __future__ import annotations

import pytest

from orchestrator.training.shards import Shards, in_worker


def test_only_a_one_worker_run_iterates_in_its_worker():
    assert in_worker(1)
    assert not in_worker(2) and not in_worker(8)
    assert not in_worker(0)  # Ray Train's local mode hands out the datasets itself


def test_the_worker_takes_the_drivers_context_and_reads_each_dataset_whole(ray_local):
    import ray.data
    from ray.data import DataContext

    before = DataContext.get_current()
    driver = before.copy()
    driver.target_max_block_size = 3 * 2**20 + 7  # a value no default has
    try:
        shards = Shards({"train": ray.data.range(10), "knn_val": ray.data.range(3)}, driver)
        assert DataContext.get_current() is driver
        train = shards("train")
        assert shards("train") is train  # one iterator per dataset, as Ray Train keeps its shards
        for _ in range(2):  # every epoch is a new execution over every row
            rows = sorted(int(i) for b in train.iter_batches(batch_format="numpy") for i in b["id"])
            assert rows == list(range(10))
        assert sorted(int(r["id"]) for r in shards("knn_val").iter_rows()) == [0, 1, 2]
        with pytest.raises(KeyError, match="knn_train"):
            shards("knn_train")
    finally:
        DataContext._set_current(before)


def test_without_datasets_in_the_plan_the_context_stays(ray_local):
    from ray.data import DataContext

    before = DataContext.get_current()
    Shards(None, before.copy())
    assert DataContext.get_current() is before
