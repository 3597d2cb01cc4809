"""The micro-batcher: a bounded queue of decoded images, drained by inference threads that share one
model and group concurrent requests into batches. Owns `Batcher`, its queue items and `QueueFull`, the
503 it raises when the queue is full. The server puts one `Batcher` in front of each model instance.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from .protocol import RequestError

log = logging.getLogger("covid_xray.server")  # inference failures are logged as the server's, as before


class QueueFull(RequestError):
    def __init__(self, limit: int):
        super().__init__(503, f"server busy: {limit} requests already in progress; retry shortly")


@dataclass
class _Item:
    image: np.ndarray
    future: Future


class Batcher:
    """Runs `predict` (uint8 N×S×S → one result per image) on micro-batches in `threads` threads sharing one model.

    A batch is sent to the model when it is full, when `max_wait` has passed, or at once when no
    other request is still being decoded: a lone client never pays the wait, concurrent ones share
    a forward pass. Idle threads split what is queued between them, so no core waits while another
    works through a long batch. The queue is bounded so overload turns into fast 503s instead of
    memory growth and ever-longer waits.
    """

    def __init__(self, predict: Callable[[np.ndarray], Sequence[Any]], *, max_batch_size: int = 8,
                 max_wait_s: float = 0.005, queue_size: int = 64, threads: int = 1,
                 initializer: Callable[[], None] | None = None):
        self._predict, self._initializer = predict, initializer
        self.max_batch_size, self.max_wait_s, self.queue_size = max_batch_size, max_wait_s, queue_size
        self._queue: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._incoming = 0  # requests admitted and still decoding
        self._idle = 0  # inference threads looking for work
        self._closed = False
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self._threads = [threading.Thread(target=self._run, name=f"covid-xray-infer-{i}", daemon=True)
                         for i in range(threads)]

    def start(self) -> Batcher:
        for thread in self._threads:
            thread.start()
        return self

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)

    @contextmanager
    def admit(self):
        """Hold a place for a request while it decodes; refuse it (503) when the queue is full."""
        with self._cond:
            if self._closed:
                raise RequestError(503, "server is shutting down")
            if self._incoming + len(self._queue) >= self.queue_size:
                raise QueueFull(self.queue_size)
            self._incoming += 1
        try:
            yield
        finally:
            with self._cond:
                self._incoming -= 1
                self._cond.notify_all()  # a waiting batch may now go without waiting out max_wait

    def submit(self, images: np.ndarray) -> list[Future]:
        with self._cond:
            if len(self._queue) + len(images) > self.queue_size:
                raise QueueFull(self.queue_size)
            items = [_Item(image, Future()) for image in images]
            self._queue.extend(items)
            self._cond.notify_all()
        return [item.future for item in items]

    def stats(self) -> dict[str, Any]:
        with self._cond:
            sizes = dict(sorted(self.batch_sizes.items()))
            queued = len(self._queue)
        n_batches, n_images = sum(sizes.values()), sum(k * v for k, v in sizes.items())
        return {
            "batches": n_batches,
            "images": n_images,
            "mean_batch_size": round(n_images / n_batches, 3) if n_batches else 0.0,
            "max_batch_size_seen": max(sizes, default=0),
            "batch_size_histogram": {str(k): v for k, v in sizes.items()},
            "queued": queued,
            "inference_threads": len(self._threads),
        }

    def _take(self) -> list[_Item] | None:
        with self._cond:
            self._idle += 1
            try:
                while True:
                    while not self._queue and not self._closed:
                        self._cond.wait()
                    if not self._queue:
                        return None  # closed and drained
                    deadline = time.monotonic() + self.max_wait_s
                    while len(self._queue) < self.max_batch_size and self._incoming > 0 and not self._closed:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                    if self._queue:  # another thread may have taken everything meanwhile
                        share = -(-len(self._queue) // self._idle)  # ceil: split the queue among idle threads
                        n = min(share, self.max_batch_size)
                        return [self._queue.popleft() for _ in range(n)]
            finally:
                self._idle -= 1

    def _run(self) -> None:
        if self._initializer:
            self._initializer()
        while (batch := self._take()) is not None:
            live = [item for item in batch if item.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                results = self._predict(np.stack([item.image for item in live]))
            except Exception as e:  # a model failure fails these requests (500), never the thread
                log.exception("inference failed for a batch of %d", len(live))
                for item in live:
                    item.future.set_exception(e)
                continue
            for item, result in zip(live, results):
                item.future.set_result(result)
            with self._cond:
                self.batch_sizes[len(live)] += 1
