"""The one way in and out of every servicer method: errors become statuses, calls become metrics.

Each servicer (``appliance.v1`` and KServe v2) owns a :class:`Boundary` named after its service and
runs each method's body through :meth:`Boundary.unary` or :meth:`Boundary.stream`. There:

- an exception becomes the status :func:`appliance.errors.status_of` assigns it (an ApplianceError
  its own code, a timeout DEADLINE_EXCEEDED, a cancellation CANCELLED, a bug INTERNAL, logged
  once with its traceback; grpc's UNKNOWN never reaches a caller);
- the call is counted and timed by service, method, model label and final status. The model
  label comes from :meth:`ServingMetrics.model_label`, so invented names cannot grow the registry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from appliance.errors import context_code, status_of
from appliance.serve.metrics import ServingMetrics

log = logging.getLogger(__name__)

T = TypeVar("T")


class Boundary:
    def __init__(self, service: str, metrics: ServingMetrics | None, default_label: str = "") -> None:
        """``default_label``: the model label of calls that name no model (``model=None``)."""
        self.service = service
        self.metrics = metrics
        self.default_label = default_label

    async def unary(
        self,
        context: grpc.aio.ServicerContext,
        method: str,
        call: Callable[[], Awaitable[T]],
        model: str | None = None,
    ) -> T:
        """Answer with ``call()``'s result or the status its exception maps to.
        ``model``: the caller's model reference, if the method takes one."""
        started = time.perf_counter()
        try:
            result = await call()
        except grpc.aio.AbortError:
            self._observe(method, model, context_code(context) or grpc.StatusCode.UNKNOWN, started)
            raise
        except (Exception, asyncio.CancelledError) as exc:
            await self._fail(context, method, model, started, exc)
            raise AssertionError("unreachable: _fail raises") from exc
        # counted before the answer leaves, so a caller who has it can read the count
        self._observe(method, model, grpc.StatusCode.OK, started)
        return result

    async def stream(
        self,
        context: grpc.aio.ServicerContext,
        method: str,
        responses: Callable[[], AsyncIterator[T]],
        model: str | None = None,
    ) -> AsyncIterator[T]:
        """Yield what ``responses()`` yields; an exception at any point ends the stream with its status."""
        started = time.perf_counter()
        try:
            async for response in responses():
                yield response
        except grpc.aio.AbortError:
            self._observe(method, model, context_code(context) or grpc.StatusCode.UNKNOWN, started)
            raise
        except (Exception, asyncio.CancelledError, GeneratorExit) as exc:
            await self._fail(context, method, model, started, exc)
            raise AssertionError("unreachable: _fail raises") from exc
        self._observe(method, model, grpc.StatusCode.OK, started)

    async def _fail(
        self,
        context: grpc.aio.ServicerContext,
        method: str,
        model: str | None,
        started: float,
        exc: BaseException,
    ) -> None:
        """Count the call, then end it: abort with the status ``exc`` maps to, or re-raise a
        cancellation (the caller is gone; there is nobody to answer)."""
        status = status_of(exc)
        if not status.expected:
            log.error("%s/%s failed", self.service, method, exc_info=exc)
        self._observe(method, model, status.code, started)
        if status.code == grpc.StatusCode.CANCELLED:
            raise exc
        await context.abort(status.code, status.details)

    def _observe(self, method: str, model: str | None, code: grpc.StatusCode, started: float) -> None:
        if self.metrics is None:
            return
        label = self.default_label if model is None else self.metrics.model_label(model)
        self.metrics.observe_request(self.service, method, label, code.name, time.perf_counter() - started)
