"""A fresh run's first epoch starts before the worker builds its model (orchestrator.training.epoch_data).
The per-epoch stream's clock check needs a Ray: it is in tests/test_ray_data.py."""

from __future__ import annotations

import threading

import pytest

from orchestrator.training.epoch_data import FirstBatch


def test_first_batch_hands_back_the_whole_iterable_in_order():
    pulled = threading.Event()

    def make():
        def gen():
            pulled.set()
            yield from range(5)

        return gen()

    early = FirstBatch(make)
    assert pulled.wait(10)  # pulled in the thread, before anyone takes it
    assert list(early.take()) == [0, 1, 2, 3, 4]


def test_first_batch_of_an_empty_iterable_and_a_refusal():
    assert list(FirstBatch(lambda: iter(())).take()) == []
    assert FirstBatch(lambda: None).take() is None


def test_first_batch_raises_the_threads_error_where_it_is_taken():
    def make():
        def gen():
            raise OSError("shard unreadable")
            yield  # pragma: no cover

        return gen()

    with pytest.raises(OSError, match="shard unreadable"):
        FirstBatch(make).take()
