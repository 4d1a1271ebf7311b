import threading
import time

import pytest

from slimseg.data.prefetch import Prefetcher


class Epochs:
    """A loader whose batches depend on the epoch set before iteration."""

    def __init__(self, n):
        self.n, self.epoch = n, None
        self.dataset = self

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        for i in range(self.n):
            yield (self.epoch, i)


def test_batches_come_in_order_with_fn_applied_in_the_thread():
    seen = []

    def fn(batch):
        seen.append(threading.current_thread().name)
        return batch + (batch[1] * 10,)

    loader = Epochs(5)
    prefetched = Prefetcher(loader, fn, depth=2)
    prefetched.dataset.set_epoch(3)  # what train() does before iterating
    assert list(prefetched) == [(3, i, i * 10) for i in range(5)]
    assert set(seen) == {"slimseg-prefetch"}


def test_an_error_in_the_thread_is_raised_in_the_consumer():
    def fn(batch):
        if batch[1] == 2:
            raise ValueError("bad batch 2")
        return batch

    got = []
    with pytest.raises(ValueError, match="bad batch 2"):
        for b in Prefetcher(Epochs(5), fn):
            got.append(b[1])
    assert got == [0, 1]


def test_stopping_early_ends_the_thread():
    produced = []

    def slow(batch):
        produced.append(batch)
        return batch

    it = iter(Prefetcher(Epochs(1000), slow, depth=1))
    next(it)
    it.close()
    time.sleep(0.3)
    assert not any(t.name == "slimseg-prefetch" for t in threading.enumerate())
    assert len(produced) < 10


def test_depth_must_be_positive():
    with pytest.raises(ValueError):
        Prefetcher([], depth=0)
