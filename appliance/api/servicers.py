"""``appliance.v1`` servicers: protobuf in and out, everything else in the Backend.

Each handler validates nothing itself beyond protobuf shapes; limits, model resolution and
routing live in the backend so that both APIs (this one and KServe v2) behave the same.
Every method runs through its service's :class:`~appliance.api.boundary.Boundary`, which turns
errors raised below into their gRPC status and counts the call.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc

from appliance._proto.appliance.v1 import appliance_pb2 as pb
from appliance._proto.appliance.v1 import appliance_pb2_grpc as pb_grpc
from appliance.api.boundary import Boundary
from appliance.api.dedup import RecentAnswers
from appliance.backend import Backend
from appliance.engines.generalist_api import Generalist
from appliance.errors import DeadlineExceeded
from appliance.serve.metrics import ServingMetrics
from appliance.types import Cost, Decision, Extraction, ExtractOutcome, ModelDescription, Policy, Route

_POLICY_FROM_PB = {
    pb.POLICY_SPECIALIST_ONLY: Policy.SPECIALIST_ONLY,
    pb.POLICY_CASCADE: Policy.CASCADE,
    pb.POLICY_GENERALIST_ONLY: Policy.GENERALIST_ONLY,
}
_POLICY_TO_PB = {v: k for k, v in _POLICY_FROM_PB.items()}
_ROUTE_TO_PB = {Route.SPECIALIST: pb.ROUTE_SPECIALIST, Route.GENERALIST: pb.ROUTE_GENERALIST}
_PRECISION_TO_PB = {"fp32": pb.PRECISION_FP32, "int8": pb.PRECISION_INT8, "fp16": pb.PRECISION_FP16}
_KIND_TO_PB = {"classifier": pb.MODEL_KIND_CLASSIFIER, "span_extractor": pb.MODEL_KIND_SPAN_EXTRACTOR}


def remaining(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds left before the caller's deadline, or None; an expired one fails at once."""
    left = context.time_remaining()
    if left is None:
        return None
    if left <= 0:
        raise DeadlineExceeded("the deadline expired before the request was served")
    return float(left)


def request_id(given: str) -> str:
    return given or uuid.uuid4().hex


def cost_pb(cost: Cost) -> pb.Cost:
    return pb.Cost(
        core_seconds=cost.core_seconds,
        accelerator_seconds=cost.accelerator_seconds,
        price=cost.price,
        currency=cost.currency,
    )


def decision_pb(d: Decision) -> pb.Classification:
    return pb.Classification(
        label=d.label,
        confidence=d.confidence,
        top=[pb.LabelScore(label=label, score=score) for label, score in d.top],
        truncated=d.truncated,
        route=_ROUTE_TO_PB[d.route],
        latency_ms=d.latency_ms,
        cost=cost_pb(d.cost),
        escalation_id=d.escalation_id,
        fallback=d.fallback,
    )


def extraction_pb(e: Extraction, decision: Decision | None = None) -> pb.Extraction:
    return pb.Extraction(
        spans=[
            pb.Span(
                label=s.label,
                start=s.start,
                end=s.end,
                text=s.text,
                confidence=s.confidence,
                route=_ROUTE_TO_PB[s.route],
            )
            for s in e.spans
        ],
        truncated=e.truncated,
        latency_ms=e.latency_ms,
        cost=cost_pb(e.cost),
        escalation_id=e.escalation_id,
        fallback=e.fallback,
        classification=decision_pb(decision) if decision is not None else None,
        dropped_generalist_spans=e.dropped_generalist_spans,
    )


def extract_response_pb(outcome: ExtractOutcome, rid: str) -> pb.ExtractResponse:
    classified = outcome.classified
    decisions = classified.decisions if classified is not None else [None] * len(outcome.extractions)
    return pb.ExtractResponse(
        model=outcome.model,
        version=outcome.version,
        precision=_PRECISION_TO_PB.get(outcome.precision, pb.PRECISION_UNSPECIFIED),
        results=[extraction_pb(e, d) for e, d in zip(outcome.extractions, decisions, strict=True)],
        request_id=rid,
        classify_model=classified.model if classified is not None else "",
        classify_version=classified.version if classified is not None else 0,
    )


def model_info_pb(d: ModelDescription) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=d.name,
        version=d.version,
        kind=_KIND_TO_PB.get(d.kind, pb.MODEL_KIND_UNSPECIFIED),
        labels=d.labels,
        metrics=d.metrics,
        threshold=d.threshold,
        coverage_at_threshold=d.coverage_at_threshold,
        precision_at_threshold=d.precision_at_threshold,
        precision=_PRECISION_TO_PB.get(d.precision, pb.PRECISION_UNSPECIFIED),
        limits=pb.Limits(
            max_texts_per_call=d.limits.max_texts_per_call,
            max_text_bytes=d.limits.max_text_bytes,
            max_input_tokens=d.limits.max_input_tokens,
        ),
        default_policy=_POLICY_TO_PB.get(d.default_policy, pb.POLICY_UNSPECIFIED),
        encoder_id=d.encoder_id,
        created_at=d.created_at,
        loaded=d.loaded,
    )


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, backend: Backend, metrics: ServingMetrics | None = None) -> None:
        self.backend = backend
        self.metrics = metrics
        self.boundary = Boundary("InferenceService", metrics)
        self.recent = RecentAnswers()  # a retried Classify or Extract is answered and recorded once

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        rid = request_id(request.request_id)

        async def run() -> pb.ClassifyResponse:
            outcome = await self.backend.classify(
                request.model,
                list(request.texts),
                top_k=request.top_k or 1,
                policy=_POLICY_FROM_PB.get(request.policy),
                timeout=remaining(context),
                allow_fallback=request.allow_fallback,
                request_id=rid,
                generalist=request.generalist,
            )
            if self.metrics is not None:
                self.metrics.texts.labels(outcome.model).inc(len(outcome.decisions))
            return pb.ClassifyResponse(
                model=outcome.model,
                version=outcome.version,
                precision=_PRECISION_TO_PB.get(outcome.precision, pb.PRECISION_UNSPECIFIED),
                results=[decision_pb(d) for d in outcome.decisions],
                request_id=rid,
            )

        once = self.recent.deduplicated("Classify", request, context, run)
        return await self.boundary.unary(context, "Classify", once, request.model)

    async def Extract(
        self, request: pb.ExtractRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExtractResponse:
        rid = request_id(request.request_id)

        async def run() -> pb.ExtractResponse:
            outcome = await self.backend.extract(
                request.model,
                list(request.texts),
                requested_slots=[list(r.slots) for r in request.requested_slots],
                policy=_POLICY_FROM_PB.get(request.policy),
                timeout=remaining(context),
                allow_fallback=request.allow_fallback,
                request_id=rid,
                classify_model=request.classify_model,
                top_k=request.top_k or 1,
            )
            if self.metrics is not None:
                self.metrics.texts.labels(outcome.model).inc(len(outcome.extractions))
            return extract_response_pb(outcome, rid)

        once = self.recent.deduplicated("Extract", request, context, run)
        return await self.boundary.unary(context, "Extract", once, request.model)

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        rid = request_id(request.request_id)

        async def run() -> pb.EmbedResponse:
            outcome = await self.backend.embed(request.model, list(request.texts), timeout=remaining(context))
            return pb.EmbedResponse(
                model=outcome.model,
                version=outcome.version,
                dim=int(outcome.vectors.shape[1]),
                embeddings=[
                    pb.Embedding(values=row.tolist(), truncated=t)
                    for row, t in zip(outcome.vectors, outcome.truncated, strict=True)
                ],
                request_id=rid,
            )

        return await self.boundary.unary(context, "Embed", run, request.model)


class ModelServicer(pb_grpc.ModelServiceServicer):
    def __init__(self, backend: Backend, metrics: ServingMetrics | None = None) -> None:
        self.backend = backend
        self.metrics = metrics
        self.boundary = Boundary("ModelService", metrics)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        async def run() -> pb.ListModelsResponse:
            return pb.ListModelsResponse(
                models=[
                    pb.ModelSummary(
                        name=d.name,
                        version=d.version,
                        available_versions=d.available_versions,
                        kind=_KIND_TO_PB.get(d.kind, pb.MODEL_KIND_UNSPECIFIED),
                        precision=_PRECISION_TO_PB.get(d.precision, pb.PRECISION_UNSPECIFIED),
                        loaded=d.loaded,
                    )
                    for d in self.backend.list_models()
                ]
            )

        return await self.boundary.unary(context, "ListModels", run)

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        async def run() -> pb.ModelInfo:
            return model_info_pb(self.backend.describe(request.model))

        return await self.boundary.unary(context, "GetModel", run, request.model)


class AdminServicer(pb_grpc.AdminServiceServicer):
    def __init__(self, backend: Backend, metrics: ServingMetrics | None = None) -> None:
        self.backend = backend
        self.metrics = metrics
        self.boundary = Boundary("AdminService", metrics)

    async def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadModelResponse:
        async def run() -> pb.LoadModelResponse:
            description, previous = await self.backend.load_model(request.model)
            return pb.LoadModelResponse(model=model_info_pb(description), previous_version=previous)

        return await self.boundary.unary(context, "LoadModel", run, request.model)

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        async def run() -> pb.UnloadModelResponse:
            return pb.UnloadModelResponse(unloaded_version=await self.backend.unload_model(request.model))

        return await self.boundary.unary(context, "UnloadModel", run, request.model)


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    """Streams from the generalist. New calls stop at shutdown: the server refuses them itself."""

    def __init__(self, generalist: Generalist, metrics: ServingMetrics | None = None) -> None:
        self.generalist = generalist
        self.metrics = metrics
        self.boundary = Boundary("GenerationService", metrics, default_label="generalist")

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        rid = request_id(request.request_id)

        async def responses() -> AsyncIterator[pb.GenerateResponse]:
            remaining(context)  # an expired deadline fails before the generalist is asked
            stream = self.generalist.generate(
                prompt=request.prompt or None,
                messages=[{"role": m.role, "content": m.content} for m in request.messages] or None,
                max_tokens=request.max_tokens or None,
                temperature=request.temperature,
                stop=list(request.stop),
                request_id=rid,
            )
            async for chunk in stream:
                yield pb.GenerateResponse(
                    text=chunk.text,
                    finished=chunk.finished,
                    finish_reason=chunk.finish_reason or "",
                    usage=pb.Usage(
                        prompt_tokens=chunk.prompt_tokens or 0, completion_tokens=chunk.completion_tokens or 0
                    ),
                    cost=cost_pb(chunk.cost) if chunk.cost is not None else pb.Cost(),
                    request_id=rid,
                )

        # an async generator itself: grpc runs any other kind of stream handler in a thread pool
        async for response in self.boundary.stream(context, "Generate", responses):
            yield response
