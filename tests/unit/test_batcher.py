"""The serving batcher on its own, with a plain Python function standing in for the encoder.

Each test drives a real :class:`Batcher` inside ``asyncio.run``; a gate (a threading event the
runner waits on) holds a batch in the worker thread, so the queue's state is known when the test
acts, with no sleeps to race against.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Sequence

import pytest

from appliance.batching import BatchSettings
from appliance.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from appliance.serve.batcher import Batcher, BatchStats, Item, StatsHook

WAIT = 5.0  # seconds: a bound on waiting for a worker thread, never reached when things work


class Engine:
    """A stand-in runner: records each batch's row tags and answers each row with its tag."""

    def __init__(self, gated: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.started = threading.Event()  # set when a batch reaches the runner
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.fail_with: Exception | None = None

    def __call__(self, items: Sequence[Item]) -> list[str]:
        self.batches.append([item.payload for item in items])
        self.started.set()
        assert self.gate.wait(WAIT), "the test never opened the gate"
        if self.fail_with is not None:
            raise self.fail_with
        return [f"done:{item.payload}" for item in items]

    async def wait_started(self) -> None:
        assert await asyncio.to_thread(self.started.wait, WAIT), "no batch reached the runner"

    def sizes(self) -> list[int]:
        return [len(batch) for batch in self.batches]


def rows(tag: str, lengths: Sequence[int]) -> list[tuple[list[int], str]]:
    return [([7] * length, f"{tag}{i}") for i, length in enumerate(lengths)]


def run(
    engine: Engine,
    test: Callable[[Batcher[str]], Awaitable[None]],
    on_batch: StatsHook | None = None,
    **settings: float,
) -> None:
    async def main() -> None:
        batcher: Batcher[str] = Batcher(engine, BatchSettings(**settings), on_batch=on_batch)
        batcher.start()
        try:
            await test(batcher)
        finally:
            engine.gate.set()
            await batcher.close()

    asyncio.run(main())


def test_batches_are_cut_by_the_padded_token_budget() -> None:
    engine = Engine()

    async def test(batcher: Batcher[str]) -> None:
        # 16 tokens a row: four rows make 64 padded tokens, the budget; a fifth would pass it.
        assert await batcher.submit(rows("r", [16] * 9), None) == [f"done:r{i}" for i in range(9)]

    run(engine, test, max_batch_tokens=64, max_batch_texts=100)
    assert engine.sizes() == [4, 4, 1]


def test_a_batch_groups_texts_of_similar_length() -> None:
    engine = Engine()

    async def test(batcher: Batcher[str]) -> None:
        await batcher.submit(rows("r", [10, 50, 12, 48]), None)

    run(engine, test, max_batch_tokens=100, max_batch_texts=100)
    # The oldest (10 tokens) anchors the first batch and takes the 12; 48 would make 3 * 48 > 100.
    assert engine.batches == [["r0", "r2"], ["r1", "r3"]]


def test_batches_are_cut_by_text_count() -> None:
    engine = Engine()

    async def test(batcher: Batcher[str]) -> None:
        await batcher.submit(rows("r", [3] * 7), None)

    run(engine, test, max_batch_texts=3)
    assert engine.sizes() == [3, 3, 1]


def test_results_map_back_to_their_rows_across_requests() -> None:
    engine = Engine(gated=True)

    async def test(batcher: Batcher[str]) -> None:
        first = asyncio.ensure_future(batcher.submit(rows("a", [5]), None))
        await engine.wait_started()
        # Queued behind the running batch, then cut together and reordered by length.
        pending = [asyncio.ensure_future(batcher.submit(rows(tag, [9, 2, 6]), None)) for tag in "bcd"]
        await asyncio.sleep(0)
        assert batcher.depth == 9
        engine.gate.set()
        assert await first == ["done:a0"]
        for tag, task in zip("bcd", pending, strict=True):
            assert await task == [f"done:{tag}0", f"done:{tag}1", f"done:{tag}2"]

    run(engine, test, max_batch_texts=64)
    # The second batch is anchored on the oldest queued row (9 tokens) and ordered by closeness to it.
    assert engine.batches == [["a0"], ["b0", "c0", "d0", "b2", "c2", "d2", "b1", "c1", "d1"]]


def test_rows_whose_deadline_passed_while_queued_fail_without_running() -> None:
    engine = Engine(gated=True)

    async def test(batcher: Batcher[str]) -> None:
        first = asyncio.ensure_future(batcher.submit(rows("a", [5]), None))
        await engine.wait_started()
        deadline = time.monotonic() + 0.02
        late = asyncio.ensure_future(batcher.submit(rows("late", [5, 5]), deadline))
        patient = asyncio.ensure_future(batcher.submit(rows("ok", [5]), time.monotonic() + 60))
        while time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        engine.gate.set()
        with pytest.raises(DeadlineExceeded):
            await late
        assert await patient == ["done:ok0"]
        assert await first == ["done:a0"]

    run(engine, test)
    assert engine.batches == [["a0"], ["ok0"]]


def test_a_cancelled_submit_leaves_the_queue_and_never_runs() -> None:
    engine = Engine(gated=True)

    async def test(batcher: Batcher[str]) -> None:
        first = asyncio.ensure_future(batcher.submit(rows("a", [5]), None))
        await engine.wait_started()
        waiting = asyncio.ensure_future(batcher.submit(rows("gone", [5, 5]), None))
        kept = asyncio.ensure_future(batcher.submit(rows("kept", [5]), None))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        engine.gate.set()
        assert await kept == ["done:kept0"]
        await first

    run(engine, test)
    assert engine.batches == [["a0"], ["kept0"]]


def test_a_full_queue_refuses_at_once_with_resource_exhausted() -> None:
    engine = Engine(gated=True)

    async def test(batcher: Batcher[str]) -> None:
        first = asyncio.ensure_future(batcher.submit(rows("a", [5]), None))
        await engine.wait_started()
        queued = asyncio.ensure_future(batcher.submit(rows("q", [5] * 4), None))
        await asyncio.sleep(0)
        assert batcher.depth == 4  # the limit: the running batch is no longer queued
        started = time.monotonic()
        with pytest.raises(ResourceExhausted, match="limit is 4"):
            await batcher.submit(rows("over", [5]), None)
        assert time.monotonic() - started < 0.5  # refused without waiting for the engine
        engine.gate.set()
        assert len(await queued) == 4
        await first
        assert await batcher.submit(rows("after", [5] * 4), None) == [f"done:after{i}" for i in range(4)]

    run(engine, test, max_queue_texts=4)
    assert all("over0" not in batch for batch in engine.batches)


def test_close_finishes_queued_work_and_refuses_new_work() -> None:
    engine = Engine(gated=True)

    async def test(batcher: Batcher[str]) -> None:
        first = asyncio.ensure_future(batcher.submit(rows("a", [5]), None))
        await engine.wait_started()
        queued = asyncio.ensure_future(batcher.submit(rows("q", [5, 5]), None))
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0)
        with pytest.raises(Unavailable):
            await batcher.submit(rows("new", [5]), None)
        engine.gate.set()
        assert await first == ["done:a0"]
        assert await queued == ["done:q0", "done:q1"]
        await closing

    run(engine, test)
    assert engine.batches == [["a0"], ["q0", "q1"]]


def test_an_engine_failure_fails_its_batch_only() -> None:
    engine = Engine()

    async def test(batcher: Batcher[str]) -> None:
        engine.fail_with = RuntimeError("engine broke")
        with pytest.raises(RuntimeError, match="engine broke"):
            await batcher.submit(rows("a", [5, 5]), None)
        engine.fail_with = None
        assert await batcher.submit(rows("b", [5]), None) == ["done:b0"]

    run(engine, test)


def test_each_batch_reports_rows_padding_and_queue_depth() -> None:
    engine = Engine()
    seen: list[tuple[BatchStats, int]] = []

    async def test(batcher: Batcher[str]) -> None:
        await batcher.submit(rows("r", [4, 8, 6, 2]), None)

    run(engine, test, on_batch=lambda stats, depth: seen.append((stats, depth)), max_batch_texts=3)
    assert [(s.rows, s.padded_tokens, s.real_tokens, depth) for s, depth in seen] == [
        (3, 3 * 6, 4 + 6 + 2, 1),  # anchored on the 4, then the rows nearest it: the 6 and the 2
        (1, 8, 8, 0),
    ]
