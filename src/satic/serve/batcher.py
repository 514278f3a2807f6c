"""Dynamic batching: requests that can be decoded together wait a few milliseconds for each other.

The event loop only queues and hands out; every batch runs in one worker thread (decoding and feature
extraction are CPU- or GPU-bound and would stall the loop). A batch is the oldest queued request plus
the later ones with the same key (model and decoding options), in arrival order, up to `max_batch`
images; it starts once it is full or its oldest request has waited `max_wait_s`, whichever comes
first. While a batch runs, new requests queue and form the next one. The queue holds at most
`max_queue` images; a request that does not fit is refused at once (`QueueFull`), never dropped later.
Once `drain()` is called (the server is stopping) no batch waits for company: the queue is decoded at once.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Hashable, Sequence


class QueueFull(Exception):
    """No room for the request's images in the queue; the caller should retry shortly."""


class BatchFailed(Exception):
    """The batch a request was decoded in raised; every request of that batch gets this error."""


class ShuttingDown(BatchFailed):
    """The server stopped before the request's batch ran; the caller should retry on another replica or later."""


@dataclass
class Job:
    key: Hashable
    items: list  # one entry per image
    future: asyncio.Future
    arrived: float  # loop time


async def unless(work: Awaitable, stop: Awaitable) -> asyncio.Future:
    """Run `work` until it ends or `stop` does, whichever comes first; the other is cancelled -> `work`'s future
    (done with its result, or cancelled, or a task still unwinding its cancellation)."""
    done, stopper = asyncio.ensure_future(work), asyncio.ensure_future(stop)
    try:
        await asyncio.wait((done, stopper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not done.done():
            done.cancel()
    return done


class Batcher:
    """Queues `submit(key, items)` calls and runs `run_batch(key, items) -> one result per item` on
    merged batches in one worker thread; each caller gets back its own results, in order.
    `recent_batches` holds (key, images) of the latest batches, for tests and logs; `on_batch(key, images,
    seconds)`, when given, hears of every batch that succeeded."""

    def __init__(self, run_batch: Callable[[Hashable, list], Sequence], max_batch: int = 32,
                 max_wait_s: float = 0.005, max_queue: int = 256,
                 on_batch: Callable[[Hashable, int, float], None] | None = None):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_s >= 0")
        self.run_batch = run_batch
        self.on_batch = on_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.recent_batches: collections.deque = collections.deque(maxlen=1000)
        self._pending: list[Job] = []
        self._queued_images = 0
        self._arrived: asyncio.Event | None = None
        self._abandoned: asyncio.Event | None = None  # set by abandon(): nothing waits for the worker thread any more
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="satic-decode")
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._decoding: list[Job] = []  # the jobs of the batch on the worker thread
        self._closed = False
        self._running = 0  # calls on the worker thread not yet returned

    @property
    def queued_images(self) -> int:
        return self._queued_images

    @property
    def busy(self) -> bool:
        """Whether the worker thread is still running a batch (or an extraction)."""
        return self._running > 0

    def start(self) -> None:
        """Start the scheduling task on the running event loop."""
        self._arrived = asyncio.Event()
        self._abandoned = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._schedule(), name="satic-batcher")

    def drain(self) -> None:
        """Stop waiting for requests to join a batch: what is queued, and what still arrives, is decoded at once.
        Safe to call from a signal handler or another thread."""
        self._draining = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._arrived.set)

    def abandon(self) -> None:
        """Answer every request still waiting, queued or in the batch being decoded, with ShuttingDown now (that
        batch's thread is not waited for). Safe to call from a signal handler or another thread."""
        self.drain()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._fail_waiting)

    def _fail_waiting(self) -> None:
        self._abandoned.set()
        for job in [*self._pending, *self._decoding]:
            if not job.future.done():
                job.future.set_exception(ShuttingDown("the server was told to stop at once"))

    async def close(self) -> None:
        """Stop scheduling: requests still queued get ShuttingDown. A batch still running is not waited for
        (its requests have had the server's shutdown time); `busy` says whether one is."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(ShuttingDown("the server is shutting down"))
        self._pending.clear()
        self._queued_images = 0
        self._worker.shutdown(wait=False, cancel_futures=True)

    async def in_worker(self, fn: Callable, *args: Any) -> Any:
        """Run other CPU-bound work (image decoding, feature extraction) on the decoding thread, so it
        takes turns with the batches instead of competing with them for cores. Once abandon() is called, its
        caller gets ShuttingDown at once, even while the work waits for a batch to end; work cancelled before it
        starts never runs."""
        if self._abandoned.is_set():  # an idle thread would start the work before it could be cancelled
            raise ShuttingDown("the server was told to stop at once")
        work = await unless(asyncio.get_running_loop().run_in_executor(self._worker, self._counted, fn, *args),
                            self._abandoned.wait())
        if work.cancelled():  # abandoned first (an executor's future is cancelled at once)
            raise ShuttingDown("the server was told to stop at once")
        return work.result()

    def _counted(self, fn: Callable, *args: Any) -> Any:
        self._running += 1  # only the one worker thread writes it
        try:
            return fn(*args)
        finally:
            self._running -= 1

    async def submit(self, key: Hashable, items: list) -> "BatchResult":
        """The results for `items`, decoded in a batch with other requests of the same key; raises
        QueueFull at once when there is no room, ShuttingDown once closed or abandoned, BatchFailed when its batch
        raised."""
        if self._task is None:
            raise RuntimeError("Batcher.start() was not called")
        if self._closed:
            raise ShuttingDown("the server is shutting down")
        if self._abandoned.is_set():  # else queued, its batch refused by in_worker: a BatchFailed, a 500
            raise ShuttingDown("the server was told to stop at once")
        if self._queued_images + len(items) > self.max_queue:
            raise QueueFull(f"the queue is full ({self._queued_images} of {self.max_queue} images waiting)")
        loop = asyncio.get_running_loop()
        job = Job(key, list(items), loop.create_future(), loop.time())
        self._pending.append(job)
        self._queued_images += len(job.items)
        self._arrived.set()
        try:
            return await job.future
        except asyncio.CancelledError:  # its client has gone: its images leave the queue now
            if any(queued is job for queued in self._pending):
                self._pending = [queued for queued in self._pending if queued is not job]
                self._queued_images -= len(job.items)
                self._arrived.set()
            raise

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            oldest = self._pending[0]
            deadline = oldest.arrived + self.max_wait_s
            while (not self._draining and self._images_with(oldest.key) < self.max_batch
                   and any(job is oldest for job in self._pending) and (left := deadline - loop.time()) > 0):
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            if any(job is oldest for job in self._pending):  # else its client left: the next oldest waits its own time
                await self._run(self._take(oldest.key))

    def _images_with(self, key: Hashable) -> int:
        return sum(len(job.items) for job in self._pending if job.key == key)

    def _take(self, key: Hashable) -> list[Job]:
        """The oldest job with `key` and the later ones that still fit in max_batch images (a request
        larger than max_batch is a batch of its own); the others stay queued in order."""
        taken: list[Job] = []
        images = 0
        for job in self._pending:
            if job.key != key:
                continue
            if taken and images + len(job.items) > self.max_batch:
                break
            taken.append(job)
            images += len(job.items)
        chosen = {id(job) for job in taken}
        self._pending = [job for job in self._pending if id(job) not in chosen]
        self._queued_images -= images
        return taken

    async def _run(self, jobs: list[Job]) -> None:
        jobs = [job for job in jobs if not job.future.done()]  # the client of a cancelled one has gone
        if not jobs:
            return
        key = jobs[0].key
        items = [item for job in jobs for item in job.items]
        self.recent_batches.append((key, len(items)))
        started = time.perf_counter()
        self._decoding = jobs
        try:
            results = await self.in_worker(self.run_batch, key, items)
            if len(results) != len(items):
                raise RuntimeError(f"the batch gave {len(results)} results for {len(items)} images")
        except Exception as err:  # one batch's failure is its requests' failure, not the server's
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(BatchFailed(f"{type(err).__name__}: {err}"))
            return
        finally:
            self._decoding = []
        seconds = time.perf_counter() - started
        if self.on_batch is not None:
            self.on_batch(key, len(items), seconds)
        start = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result(BatchResult(list(results[start:start + len(job.items)]), len(items), seconds))
            start += len(job.items)


@dataclass
class BatchResult:
    results: list  # this request's results, in the order of its items
    batch_images: int  # images decoded in its batch (its own and others')
    batch_seconds: float  # time of that batch in the worker
