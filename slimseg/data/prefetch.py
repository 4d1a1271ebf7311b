"""Prepare the next batches in a background thread while the current one trains.

A training step on CPU leaves gaps: torch's many small ops synchronise their threads, and the
Python between them holds nobody else up. Loading a batch (PIL and numpy release the GIL) fits
in those gaps. A whole onnxruntime teacher does not on 2 cores (its threads and torch's then
contend); with the student on a GPU it does (see ``finetune.DistillLoader.teacher_ahead``).
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable, Iterator

_DONE = object()


class Prefetcher:
    """Iterate ``loader`` in a thread, ``fn(batch)`` applied there, ``depth`` batches ahead.

    An exception in the thread is raised in the consumer at the batch where it happened.
    Abandoning the iteration (``close()``, or the generator being collected) stops the thread.
    ``dataset``/``sampler`` are the loader's, so ``set_epoch`` reaches them before iteration.
    """

    def __init__(self, loader: Iterable, fn: Callable[[Any], Any] | None = None, *, depth: int = 2):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.loader, self.fn, self.depth = loader, fn, depth
        self.dataset = getattr(loader, "dataset", None)
        self.sampler = getattr(loader, "sampler", None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        items: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(items, stop), daemon=True,
                                  name="slimseg-prefetch")
        worker.start()
        try:
            while True:
                item = items.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            stop.set()
            _drain(items)
            worker.join(timeout=10)

    def _produce(self, items: queue.Queue, stop: threading.Event) -> None:
        try:
            for batch in self.loader:
                if stop.is_set():
                    return
                item = self.fn(batch) if self.fn is not None else batch
                if not _put(items, item, stop):
                    return
        except BaseException as error:  # handed to the consumer, raised there
            _put(items, _Failure(error), stop)
            return
        _put(items, _DONE, stop)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _put(items: queue.Queue, item, stop: threading.Event) -> bool:
    """Put unless the consumer has gone (checked every 0.1 s while the queue is full)."""
    while not stop.is_set():
        try:
            items.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _drain(items: queue.Queue) -> None:
    while True:
        try:
            items.get_nowait()
        except queue.Empty:
            return
