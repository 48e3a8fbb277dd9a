"""The workflow runner: a published workflow's steps over a batch of texts, as a graph.

- Each step is a task that waits only for the steps it needs, so independent steps run at once.
- A step runs over the texts its branches select and whose inputs exist; per text it leaves an
  output and a receipt (model, version, route, confidence, latency, cost, start time).
- A classify step and an extract step that become ready together share one encoder pass: they go
  to the backend as one Extract call naming the classifier (``classify_model``), which the runtime
  answers from a single session row per text when both models sit on the same encoder.
- The run's deadline covers every step: each gets the time that is left (or its own ``timeout``,
  if shorter). Past the run's deadline the run fails whatever ``on_failure`` says; a step's own
  failure follows its ``on_failure``.
- Every step calls the same :class:`~appliance.backend.Backend` as the Inference API, so every
  Classify/Extract status applies inside steps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from appliance.backend import Backend
from appliance.engines.generalist_api import Generalist
from appliance.errors import ApplianceError, DeadlineExceeded, FailedPrecondition, InvalidArgument
from appliance.router.cost import CostModel, price_generalist
from appliance.types import ClassifyOutcome, Cost, Decision, ExtractOutcome, Policy, Route
from appliance.workflows.retrieve import Retriever
from appliance.workflows.spec import (
    DEFAULT_FIELD,
    INPUT,
    TEMPLATE_RE,
    BranchStep,
    ClassifyStep,
    Condition,
    EmbedStep,
    ExtractStep,
    GenerateStep,
    OnFailure,
    RetrieveStep,
    Step,
    StepPolicy,
    WorkflowSpec,
)
from appliance.workflows.store import StoredWorkflow

DEFAULT_GENERALIST = "default"
_POLICY = {
    StepPolicy.SPECIALIST: Policy.SPECIALIST_ONLY,
    StepPolicy.CASCADE: Policy.CASCADE,
    StepPolicy.GENERALIST: Policy.GENERALIST_ONLY,
}
Output = dict[str, Any]
# (text index, step id, a piece of generated text): how RunStream hears generate steps
OnDelta = Callable[[int, str, str], Awaitable[None]]


class StepStatus:
    OK = "ok"
    SKIPPED = "skipped"
    FAILED = "failed"
    FALLBACK = "fallback"


@dataclass
class Receipt:
    """What one step did for one text."""

    step: str
    kind: str
    status: str
    model: str = ""
    version: int = 0
    route: Route | None = None
    confidence: float | None = None
    latency_ms: float = 0.0
    cost: Cost = field(default_factory=Cost)
    started_ms: float = 0.0  # since the run started
    detail: str = ""
    output: Output | None = None
    escalation_id: str = ""
    item: int = 0  # the text's position in the step's backend call (how decisions are recorded)


@dataclass
class TextRun:
    """One text's pass through the workflow: a receipt per step, in the workflow's order."""

    receipts: list[Receipt]

    @property
    def cost(self) -> Cost:
        return sum_costs(r.cost for r in self.receipts)

    def outputs(self) -> dict[str, Output]:
        return {r.step: r.output for r in self.receipts if r.output is not None}


@dataclass
class RunResult:
    workflow: str
    version: int
    runs: list[TextRun]
    latency_ms: float
    request_id: str

    @property
    def total_cost(self) -> Cost:
        return sum_costs(run.cost for run in self.runs)


class StepFailed(ApplianceError):
    """The run failed at ``step``: the step's own status, with details naming the step."""

    def __init__(self, step: str, cause: ApplianceError) -> None:
        super().__init__(f"workflow step {step!r} failed ({cause.code.name}): {cause.message}")
        self.code = cause.code
        self.step = step
        self.cause = cause


def sum_costs(costs: Iterable[Cost]) -> Cost:
    total = Cost()
    for c in costs:
        total = Cost(
            total.core_seconds + c.core_seconds,
            total.accelerator_seconds + c.accelerator_seconds,
            total.price + c.price,
            c.currency or total.currency,
        )
    return total


class _Failure(Exception):
    """A step failed for some texts under on_failure skip; carried to the receipts."""


@dataclass
class _Run:
    """The state of one run: outputs per step per text, receipts, the deadline."""

    spec: WorkflowSpec
    texts: Sequence[str]
    started: float
    deadline: float | None
    request_id: str
    on_delta: OnDelta | None
    receipts: dict[str, list[Receipt | None]] = field(default_factory=dict)

    def output(self, step: str, i: int) -> Output | None:
        receipt = self.receipts.get(step, [None] * len(self.texts))[i]
        return receipt.output if receipt is not None else None

    def remaining(self, step: Step) -> float | None:
        """Seconds this step may take: what is left of the run, or its own timeout if shorter."""
        left = None if self.deadline is None else self.deadline - time.monotonic()
        if left is not None and left <= 0:
            raise DeadlineExceeded(f"the workflow's deadline expired before step {step.id!r}")
        if step.timeout is not None:
            return step.timeout if left is None else min(left, step.timeout)
        return left

    def since_start_ms(self) -> float:
        return 1000.0 * (time.perf_counter() - self.started)


class WorkflowRunner:
    """Runs workflows against the serving backend and the generalists it holds."""

    def __init__(
        self,
        backend: Backend,
        generalists: Mapping[str, Generalist] | None = None,
        cost: CostModel | None = None,
        retriever: Retriever | None = None,
    ) -> None:
        self.backend = backend
        self.generalists = dict(generalists or {})
        self.cost = cost or CostModel()
        self.retriever = retriever or Retriever(backend)

    # ------------------------------------------------------------------ entry
    async def run(
        self,
        workflow: StoredWorkflow,
        texts: Sequence[str],
        *,
        timeout: float | None = None,
        request_id: str = "",
        on_delta: OnDelta | None = None,
    ) -> RunResult:
        spec = workflow.spec
        self._check_texts(texts)
        timeout = timeout if timeout is not None else spec.timeout
        started = time.perf_counter()
        run = _Run(
            spec,
            texts,
            started,
            None if timeout is None else time.monotonic() + timeout,
            request_id,
            on_delta,
        )
        steps: dict[str, asyncio.Task[None]] = {}
        pairs = _encoder_pairs(spec)
        shared: dict[tuple[str, str], asyncio.Task[ExtractOutcome | None]] = {}
        deps = spec.dependencies()

        async def step_task(step: Step) -> None:
            await asyncio.gather(*(steps[d] for d in sorted(deps[step.id])))
            partner = pairs.get(step.id)
            pair = None if partner is None else (min(step.id, partner), max(step.id, partner))
            if pair is not None and pair not in shared:
                shared[pair] = asyncio.ensure_future(self._shared_pass(run, spec, pair))
            await self._run_step(run, step, shared[pair] if pair is not None else None)

        try:
            async with asyncio.TaskGroup() as group:
                for step in spec.steps:
                    steps[step.id] = group.create_task(step_task(step), name=f"step-{step.id}")
        except* StepFailed as failed:
            raise failed.exceptions[0] from None
        except* ApplianceError as failed:
            raise failed.exceptions[0] from None
        finally:
            for task in shared.values():
                task.cancel()
        runs = [
            TextRun([r for s in spec.ids if (r := run.receipts[s][i]) is not None]) for i in range(len(texts))
        ]
        return RunResult(workflow.name, workflow.version, runs, run.since_start_ms(), request_id)

    def _check_texts(self, texts: Sequence[str]) -> None:
        """The Inference API's text limits, up front: a bad text fails the run whatever a step's
        on_failure says, since no step could take it."""
        limits = self.backend.limits
        if not texts:
            raise InvalidArgument("no texts: send at least one")
        if len(texts) > limits.max_texts_per_call:
            raise InvalidArgument(f"{len(texts)} texts: at most {limits.max_texts_per_call} per call")
        for i, text in enumerate(texts):
            if not text.strip():
                raise InvalidArgument(f"text {i} is empty")
            if len(text.encode("utf-8", "surrogatepass")) > limits.max_text_bytes:
                raise InvalidArgument(f"text {i} is over the {limits.max_text_bytes}-byte cap")

    # ------------------------------------------------------------------ one step
    async def _run_step(
        self, run: _Run, step: Step, shared: asyncio.Future[ExtractOutcome | None] | None
    ) -> None:
        n = len(run.texts)
        receipts: list[Receipt | None] = [None] * n
        active: list[int] = []
        for i in range(n):
            why = _why_skipped(run, step, i)
            if why is None:
                active.append(i)
            else:
                receipts[i] = Receipt(step.id, step.kind, StepStatus.SKIPPED, detail=why)
        started_ms = run.since_start_ms()
        if active:
            try:
                done = await self._attempt(run, step, active, shared, fallback=False)
            except (ApplianceError, TimeoutError) as exc:
                cause = _as_error(exc, step)
                if (
                    isinstance(cause, DeadlineExceeded)
                    and run.deadline is not None
                    and (time.monotonic() >= run.deadline)
                ):
                    raise StepFailed(step.id, cause) from None  # the run's time is up
                done = await self._recover(run, step, active, cause)
            for i, receipt in done.items():
                receipt.started_ms = started_ms
                receipts[i] = receipt
        run.receipts[step.id] = receipts

    async def _recover(
        self, run: _Run, step: Step, active: list[int], cause: ApplianceError
    ) -> dict[int, Receipt]:
        if step.on_failure is OnFailure.FAIL:
            raise StepFailed(step.id, cause)
        if step.on_failure is OnFailure.SKIP:
            detail = f"{cause.code.name}: {cause.message}"
            return {i: Receipt(step.id, step.kind, StepStatus.FAILED, detail=detail) for i in active}
        try:
            done = await self._attempt(run, step, active, None, fallback=True)
        except (ApplianceError, TimeoutError) as exc:
            raise StepFailed(step.id, _as_error(exc, step)) from None
        for receipt in done.values():
            receipt.status = StepStatus.FALLBACK
            receipt.detail = f"{cause.code.name}: {cause.message}"
        return done

    async def _attempt(
        self,
        run: _Run,
        step: Step,
        active: list[int],
        shared: asyncio.Future[ExtractOutcome | None] | None,
        fallback: bool,
    ) -> dict[int, Receipt]:
        timeout = run.remaining(step)
        texts = [run.texts[i] for i in active]

        async def bounded(call: Awaitable[dict[int, Receipt]]) -> dict[int, Receipt]:
            return await asyncio.wait_for(call, timeout)

        if isinstance(step, ClassifyStep):
            return await bounded(self._classify(run, step, active, texts, timeout, shared, fallback))
        if isinstance(step, ExtractStep):
            return await bounded(self._extract(step, active, texts, timeout, shared, fallback))
        if isinstance(step, EmbedStep):
            return await bounded(self._embed(step, active, texts, timeout))
        if isinstance(step, RetrieveStep):
            return await bounded(self._retrieve(step, active, texts, timeout))
        if isinstance(step, GenerateStep):
            if fallback:
                return {
                    i: Receipt(step.id, step.kind, StepStatus.FALLBACK, output={"text": step.fallback_text})
                    for i in active
                }
            return await bounded(self._generate(run, step, active))
        if isinstance(step, BranchStep):
            return {i: _branch(run, step, i) for i in active}
        raise AssertionError(f"unknown step kind {step.kind}")

    # ------------------------------------------------------------------ kinds
    async def _shared_pass(
        self, run: _Run, spec: WorkflowSpec, pair: tuple[str, str]
    ) -> ExtractOutcome | None:
        """One Extract call naming the classifier, for a classify/extract pair over the same texts:
        the runtime scores both from one encoder pass. None when the pair cannot share (their
        texts differ); a failure is left to each step on its own."""
        a, b = spec.step(pair[0]), spec.step(pair[1])
        classify, extract = (a, b) if isinstance(a, ClassifyStep) else (b, a)
        assert isinstance(classify, ClassifyStep) and isinstance(extract, ExtractStep)
        active = [i for i in range(len(run.texts)) if _why_skipped(run, classify, i) is None]
        if (
            active != [i for i in range(len(run.texts)) if _why_skipped(run, extract, i) is None]
            or not active
        ):
            return None
        timeouts = [t for t in (run.remaining(classify), run.remaining(extract)) if t is not None]
        try:
            outcome = await asyncio.wait_for(
                self.backend.extract(
                    extract.model,
                    [run.texts[i] for i in active],
                    policy=Policy.SPECIALIST_ONLY,
                    timeout=min(timeouts) if timeouts else None,
                    request_id=run.request_id,
                    classify_model=classify.model,
                    top_k=classify.top_k,
                ),
                min(timeouts) if timeouts else None,
            )
        except (ApplianceError, TimeoutError):
            return None
        return outcome

    async def _classify(
        self,
        run: _Run,
        step: ClassifyStep,
        active: list[int],
        texts: list[str],
        timeout: float | None,
        shared: asyncio.Future[ExtractOutcome | None] | None,
        fallback: bool,
    ) -> dict[int, Receipt]:
        first_pass_specialist = step.policy is StepPolicy.SPECIALIST or step.threshold is not None
        policy = Policy.SPECIALIST_ONLY if fallback or first_pass_specialist else _POLICY[step.policy]
        together = await shared if shared is not None and not fallback else None
        if together is not None and together.classified is not None:
            outcome: ClassifyOutcome = together.classified
        else:
            outcome = await self.backend.classify(
                step.model,
                texts,
                top_k=step.top_k,
                policy=policy,
                timeout=timeout,
                allow_fallback=fallback,
                request_id=run.request_id,
                generalist=step.generalist or "",
            )
        decisions = list(outcome.decisions)
        if step.threshold is not None and not fallback:
            decisions = await self._escalate(run, step, texts, decisions, timeout)
        return {
            i: self._classify_receipt(step, outcome, d, j)
            for j, (i, d) in enumerate(zip(active, decisions, strict=True))
        }

    async def _escalate(
        self,
        run: _Run,
        step: ClassifyStep,
        texts: list[str],
        decisions: list[Decision],
        timeout: float | None,
    ) -> list[Decision]:
        """The cascade at the step's own threshold: texts the specialist is less sure of than that
        go to the generalist; a text the specialist rejected as out of scope never does."""
        threshold = step.threshold or 0.0
        unsure = [
            j
            for j, d in enumerate(decisions)
            if d.confidence < threshold and d.top and d.label == d.top[0][0]
        ]
        if not unsure:
            return decisions
        asked = await self.backend.classify(
            step.model,
            [texts[j] for j in unsure],
            policy=Policy.GENERALIST_ONLY,
            timeout=run.remaining(step) if timeout is not None else None,
            request_id=run.request_id,
            generalist=step.generalist or "",
        )
        out = list(decisions)
        for j, answer in zip(unsure, asked.decisions, strict=True):
            out[j] = dataclasses.replace(answer, cost=sum_costs([decisions[j].cost, answer.cost]))
        return out

    def _classify_receipt(
        self, step: ClassifyStep, outcome: ClassifyOutcome, d: Decision, item: int
    ) -> Receipt:
        return Receipt(
            step.id,
            step.kind,
            StepStatus.OK,
            model=outcome.model,
            version=outcome.version,
            route=d.route,
            confidence=d.confidence,
            latency_ms=d.latency_ms,
            cost=self._priced(d.cost),
            output={
                "label": d.label,
                "confidence": round(float(d.confidence), 6),
                "route": d.route.value,
                "top": [[label, round(float(score), 6)] for label, score in d.top],
            },
            escalation_id=d.escalation_id,
            item=item,
        )

    async def _extract(
        self,
        step: ExtractStep,
        active: list[int],
        texts: list[str],
        timeout: float | None,
        shared: asyncio.Future[ExtractOutcome | None] | None,
        fallback: bool,
    ) -> dict[int, Receipt]:
        outcome = await shared if shared is not None and not fallback else None
        if outcome is None:
            outcome = await self.backend.extract(
                step.model,
                texts,
                policy=Policy.SPECIALIST_ONLY if fallback else _POLICY[step.policy],
                timeout=timeout,
                allow_fallback=fallback,
            )
        receipts = {}
        for j, (i, e) in enumerate(zip(active, outcome.extractions, strict=True)):
            fields: Output = {"spans": [dataclasses.asdict(s) | {"route": s.route.value} for s in e.spans]}
            for s in e.spans:
                fields.setdefault(s.label, s.text)  # the first span of each slot, by name
            receipts[i] = Receipt(
                step.id,
                step.kind,
                StepStatus.OK,
                model=outcome.model,
                version=outcome.version,
                route=Route.SPECIALIST,
                latency_ms=e.latency_ms,
                cost=self._priced(e.cost),
                output=fields,
                escalation_id=e.escalation_id,
                item=j,
            )
        return receipts

    async def _embed(
        self, step: EmbedStep, active: list[int], texts: list[str], timeout: float | None
    ) -> dict[int, Receipt]:
        started = time.perf_counter()
        outcome = await self.backend.embed(step.model, texts, timeout=timeout)
        latency = 1000.0 * (time.perf_counter() - started)
        dim = int(outcome.vectors.shape[1])
        return {
            i: Receipt(
                step.id,
                step.kind,
                StepStatus.OK,
                model=outcome.model,
                version=outcome.version,
                route=Route.SPECIALIST,
                latency_ms=latency,
                output={"dim": dim, "vector": [round(float(x), 6) for x in row]},
            )
            for i, row in zip(active, outcome.vectors, strict=True)
        }

    async def _retrieve(
        self, step: RetrieveStep, active: list[int], texts: list[str], timeout: float | None
    ) -> dict[int, Receipt]:
        started = time.perf_counter()
        found = await self.retriever.nearest(step.model, step.dataset, texts, step.k, timeout)
        latency = 1000.0 * (time.perf_counter() - started)
        receipts = {}
        for i, hits in zip(active, found.neighbours, strict=True):
            receipts[i] = Receipt(
                step.id,
                step.kind,
                StepStatus.OK,
                model=found.model,
                version=found.version,
                route=Route.SPECIALIST,
                latency_ms=latency,
                output={
                    "examples": "\n".join(f"{h.text} => {h.label}" for h in hits),
                    "labels": [h.label for h in hits],
                    "neighbours": [
                        {"text": h.text, "label": h.label, "score": round(h.score, 6)} for h in hits
                    ],
                },
            )
        return receipts

    async def _generate(self, run: _Run, step: GenerateStep, active: list[int]) -> dict[int, Receipt]:
        name = step.generalist or DEFAULT_GENERALIST
        generalist = self.generalists.get(name)
        if generalist is None:
            raise FailedPrecondition(
                f"step {step.id!r} needs the generalist {name!r}, which this appliance does not serve"
                + (f" (it serves {', '.join(sorted(self.generalists))})" if self.generalists else "")
            )

        async def one(i: int) -> tuple[int, Receipt]:
            started = time.perf_counter()
            pieces: list[str] = []
            last = None
            stream = generalist.generate(
                prompt=render(step.prompt, run.texts[i], lambda ref: run.output(ref, i), run.spec),
                max_tokens=step.max_tokens,
                temperature=step.temperature,
                request_id=f"{run.request_id}/{step.id}/{i}" if run.request_id else None,
            )
            async for chunk in stream:
                if chunk.text:
                    pieces.append(chunk.text)
                    if run.on_delta is not None:
                        await run.on_delta(i, step.id, chunk.text)
                last = chunk
            cost = Cost()
            if last is not None:
                cost = last.cost or price_generalist(self.cost, generalist.placement, last.engine_seconds)
            receipt = Receipt(
                step.id,
                step.kind,
                StepStatus.OK,
                model=name,
                route=Route.GENERALIST,
                latency_ms=1000.0 * (time.perf_counter() - started),
                cost=cost,
                output={
                    "text": "".join(pieces),
                    "finish_reason": (last.finish_reason if last else None) or "",
                },
            )
            return i, receipt

        return dict(await asyncio.gather(*(one(i) for i in active)))

    # ------------------------------------------------------------------ helpers
    def _priced(self, cost: Cost) -> Cost:
        """Specialist costs come back as core-seconds; price them at the box's rate."""
        if cost.price or cost.accelerator_seconds or not cost.core_seconds:
            return cost
        return self.cost.price(cost.core_seconds)


def _as_error(exc: BaseException, step: Step) -> ApplianceError:
    if isinstance(exc, ApplianceError):
        return exc
    return DeadlineExceeded(f"step {step.id!r} ran past its time")


def _why_skipped(run: _Run, step: Step, i: int) -> str | None:
    """Why ``step`` does not run for text ``i`` (a branch, or a missing input), or None."""
    for branch, outcome in run.spec.gates().get(step.id, []):
        taken = run.output(branch, i)
        if taken is None:
            return f"branch {branch!r} did not run"
        if (taken["taken"] == "then") != outcome:
            return f"branch {branch!r} took {taken['taken']}"
    for ref, _ in step.references():
        if run.output(ref, i) is None and not isinstance(run.spec.step(ref), BranchStep):
            return f"needs step {ref!r}, which did not answer"
    return None


def _branch(run: _Run, step: BranchStep, i: int) -> Receipt:
    holds = all(_holds(c, run.output(c.step, i) or {}) for c in step.when)
    return Receipt(step.id, step.kind, StepStatus.OK, output={"taken": "then" if holds else "else"})


def _holds(condition: Condition, output: Output) -> bool:
    if condition.label_in is not None:
        return output.get("label") in condition.label_in
    if condition.confidence_below is not None:
        return float(output.get("confidence", 1.0)) < condition.confidence_below
    return any(span.get("label") == condition.field_present for span in output.get("spans", []))


def render(template: str, text: str, output_of: Callable[[str], Output | None], spec: WorkflowSpec) -> str:
    """A generate step's prompt: ``{{input}}`` is the text, ``{{step.field}}`` an earlier output
    (a missing one, such as a slot not found in this text, is empty)."""

    def value(match: re.Match[str]) -> str:
        ref, name = match.group(1), match.group(2)
        if ref == INPUT:
            return text
        output = output_of(ref) or {}
        found = output.get(name or DEFAULT_FIELD[spec.step(ref).kind], "")
        if isinstance(found, float):
            return f"{found:.3f}"
        return found if isinstance(found, str) else json.dumps(found, ensure_ascii=False)

    return TEMPLATE_RE.sub(value, template)


def _encoder_pairs(spec: WorkflowSpec) -> dict[str, str]:
    """Classify and extract steps that become ready together (same inputs, same branches), with a
    specialist first pass each: step id → its partner. Each step is in one pair at most."""
    deps, gates = spec.dependencies(), spec.gates()
    pairs: dict[str, str] = {}
    classifiers = [
        s
        for s in spec.steps
        if isinstance(s, ClassifyStep) and (s.policy is StepPolicy.SPECIALIST or s.threshold)
    ]
    extractors = [s for s in spec.steps if isinstance(s, ExtractStep) and s.policy is StepPolicy.SPECIALIST]
    for c in classifiers:
        for e in extractors:
            if e.id in pairs or c.id in pairs:
                continue
            if deps[c.id] == deps[e.id] and sorted(gates.get(c.id, [])) == sorted(gates.get(e.id, [])):
                pairs[c.id], pairs[e.id] = e.id, c.id
    return pairs
