"""Dynamic batching: concurrent requests gathered into one call of a batch function, off the event loop.

As Ray Serve's ``@serve.batch`` and Triton's dynamic batcher: a batch closes when it holds
``max_batch`` requests or ``wait_s`` after its first request arrived, whichever comes first;
worker threads (``threads``, each taking the next closed batch) run the batch function while the
event loop keeps accepting requests. Two threads on two cores overlap one batch's forward pass
with another's search (both release the GIL). The queue is
bounded: past ``max_queue`` waiting requests, :meth:`DynamicBatcher.submit` refuses at once
(:class:`QueueFullError`, an HTTP 503) instead of letting latency pile up.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from deephash.errors import DeephashError

__all__ = ["AsyncBatcher", "BatchStats", "DynamicBatcher", "QueueFullError"]

T = TypeVar("T")
R = TypeVar("R")


class QueueFullError(DeephashError):
    """The batcher's queue is full: the request was not queued (answer 503 with Retry-After)."""


@dataclass
class _Pending:
    item: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


def _settle(future: asyncio.Future, outcome: Any) -> None:
    if future.done():  # cancelled meanwhile (the client left, or the request timed out)
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


@dataclass
class BatchStats:
    """Counters since start: batches run, requests answered in them, requests shed, batch sizes."""

    batches: int = 0
    requests: int = 0
    shed: int = 0
    busy_s: float = 0.0
    largest: int = 0
    max_depth: int = 0

    def as_dict(self, depth: int, max_batch: int, wait_s: float, max_queue: int, threads: int,
                sizes: collections.Counter) -> dict[str, Any]:
        """The JSON of ``/api/health``'s ``batching``."""
        return {"max_batch": max_batch, "batch_wait_ms": wait_s * 1000, "max_queue": max_queue, "threads": threads,
                "queue_depth": depth, "max_queue_depth": self.max_depth, "batches": self.batches,
                "requests": self.requests, "shed": self.shed,
                "mean_batch_size": round(self.requests / self.batches, 3) if self.batches else 0.0,
                "largest_batch": self.largest,
                "mean_batch_ms": round(1000 * self.busy_s / self.batches, 3) if self.batches else 0.0,
                "batch_sizes": {str(size): count for size, count in sorted(sizes.items())}}


class DynamicBatcher(Generic[T, R]):
    """Gathers submitted items into batches for ``process`` on worker threads.

    Args:
        process: ``items -> outcomes``, one per item in order; an outcome that is an exception is
            raised to that item's caller alone. If ``process`` itself raises, every item gets it.
        max_batch: largest batch (>= 1).
        wait_s: seconds a batch waits for more items after its first arrived (>= 0).
        max_queue: most items waiting (>= 1); beyond it :meth:`submit` raises QueueFullError.
        threads: worker threads, each running one batch at a time (>= 1).
    """

    def __init__(self, process: Callable[[Sequence[T]], Sequence[R | BaseException]], max_batch: int = 32,
                 wait_s: float = 0.0, max_queue: int = 256, threads: int = 1) -> None:
        if int(max_batch) < 1:
            raise DeephashError(f"max_batch must be >= 1, got {max_batch}")
        if float(wait_s) < 0:
            raise DeephashError(f"the batch wait must be >= 0 ms, got {wait_s * 1000:g}")
        if int(max_queue) < 1:
            raise DeephashError(f"max_queue must be >= 1, got {max_queue}")
        if int(threads) < 1:
            raise DeephashError(f"the batcher needs >= 1 worker thread, got {threads}")
        self.process = process
        self.max_batch = int(max_batch)
        self.wait_s = float(wait_s)
        self.max_queue = int(max_queue)
        self.threads = int(threads)
        self._queue: collections.deque[tuple[float, _Pending]] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._workers: list[threading.Thread] = []
        self._stats = BatchStats()
        self._sizes: collections.Counter = collections.Counter()

    def start(self) -> DynamicBatcher[T, R]:
        """Start the worker threads; returns self."""
        while len(self._workers) < self.threads:
            worker = threading.Thread(target=self._run, name=f"deephash-batcher-{len(self._workers)}", daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def close(self) -> None:
        """Finish the queued items, then stop the worker threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for worker in self._workers:
            worker.join()
        self._workers = []

    @property
    def depth(self) -> int:
        """Items waiting (not yet in a running batch)."""
        return len(self._queue)

    def stats(self) -> dict[str, Any]:
        """Batch-size statistics and the queue depth (see :class:`BatchStats`)."""
        with self._cond:
            return self._stats.as_dict(len(self._queue), self.max_batch, self.wait_s, self.max_queue, self.threads,
                                      self._sizes.copy())

    def refuse(self, why: str) -> QueueFullError:
        """Count a request refused before it reached the queue (admission control); the error to raise."""
        with self._cond:
            self._stats.shed += 1
        return QueueFullError(why)

    async def submit(self, item: T) -> R:
        """Queue ``item`` and wait for its outcome.

        Raises:
            QueueFullError: ``max_queue`` items are already waiting (nothing was queued).
            DeephashError: the batcher is closed. Whatever ``process`` gave as this item's outcome.
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            if self._closed:
                raise DeephashError("the search service is shutting down")
            if len(self._queue) >= self.max_queue:
                self._stats.shed += 1
                raise QueueFullError(f"the search queue is full ({self.max_queue} requests waiting): retry shortly")
            self._queue.append((time.monotonic(), _Pending(item, future, loop)))
            self._stats.max_depth = max(self._stats.max_depth, len(self._queue))
            self._cond.notify_all()
        return await future

    def _next_batch(self) -> list[_Pending] | None:
        """Block until a batch closes (full, or its first item waited ``wait_s``); None when closed."""
        with self._cond:
            while True:
                while not self._queue:
                    if self._closed:
                        return None
                    self._cond.wait()
                first = self._queue[0]
                deadline = first[0] + self.wait_s
                while len(self._queue) < self.max_batch and not self._closed and self._queue and self._queue[0] is first:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._queue and self._queue[0] is first:  # else another thread took that batch: start over
                    count = min(self.max_batch, len(self._queue))
                    return [self._queue.popleft()[1] for _ in range(count)]

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [p for p in batch if not p.future.cancelled()]
            if not live:
                continue
            tic = time.perf_counter()
            try:
                outcomes = list(self.process([p.item for p in live]))
                if len(outcomes) != len(live):
                    raise RuntimeError(f"the batch function gave {len(outcomes)} outcomes for {len(live)} items")
            except BaseException as error:  # noqa: BLE001 (handed to every caller of the batch)
                outcomes = [error] * len(live)
            with self._cond:
                self._stats.batches += 1
                self._stats.requests += len(live)
                self._stats.busy_s += time.perf_counter() - tic
                self._stats.largest = max(self._stats.largest, len(live))
                self._sizes[len(live)] += 1
            for pending, outcome in zip(live, outcomes):
                try:
                    pending.loop.call_soon_threadsafe(_settle, pending.future, outcome)
                except RuntimeError:  # the event loop is closed: nobody waits any more
                    pass


class AsyncBatcher(Generic[T, R]):
    """:class:`DynamicBatcher`'s rules on the event loop, for a batch function that is a coroutine
    (one that awaits work done elsewhere: encoder processes, :mod:`deephash.serve.encode_process`).

    A batch starts when one of ``concurrency`` slots is free and it holds ``max_batch`` items or
    its first item waited ``wait_s``; while every slot is busy, arrivals gather into the next batch
    (so batches grow with the load). No thread takes part: nothing ever waits for the GIL.

    Args:
        process: ``async items -> outcomes``, one per item in order; an outcome that is an
            exception goes to that item alone; if ``process`` raises, every item gets it.
        max_batch, wait_s, max_queue: as :class:`DynamicBatcher`'s.
        concurrency: batches running at once (>= 1).
    """

    def __init__(self, process: Callable[[Sequence[T]], Awaitable[Sequence[R | BaseException]]], max_batch: int = 32,
                 wait_s: float = 0.0, max_queue: int = 256, concurrency: int = 1) -> None:
        if int(max_batch) < 1 or float(wait_s) < 0 or int(max_queue) < 1 or int(concurrency) < 1:
            raise DeephashError(f"the batcher needs max_batch, max_queue, concurrency >= 1 and a wait >= 0 ms, got "
                                f"{max_batch}, {max_queue}, {concurrency}, {wait_s * 1000:g} ms")
        self.process = process
        self.max_batch, self.wait_s, self.max_queue = int(max_batch), float(wait_s), int(max_queue)
        self.concurrency = int(concurrency)
        self._waiting: collections.deque[tuple[float, T, asyncio.Future]] = collections.deque()
        self._running: set[asyncio.Task] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._stats = BatchStats()
        self._sizes: collections.Counter = collections.Counter()

    @property
    def depth(self) -> int:
        """Items waiting (not yet in a running batch)."""
        return len(self._waiting)

    def stats(self) -> dict[str, Any]:
        """Batch-size statistics and the queue depth (see :class:`BatchStats`); ``threads`` is the concurrency."""
        return self._stats.as_dict(len(self._waiting), self.max_batch, self.wait_s, self.max_queue, self.concurrency,
                                   self._sizes.copy())

    def refuse(self, why: str) -> QueueFullError:
        """Count a request refused before it reached the queue (admission control); the error to raise."""
        self._stats.shed += 1
        return QueueFullError(why)

    async def submit(self, item: T) -> R:
        """Queue ``item`` and wait for its outcome (as :meth:`DynamicBatcher.submit`)."""
        if self._closed:
            raise DeephashError("the search service is shutting down")
        if len(self._waiting) >= self.max_queue:
            self._stats.shed += 1
            raise QueueFullError(f"the search queue is full ({self.max_queue} requests waiting): retry shortly")
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((time.monotonic(), item, future))
        self._stats.max_depth = max(self._stats.max_depth, len(self._waiting))
        self._kick()
        return await future

    def _kick(self) -> None:
        """Start every batch that may start now; else set a timer for when the first one may."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiting and len(self._running) < self.concurrency:
            due = self._waiting[0][0] + self.wait_s
            if len(self._waiting) < self.max_batch and not self._closed and time.monotonic() < due:
                self._timer = asyncio.get_running_loop().call_at(
                    asyncio.get_running_loop().time() + max(0.0, due - time.monotonic()), self._kick)
                return
            batch = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
            task = asyncio.get_running_loop().create_task(self._run([(item, future) for _, item, future in batch]))
            self._running.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._kick()

    async def _run(self, batch: list[tuple[T, asyncio.Future]]) -> None:
        live = [(item, future) for item, future in batch if not future.done()]
        if not live:
            return
        tic = time.perf_counter()
        try:
            outcomes = list(await self.process([item for item, _ in live]))
            if len(outcomes) != len(live):
                raise RuntimeError(f"the batch function gave {len(outcomes)} outcomes for {len(live)} items")
        except asyncio.CancelledError:  # the loop is going away: nobody is left waiting for an answer
            for _, future in live:
                future.cancel()
            raise
        except Exception as error:  # noqa: BLE001 (handed to every caller of the batch)
            outcomes = [error] * len(live)
        self._stats.batches += 1
        self._stats.requests += len(live)
        self._stats.busy_s += time.perf_counter() - tic
        self._stats.largest = max(self._stats.largest, len(live))
        self._sizes[len(live)] += 1
        for (_, future), outcome in zip(live, outcomes):
            _settle(future, outcome)

    async def aclose(self) -> None:
        """Answer the waiting items, then return (no new item is taken)."""
        self._closed = True
        self._kick()
        while self._running or self._waiting:
            await asyncio.gather(*self._running, return_exceptions=True)
            self._kick()
