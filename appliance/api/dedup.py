"""Answer a retried call once: recent answers by request id, bounded in size and age.

A client that retries (``appliance/failover.py``) sends the same ``request_id``. When the retry
reaches a node that already took the call (the answer was lost on the way back, or the first try
is still running), the node returns the first answer instead of classifying (and recording a
decision row, or an escalation) again. The key is the caller's credentials, the method and the
whole request, so one caller's id never returns another caller's answer, and the same id with
other texts is a new call. Only successful answers are kept: a failed call may be retried.

Per node: a retry that lands on another node is answered there (docs/CLUSTER.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar, cast

import grpc
from google.protobuf.message import Message

T = TypeVar("T")

DEFAULT_SIZE = 4096
DEFAULT_TTL_S = 120.0


class RecentAnswers:
    """A bounded, time-limited map from a call's key to its answer (or its call in progress)."""

    def __init__(self, size: int = DEFAULT_SIZE, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self._entries: OrderedDict[bytes, tuple[float, asyncio.Future[object]]] = OrderedDict()
        self.hits = 0

    @staticmethod
    def key(method: str, request: bytes, credentials: Sequence[tuple[str, str | bytes]]) -> bytes:
        digest = hashlib.sha256(method.encode())
        for name, value in sorted((n, v if isinstance(v, bytes) else v.encode()) for n, v in credentials):
            if name == "authorization":
                digest.update(b"\0" + value)
        digest.update(b"\0" + request)
        return digest.digest()

    async def once(self, key: bytes, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``'s answer, or the answer of the same call made recently (awaited if running)."""
        now = time.monotonic()
        self._expire(now)
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            first = await asyncio.shield(entry[1])
            return cast(T, first)  # the same key is the same call, so the same type
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._entries[key] = (now, future)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        try:
            answer = await call()
        except BaseException as exc:
            self._entries.pop(key, None)  # a failure is not remembered: the retry runs again
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
                future.exception()  # retrieved: no "never retrieved" warning when nobody waited
            raise
        future.set_result(answer)
        return answer

    def deduplicated(
        self,
        method: str,
        request: Message,
        context: grpc.aio.ServicerContext,
        call: Callable[[], Awaitable[T]],
    ) -> Callable[[], Awaitable[T]]:
        """``call`` answered once per recent request id; unchanged for a call without one."""
        if not getattr(request, "request_id", ""):
            return call
        key = self.key(
            method, request.SerializeToString(deterministic=True), context.invocation_metadata() or ()
        )
        return lambda: self.once(key, call)

    def _expire(self, now: float) -> None:
        while self._entries:
            first, (stamp, _) = next(iter(self._entries.items()))
            if now - stamp <= self.ttl_s:
                return
            del self._entries[first]
