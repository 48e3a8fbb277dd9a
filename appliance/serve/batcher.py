"""Dynamic batching by token budget and length, with a bounded queue and a bounded wait.

Every text is one item. When the engine is free, a batch is cut from the queue: the oldest item
anchors it (so nothing starves), and the queued items nearest to it in length fill it until the
padded token count (``longest * rows``) would pass ``max_batch_tokens`` or the row count passes
``max_batch_texts``. Padding is the main cost on CPU, so grouping by length is what makes large
batches pay. The batch runs in a worker thread; the event loop keeps admitting requests
meanwhile, so under load batches form by themselves and at low load nothing waits (unless
``max_wait_ms`` asks to, trading latency for fuller batches).

A full queue rejects at once with RESOURCE_EXHAUSTED instead of growing latency without bound,
and items whose deadline passed while queued are failed without being run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from appliance.batching import BatchSettings
from appliance.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from appliance.serve.statistics import current_request

T = TypeVar("T")


@dataclass
class Item:
    tokens: list[int]
    payload: Any  # whatever the runner needs per row (e.g. the head slot)
    deadline: float | None  # time.monotonic() seconds
    future: asyncio.Future[Any]
    enqueued: float = field(default_factory=time.monotonic)
    started: float = 0.0  # when its batch started and finished running (monotonic), once it ran
    finished: float = 0.0

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class BatchStats:
    rows: int
    padded_tokens: int
    real_tokens: int
    wall_seconds: float
    payloads: tuple[Any, ...] = ()  # the rows' payloads, in batch order


Runner = Callable[[Sequence[Item]], Sequence[T]]
StatsHook = Callable[[BatchStats, int], None]


class Batcher(Generic[T]):
    """Runs ``runner(items) -> results`` (one result per item, same order) on batches of items."""

    def __init__(
        self,
        runner: Runner[T],
        policy: BatchSettings,
        name: str = "batcher",
        on_batch: StatsHook | None = None,
    ) -> None:
        self._runner = runner
        self.policy = policy
        self._queue: list[Item] = []
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=policy.concurrent_batches, thread_name_prefix=name)
        self._slots = asyncio.Semaphore(policy.concurrent_batches)
        self._running: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._on_batch = on_batch

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, rows: Sequence[tuple[list[int], Any]], deadline: float | None) -> list[T]:
        """Queue one request's rows; returns their results in order."""
        if self._closed:
            raise Unavailable("the server is shutting down")
        if len(self._queue) + len(rows) > self.policy.max_queue_texts:
            raise ResourceExhausted(
                f"overloaded: {len(self._queue)} texts queued, the limit is "
                f"{self.policy.max_queue_texts}; retry with backoff"
            )
        loop = asyncio.get_running_loop()
        items = [Item(tokens, payload, deadline, loop.create_future()) for tokens, payload in rows]
        self._queue.extend(items)
        self._wakeup.set()
        try:
            results = list(await asyncio.gather(*(item.future for item in items)))
        except asyncio.CancelledError:
            for item in items:  # the caller gave up: don't spend the engine on it
                item.future.cancel()
            raise
        timing = current_request()
        if timing is not None:
            timing.batched(items[0].enqueued, min(i.started for i in items), max(i.finished for i in items))
        return results

    def _cut(self) -> list[Item]:
        now = time.monotonic()
        live: list[Item] = []
        for item in self._queue:
            if item.future.done():
                continue
            if item.deadline is not None and now >= item.deadline:
                item.future.set_exception(DeadlineExceeded("deadline expired while queued"))
                continue
            live.append(item)
        if not live:
            self._queue = []
            return []
        anchor = live[0]
        by_closeness = sorted(live, key=lambda it: (abs(it.length - anchor.length), it.enqueued))
        batch: list[Item] = []
        longest = 0
        for item in by_closeness:
            width = max(longest, item.length)
            if batch and (
                len(batch) + 1 > self.policy.max_batch_texts
                or width * (len(batch) + 1) > self.policy.max_batch_tokens
            ):
                continue
            batch.append(item)
            longest = width
            if len(batch) >= self.policy.max_batch_texts:
                break
        chosen = {id(item) for item in batch}
        self._queue = [item for item in live if id(item) not in chosen]
        return batch

    def _queued_tokens(self) -> int:
        return sum(item.length for item in self._queue)

    async def _loop(self) -> None:
        while not (self._closed and not self._queue):
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.policy.max_wait_ms > 0:
                first = min(item.enqueued for item in self._queue)
                wait = first + self.policy.max_wait_ms / 1000.0 - time.monotonic()
                full = (
                    len(self._queue) >= self.policy.max_batch_texts
                    or self._queued_tokens() >= self.policy.max_batch_tokens
                )
                if wait > 0 and not full:
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), timeout=wait)
                    continue
            await self._slots.acquire()  # cut only when a worker is free: the queue fills meanwhile
            batch = self._cut()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        if self._running:
            await asyncio.gather(*self._running)

    async def _run(self, batch: list[Item]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        began = time.monotonic()
        for item in batch:
            item.started = began
        try:
            results = await loop.run_in_executor(self._executor, self._runner, batch)
        except Exception as exc:  # an engine failure fails this batch, not the server
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        finally:
            self._slots.release()
        wall = time.perf_counter() - started
        ended = time.monotonic()
        for item, result in zip(batch, results, strict=True):
            item.finished = ended
            if not item.future.done():
                item.future.set_result(result)
        if self._on_batch is not None:
            longest = max(item.length for item in batch)
            payloads = tuple(item.payload for item in batch)
            stats = BatchStats(len(batch), longest * len(batch), sum(i.length for i in batch), wall, payloads)
            self._on_batch(stats, len(self._queue))

    async def close(self) -> None:
        """Finish what is queued, then stop; new submissions get UNAVAILABLE."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)
