"""``appliance.v1.WorkflowService``: published workflows run over the serving backend.

The interceptor admits a call with scope ``workflow:<name>``; that scope runs the whole workflow,
whatever models its steps use (the steps call the backend in-process, not through the API). The
call's one audit record carries a summary of its steps (kind, model, version, statuses, routes,
price), and every run lands in the workflow runs table that ``appliance report`` reads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import grpc

from appliance._proto.appliance.v1 import appliance_pb2 as pb
from appliance._proto.appliance.v1 import appliance_pb2_grpc as pb_grpc
from appliance._proto.inference import grpc_service_pb2 as kserve_pb
from appliance.api.boundary import Boundary
from appliance.api.servicers import cost_pb, remaining, request_id
from appliance.backend import Backend
from appliance.engines.generalist_api import Generalist
from appliance.errors import ApplianceError, InvalidArgument, PermissionDenied
from appliance.router.cost import CostModel
from appliance.serve.metrics import ServingMetrics
from appliance.types import Limits, Route
from appliance.workflows import store as workflow_store
from appliance.workflows.runner import OnDelta, Receipt, RunResult, StepFailed, StepStatus, WorkflowRunner
from appliance.workflows.runs import RunLog
from appliance.workflows.store import StoredWorkflow, WorkflowStore

log = logging.getLogger(__name__)

_STATUS_TO_PB = {
    StepStatus.OK: pb.STEP_STATUS_OK,
    StepStatus.SKIPPED: pb.STEP_STATUS_SKIPPED,
    StepStatus.FAILED: pb.STEP_STATUS_FAILED,
    StepStatus.FALLBACK: pb.STEP_STATUS_FALLBACK,
}
_ROUTE_TO_PB = {Route.SPECIALIST: pb.ROUTE_SPECIALIST, Route.GENERALIST: pb.ROUTE_GENERALIST}


@runtime_checkable
class AuditedContext(Protocol):
    """The interceptor's view of a call's context (absent when auth is off)."""

    def audit_steps(self, steps: list[dict[str, Any]]) -> None: ...

    def allows(self, scope: str) -> bool: ...


class Workflows:
    """Published workflows, verified once per version, and the runner that runs them."""

    def __init__(
        self, runner: WorkflowRunner, store: WorkflowStore | None = None, runs: RunLog | None = None
    ):
        self.runner = runner
        self.store = store or WorkflowStore()
        self.runs = runs
        self._verified: dict[tuple[str, int], StoredWorkflow] = {}

    def load(self, ref: str) -> StoredWorkflow:
        """``NAME`` (its newest version) or ``NAME:VERSION``; NotFound when unpublished."""
        name, version = self.store.resolve(ref)
        found = self._verified.get((name, version))
        if found is None:
            found = workflow_store.load(f"{name}:{version}", self.store)
            self._verified[(name, version)] = found
        return found

    def exists(self, name: str) -> bool:
        try:
            return bool(self.store.versions(name))
        except ApplianceError:
            return False

    async def run(
        self,
        ref: str,
        texts: Sequence[str],
        context: grpc.aio.ServicerContext,
        rid: str,
        on_delta: OnDelta | None = None,
    ) -> RunResult:
        started = time.perf_counter()
        workflow: StoredWorkflow | None = None
        try:
            workflow = self.load(ref)
            result = await self.runner.run(
                workflow, texts, timeout=remaining(context), request_id=rid, on_delta=on_delta
            )
        except ApplianceError as exc:
            failed = exc.step if isinstance(exc, StepFailed) else None
            if isinstance(context, AuditedContext) and failed is not None:
                context.audit_steps([{"step": failed, "failed": exc.code.name}])
            await self._log_failure(ref, workflow, rid, len(texts), exc, failed, started)
            raise
        if isinstance(context, AuditedContext):
            context.audit_steps(audit_summary(result))
        if self.runs is not None:
            await asyncio.to_thread(self.runs.record, result)
        return result

    async def _log_failure(
        self,
        ref: str,
        workflow: StoredWorkflow | None,
        rid: str,
        texts: int,
        exc: ApplianceError,
        step: str | None,
        started: float,
    ) -> None:
        if self.runs is None or workflow is None:  # an unknown workflow has no row to count under
            return
        latency = 1000.0 * (time.perf_counter() - started)
        try:
            await asyncio.to_thread(
                self.runs.record_failure,
                workflow.name,
                workflow.version,
                rid,
                texts,
                exc.code.name,
                step,
                latency,
            )
        except Exception:  # the run's own status matters more than its row
            log.exception("could not record the failed run of %s", ref)


def audit_summary(result: RunResult) -> list[dict[str, Any]]:
    """Per step: kind, model and version, how many texts had each status and route, and its price."""
    by_step: dict[str, dict[str, Any]] = {}
    for run in result.runs:
        for r in run.receipts:
            entry = by_step.setdefault(
                r.step,
                {"step": r.step, "kind": r.kind, "model": r.model, "version": r.version, "price": 0.0},
            )
            entry.setdefault("statuses", Counter())[r.status] += 1
            if r.route is not None:
                entry.setdefault("routes", Counter())[r.route.value] += 1
            entry["price"] += r.cost.price
            if r.model and not entry["model"]:
                entry["model"], entry["version"] = r.model, r.version
    return [
        {**e, "statuses": dict(e["statuses"]), "routes": dict(e.get("routes", {}))} for e in by_step.values()
    ]


def receipt_pb(r: Receipt) -> pb.StepReceipt:
    return pb.StepReceipt(
        step=r.step,
        kind=r.kind,
        status=_STATUS_TO_PB[r.status],
        model=r.model,
        version=r.version,
        route=_ROUTE_TO_PB.get(r.route, pb.ROUTE_UNSPECIFIED)
        if r.route is not None
        else pb.ROUTE_UNSPECIFIED,
        confidence=r.confidence or 0.0,
        latency_ms=r.latency_ms,
        cost=cost_pb(r.cost),
        started_ms=r.started_ms,
        detail=r.detail,
        output_json=json.dumps(r.output or {}, ensure_ascii=False, separators=(",", ":")),
    )


def response_pb(result: RunResult) -> pb.RunWorkflowResponse:
    return pb.RunWorkflowResponse(
        workflow=result.workflow,
        version=result.version,
        results=[
            pb.WorkflowResult(steps=[receipt_pb(r) for r in run.receipts], cost=cost_pb(run.cost))
            for run in result.runs
        ],
        total_cost=cost_pb(result.total_cost),
        request_id=result.request_id,
        latency_ms=result.latency_ms,
    )


class WorkflowServicer(pb_grpc.WorkflowServiceServicer):
    def __init__(self, workflows: Workflows, metrics: ServingMetrics | None = None) -> None:
        self.workflows = workflows
        self.boundary = Boundary("WorkflowService", metrics)

    async def Run(
        self, request: pb.RunWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> pb.RunWorkflowResponse:
        rid = request_id(request.request_id)

        async def run() -> pb.RunWorkflowResponse:
            result = await self.workflows.run(request.workflow, list(request.texts), context, rid)
            return response_pb(result)

        return await self.boundary.unary(context, "Run", run, request.workflow)

    async def RunStream(
        self, request: pb.RunWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RunWorkflowEvent]:
        rid = request_id(request.request_id)

        async def events() -> AsyncIterator[pb.RunWorkflowEvent]:
            queue: asyncio.Queue[pb.RunWorkflowEvent] = asyncio.Queue()

            async def on_delta(index: int, step: str, text: str) -> None:
                await queue.put(
                    pb.RunWorkflowEvent(delta=pb.GeneratedDelta(text_index=index, step=step, text=text))
                )

            running = asyncio.ensure_future(
                self.workflows.run(request.workflow, list(request.texts), context, rid, on_delta)
            )
            try:
                while not running.done() or not queue.empty():
                    getting = asyncio.ensure_future(queue.get())
                    await asyncio.wait({getting, running}, return_when=asyncio.FIRST_COMPLETED)
                    if getting.done():
                        yield getting.result()
                    else:
                        getting.cancel()
                yield pb.RunWorkflowEvent(done=response_pb(running.result()))
            finally:
                running.cancel()

        async for event in self.boundary.stream(context, "RunStream", events, request.workflow):
            yield event


def require_workflow_scope(context: grpc.aio.ServicerContext, name: str) -> None:
    """For front ends whose rule admits other kinds too (KServe ModelInfer): the caller must hold
    ``workflow:<name>`` to run a workflow."""
    if isinstance(context, AuditedContext) and not context.allows(f"workflow:{name}"):
        raise PermissionDenied(f"running workflow {name!r} needs scope 'workflow:{name}'")


def default_workflows(
    backend: Backend,
    generalist: Generalist | Mapping[str, Generalist] | None,
    cost: CostModel | None = None,
) -> Workflows:
    """The workflows of this appliance's home, run over ``backend`` with its generalists by name
    (a single one is "default")."""
    from appliance.workflows.runner import DEFAULT_GENERALIST

    if generalist is None or isinstance(generalist, Mapping):
        generalists = dict(generalist or {})
    else:
        generalists = {DEFAULT_GENERALIST: generalist}
    return Workflows(WorkflowRunner(backend, generalists, cost), WorkflowStore(), RunLog())


# ------------------------------------------------------------------------------ KServe v2

OUTPUT_RESULT = "RESULT"  # per text one JSON document: the workflow's receipts and outputs


def require_model_scope(context: grpc.aio.ServicerContext, name: str) -> None:
    """KServe ModelInfer on a model: a caller admitted by ``workflow:<name>`` alone may not use the
    model of that name directly."""
    if isinstance(context, AuditedContext) and not any(
        context.allows(f"{kind}:{name}") for kind in ("classify", "extract")
    ):
        raise PermissionDenied(
            f"ModelInfer on model {name!r} needs scope 'classify:{name}' or 'extract:{name}'"
        )


def result_document(result: RunResult, index: int) -> dict[str, Any]:
    run = result.runs[index]
    return {
        "workflow": result.workflow,
        "version": result.version,
        "steps": [
            {
                "step": r.step,
                "kind": r.kind,
                "status": r.status,
                "model": r.model,
                "version": r.version,
                "route": r.route.value if r.route is not None else "",
                "confidence": r.confidence,
                "latency_ms": r.latency_ms,
                "started_ms": r.started_ms,
                "price": r.cost.price,
                "detail": r.detail,
                "output": r.output,
            }
            for r in run.receipts
        ],
        "price": run.cost.price,
        "currency": run.cost.currency,
    }


async def infer_workflow(
    workflows: Workflows,
    request: kserve_pb.ModelInferRequest,
    context: grpc.aio.ServicerContext,
    limits: Limits,
) -> kserve_pb.ModelInferResponse:
    """ModelInfer on a workflow's name: input TEXT as for a model, output RESULT (BYTES, one JSON
    document per text); ``model_version`` picks the workflow's version."""
    from appliance.api.kserve import encode_raw_bytes, parse_infer_request

    require_workflow_scope(context, request.model_name)
    foreign = [o.name for o in request.outputs if o.name != OUTPUT_RESULT]
    if foreign:
        raise InvalidArgument(
            f"workflow {request.model_name!r} has one output, {OUTPUT_RESULT!r}, not {foreign}"
        )
    texts_only = kserve_pb.ModelInferRequest()
    texts_only.CopyFrom(request)
    del texts_only.outputs[:]
    parsed = parse_infer_request(texts_only, limits)
    result = await workflows.run(parsed.model_ref, parsed.texts, context, request_id(request.id))
    documents = [
        json.dumps(result_document(result, i), ensure_ascii=False).encode("utf-8")
        for i in range(len(result.runs))
    ]
    response = kserve_pb.ModelInferResponse(
        model_name=result.workflow, model_version=str(result.version), id=request.id
    )
    tensor = response.outputs.add(name=OUTPUT_RESULT, datatype="BYTES", shape=[len(documents)])
    if parsed.raw:
        response.raw_output_contents.append(encode_raw_bytes(documents))
    else:
        tensor.contents.bytes_contents.extend(documents)
    return response
