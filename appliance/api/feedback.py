"""``appliance.v1.FeedbackService``: corrections of decisions, recorded durably before the answer.

The scope (``feedback:<model>``) and the audit record are the security interceptor's, as for
every RPC; the checks and the write are :func:`appliance.feedback.core.record`'s. Decision rows of
specialist answers are written in groups shortly after the answer, so the cascade's buffer is
flushed first: a correction sent right after its answer finds its decision.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc

from appliance._proto.appliance.v1 import appliance_pb2 as pb
from appliance._proto.appliance.v1 import appliance_pb2_grpc as pb_grpc
from appliance.api.boundary import Boundary
from appliance.errors import InvalidArgument, NotFound
from appliance.feedback.core import record
from appliance.router.escalations import CorrectedSpan, CorrectionRequest, EscalationStore
from appliance.serve.metrics import ServingMetrics
from appliance.store import ModelStore

MAX_CORRECTIONS_PER_CALL = 1000


def correction_request(c: pb.Correction) -> CorrectionRequest:
    spans = tuple(CorrectedSpan(s.label, s.start, s.end) for s in c.spans) or None
    return CorrectionRequest(
        source=c.source,
        escalation_id=c.escalation_id,
        request_id=c.request_id,
        item=c.item,
        label=c.label or None,
        spans=spans,
    )


class FeedbackServicer(pb_grpc.FeedbackServiceServicer):
    def __init__(
        self,
        escalations: EscalationStore,
        models: ModelStore,
        flush: Callable[[], Awaitable[None]] | None = None,
        metrics: ServingMetrics | None = None,
    ) -> None:
        self.escalations = escalations
        self.models = models
        self.flush = flush  # writes the decision rows still buffered (the cascade's)
        self.boundary = Boundary("FeedbackService", metrics)

    async def Correct(
        self, request: pb.CorrectRequest, context: grpc.aio.ServicerContext
    ) -> pb.CorrectResponse:
        async def run() -> pb.CorrectResponse:
            if not request.model:
                raise InvalidArgument("name the model whose decisions are corrected")
            if not request.corrections:
                raise InvalidArgument("no corrections in the request")
            if (n := len(request.corrections)) > MAX_CORRECTIONS_PER_CALL:
                raise InvalidArgument(f"{n} corrections in one call; the most is {MAX_CORRECTIONS_PER_CALL}")
            if self.flush is not None:
                await self.flush()
            results = []
            for i, c in enumerate(request.corrections):
                wanted = correction_request(c)
                try:
                    done = await asyncio.to_thread(
                        record,
                        self.escalations,
                        self.models,
                        request.model,
                        wanted,
                        allow_new_label=request.allow_new_label,
                    )
                except (InvalidArgument, NotFound) as exc:
                    if len(request.corrections) == 1:
                        raise
                    # the ones before it are recorded: say which one stopped the call
                    raise type(exc)(f"correction {i}: {exc.message}") from exc
                results.append(
                    pb.CorrectResult(
                        id=done.id,
                        duplicate=not done.new,
                        version=done.model_version,
                        trainable=done.trainable,
                        note=done.note,
                    )
                )
            return pb.CorrectResponse(results=results)

        return await self.boundary.unary(context, "Correct", run, request.model)
