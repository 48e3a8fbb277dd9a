"""Per-model inference statistics, as Triton's ``ModelStatistics`` extension defines them.

Cumulative counts and nanoseconds per loaded model version, taken from the runtime's own timings:

- ``success`` / ``fail``: requests answered / failed once their model was resolved, and the time
  each spent in the runtime (from its arrival to its answer).
- ``compute_input``: tokenization (here it runs before the queue, off the event loop).
- ``queue``: from a request's rows entering the batcher to the first of them starting to run.
- ``compute_infer``: from that start to the end of the last batch holding its rows (encoder and
  heads, which run in one call).
- ``compute_output``: from there to the answer (decisions, the cascade's routing, spans).
- ``inference_count``: texts answered (a text is one element of the batched ``TEXT`` axis);
  ``execution_count``: encoder batches that held rows of the model, warm-up batches included.

Everything is recorded on the event loop's thread (requests run there, and the batcher reports
each batch there), so the counters need no lock. A :class:`RequestTiming` follows one request
through a context variable, so the batching helpers add to it without threading it through.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

ModelKey = tuple[str, int]  # (name, version)

_NS = 1_000_000_000


@dataclass
class Duration:
    """A count and the cumulative nanoseconds of its events (Triton's ``StatisticDuration``)."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += max(int(seconds * _NS), 0)


@dataclass
class ModelCounters:
    last_inference_ms: int = 0  # wall-clock milliseconds since the epoch; 0: never
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)

    def copy(self) -> ModelCounters:
        return ModelCounters(
            self.last_inference_ms,
            self.inference_count,
            self.execution_count,
            *(Duration(d.count, d.ns) for d in self.durations()),
        )

    def durations(self) -> tuple[Duration, ...]:
        return (
            self.success,
            self.fail,
            self.queue,
            self.compute_input,
            self.compute_infer,
            self.compute_output,
        )


@dataclass
class RequestTiming:
    """What one request spent where; filled in by the batching helpers as the request runs."""

    started: float = field(default_factory=time.monotonic)
    tokenize_s: float = 0.0
    queue_s: float = 0.0
    infer_s: float = 0.0
    last_batch_end: float | None = None

    def tokenized(self, seconds: float) -> None:
        self.tokenize_s += seconds

    def batched(self, submitted: float, first_start: float, last_end: float) -> None:
        """One submission of rows to a batcher (monotonic seconds): queued until ``first_start``,
        computed until ``last_end``."""
        self.queue_s += max(first_start - submitted, 0.0)
        self.infer_s += max(last_end - first_start, 0.0)
        self.last_batch_end = max(last_end, self.last_batch_end or last_end)


_current: contextvars.ContextVar[RequestTiming | None] = contextvars.ContextVar(
    "request_timing", default=None
)


def current_request() -> RequestTiming | None:
    """The timing of the request being served in this task, if one is being recorded."""
    return _current.get()


class InferenceStatistics:
    """The counters of every model version this process has served."""

    def __init__(self) -> None:
        self._models: dict[ModelKey, ModelCounters] = {}

    def _counters(self, key: ModelKey) -> ModelCounters:
        counters = self._models.get(key)
        if counters is None:
            counters = self._models[key] = ModelCounters()
        return counters

    @contextmanager
    def request(self, key: ModelKey, texts: int) -> Iterator[RequestTiming]:
        """Time the block as one request of ``texts`` texts to ``key``; an exception is a failure."""
        timing = RequestTiming()
        token = _current.set(timing)
        try:
            yield timing
        except BaseException:
            self._counters(key).fail.add(time.monotonic() - timing.started)
            raise
        else:
            self._succeeded(key, texts, timing, time.monotonic())
        finally:
            _current.reset(token)

    def _succeeded(self, key: ModelKey, texts: int, timing: RequestTiming, ended: float) -> None:
        counters = self._counters(key)
        counters.success.add(ended - timing.started)
        counters.compute_input.add(timing.tokenize_s)
        counters.queue.add(timing.queue_s)
        counters.compute_infer.add(timing.infer_s)
        counters.compute_output.add(ended - (timing.last_batch_end or ended))
        counters.inference_count += texts
        counters.last_inference_ms = int(time.time() * 1000)

    def executed(self, keys: Iterable[ModelKey]) -> None:
        """One encoder batch ran with rows of each of ``keys``."""
        for key in set(keys):
            self._counters(key).execution_count += 1

    def snapshot(self, key: ModelKey) -> ModelCounters:
        """A copy of ``key``'s counters (zeros for a model that has not run yet)."""
        counters = self._models.get(key)
        return counters.copy() if counters is not None else ModelCounters()
