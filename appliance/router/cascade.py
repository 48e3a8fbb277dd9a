"""The cascade: per text, the specialist answers when it is confident, the generalist when not.

Rules, under the effective policy (:mod:`appliance.router.policy`):

- ``specialist_only``: the specialist answers every text;
- ``generalist_only``: the generalist answers every text;
- ``cascade``: the specialist answers a text when its top-1 score is at least the model's
  threshold, the generalist otherwise.

Escalated texts of one call go to the generalist concurrently, at most ``max_concurrency`` at a
time across all calls. At most ``max_waiting`` texts wait for the generalist at once (in a slot
or queued for one): a call whose escalations would pass that bound is refused RESOURCE_EXHAUSTED
before any is sent, or, when the caller allows a fallback, the specialist answers them, counted as
fallbacks, so that a burst cannot pile up unbounded work behind the LLM. Every generalist answer
is recorded in the escalation store, durably, before :meth:`Cascade.decide` returns, together
with one decision row per text.

When the policy needs the generalist and there is none (or it cannot take this model's label
set), the call fails with FAILED_PRECONDITION, unless the caller allows a fallback: then the
specialist answers those texts too, counted as fallbacks. Generalist errors propagate with their
status: RESOURCE_EXHAUSTED when it is saturated, UNAVAILABLE when it is down.

Several generalists may be configured (:mod:`appliance.router.generalists`): a call's
escalations go to the one the request names, else the model's setting's, else ``default``. A
model's setting may also ask for k demonstrations: the k nearest examples of its own training set
(:mod:`appliance.router.retrieval`) are added to the generalist's prompt.

Cost of a generalist answer: the engine batches concurrent requests, so the requests of one call
share its time. The call is charged the span from the first request's start to the last one's
end (capped at the sum of the engine's own per-request times); each text gets its share by
tokens, priced by :func:`appliance.router.cost.price_generalist` (every unit the engine holds is
charged). Requests of other calls running at the same time are not seen here, so under heavy
concurrency this still over-counts; it never under-counts. A generalist answer also carries the
specialist's cost: both were spent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from appliance.engines.generalist_api import Demonstration, Generalist, ZeroShotResult
from appliance.errors import ApplianceError, FailedPrecondition, InvalidArgument, ResourceExhausted
from appliance.router.cost import CostModel, engine_shares, price_generalist
from appliance.router.escalations import DecisionRecord, EscalationRecord, EscalationStore
from appliance.router.generalists import GeneralistPool, ModelEscalation, PricedGeneralist
from appliance.router.metrics import RouterMetrics
from appliance.router.policy import check_label_set, needs_generalist, parse_policy, resolve_policy
from appliance.router.retrieval import Retriever
from appliance.types import Cost, Decision, Extraction, Policy, Route, SpecialistAnswer

if TYPE_CHECKING:
    from appliance.engines.extractor import Extractor
    from appliance.engines.specialist import Specialist

log = logging.getLogger(__name__)

DEFAULT_MAX_CONCURRENCY = 8
DEFAULT_MAX_WAITING = 256  # texts waiting for the generalist at once, all calls together


@dataclass(frozen=True)
class ModelRef:
    """What routing needs to know about a specialist."""

    name: str
    version: int
    labels: list[str]
    threshold: float
    label_descriptions: dict[str, str] = field(default_factory=dict)
    default_policy: Policy | None = None

    @classmethod
    def of(cls, model: ModelRef | Specialist | Extractor) -> ModelRef:
        """A ModelRef as is, or one read from a loaded specialist's (or extractor's) typed manifest."""
        if isinstance(model, ModelRef):
            return model
        spec = model.spec
        return cls(
            name=spec.name,
            version=spec.version,
            labels=list(spec.labels),
            threshold=spec.calibration.threshold,
            label_descriptions=dict(spec.label_descriptions),
            default_policy=parse_policy(spec.default_policy),
        )


@dataclass(frozen=True)
class _Answered:
    result: ZeroShotResult
    wait_ms: float  # queueing for a slot plus the generalist's own time, as the caller saw it
    engine_seconds: float  # this text's share of the engine's busy span


# How long specialist-only decision rows may wait in memory before they are written.
FLUSH_INTERVAL_S = 0.5


class Cascade:
    def __init__(
        self,
        generalist: Generalist | Mapping[str, Generalist] | None,
        escalations: EscalationStore,
        cost: CostModel,
        metrics: RouterMetrics | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        max_waiting: int = DEFAULT_MAX_WAITING,
        generalist_costs: Mapping[str, CostModel] | None = None,
        settings: Mapping[str, ModelEscalation] | None = None,
        retriever: Retriever | None = None,
    ) -> None:
        """``generalist``: one (named ``default``), several by name, or None. ``generalist_costs``
        prices a named one's time (default: ``cost``, the box's); ``settings`` are per model name."""
        if max_concurrency < 1:
            raise InvalidArgument(f"max_concurrency must be at least 1, got {max_concurrency}")
        if max_waiting < 1:
            raise InvalidArgument(f"max_waiting must be at least 1, got {max_waiting}")
        self.generalists = GeneralistPool.of(generalist, cost, generalist_costs)
        default = self.generalists.choose(None, None)
        self.generalist = default.generalist if default is not None else None  # the default one
        self.escalations = escalations
        self.cost = cost
        self.metrics = metrics
        self.settings = dict(settings or {})
        for model, setting in self.settings.items():
            if setting.generalist is not None and setting.generalist not in self.generalists.names:
                raise InvalidArgument(
                    f"model {model} escalates to generalist {setting.generalist!r}, which is not configured; "
                    f"known: {', '.join(self.generalists.names) or 'none'}"
                )
        self.retriever = retriever
        self._slots = asyncio.Semaphore(max_concurrency)
        self.max_waiting = max_waiting
        self.waiting = 0  # texts of calls in _ask now; only the event loop touches it
        # (model, version, generalist) whose label set that generalist cannot take, with the reason.
        self._unfit: dict[tuple[str, int, str], str] = {}
        self._pending: list[DecisionRecord] = []
        self._flusher: asyncio.Task[None] | None = None
        self._flush_problem: str | None = None  # why the last batch of decision rows was dropped

    async def _flush_later(self) -> None:
        await asyncio.sleep(FLUSH_INTERVAL_S)
        await self.flush()

    async def flush(self) -> None:
        """Write the decision rows still buffered."""
        rows, self._pending = self._pending, []
        if not rows:
            return
        try:
            await asyncio.to_thread(self.escalations.record_decisions, rows)
        except ApplianceError as e:  # report rows only, never acknowledged: the answers stand
            if e.message != self._flush_problem:  # once per cause, not twice a second
                log.warning("dropping decision rows until the store takes them again: %s", e.message)
            self._flush_problem = e.message
            return
        if self._flush_problem is not None:
            log.warning("decision rows are recorded again")
            self._flush_problem = None

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        await self.flush()

    async def check_model(self, model: ModelRef | Specialist) -> None:
        """At load: make sure the generalist can classify over this model's labels.

        A model whose default policy needs the generalist fails to load (FailedPrecondition); one
        served specialist-only by default loads, and requests that ask it for the generalist get
        that same reason.
        """
        ref = ModelRef.of(model)
        own = self.generalists.choose(None, self.settings.get(ref.name))
        for member in self.generalists.members():
            key = (ref.name, ref.version, member.name)
            self._unfit.pop(key, None)
            try:
                await check_label_set(ref.labels, ref.label_descriptions, member.generalist)
            except FailedPrecondition as e:
                served_so = needs_generalist(resolve_policy(None, ref.default_policy, True))
                if member is own and served_so:
                    raise FailedPrecondition(f"model {ref.name}:{ref.version}: {e.message}") from e
                self._unfit[key] = e.message

    def _why_not_generalist(self, ref: ModelRef, chosen: PricedGeneralist | None) -> str | None:
        if chosen is None:
            return "no generalist is configured on this appliance"
        return self._unfit.get((ref.name, ref.version, chosen.name))

    async def decide(
        self,
        model: ModelRef | Specialist,
        answers: Sequence[SpecialistAnswer],
        policy: Policy | str | None,
        allow_fallback: bool = False,
        request_id: str = "",
        texts: Sequence[str] = (),
        generalist: str | None = None,
    ) -> list[Decision]:
        """One decision per text, in order. ``model`` is a :class:`ModelRef` or a loaded specialist;
        ``generalist`` names the one to escalate to (None: the model's setting, else the default)."""
        ref = ModelRef.of(model)
        setting = self.settings.get(ref.name)
        chosen = self.generalists.choose(generalist, setting)
        if len(answers) != len(texts):
            raise ApplianceError(f"{len(answers)} specialist answers for {len(texts)} texts")
        for i, answer in enumerate(answers):
            if not answer.top:
                raise ApplianceError(f"the specialist gave no label for text {i}")
        effective = resolve_policy(policy, ref.default_policy, chosen is not None)
        if effective is Policy.SPECIALIST_ONLY:
            wanted: list[int] = []
        elif effective is Policy.GENERALIST_ONLY:
            wanted = list(range(len(texts)))
        else:
            # A text rejected as out of scope is answered so by the specialist: it is not escalated.
            wanted = [
                i for i, a in enumerate(answers) if a.rejected_as is None and a.top[0][1] < ref.threshold
            ]

        fallbacks: set[int] = set()
        asked: dict[int, _Answered] = {}
        if wanted:
            if self._admit(ref, chosen, effective, len(texts), len(wanted), allow_fallback):
                assert chosen is not None
                k = setting.demonstrations if setting is not None else 0
                asked = await self._ask_counted(chosen, model, ref, texts, wanted, k)
            else:
                fallbacks = set(wanted)

        decisions: list[Decision] = []
        escalation_rows: list[EscalationRecord] = []
        decision_rows: list[DecisionRecord] = []
        for i, answer in enumerate(answers):
            label, confidence = answer.top[0]
            label = answer.rejected_as or label
            route, escalation_id, latency_ms = Route.SPECIALIST, "", answer.latency_ms
            cost = self.cost.price(answer.core_seconds)
            got = asked.get(i)
            if got is not None:
                assert chosen is not None  # it answered
                route, latency_ms = Route.GENERALIST, answer.latency_ms + got.wait_ms
                cost = self._price(chosen, got.engine_seconds, answer.core_seconds)
                record = EscalationRecord(
                    model=ref.name,
                    model_version=ref.version,
                    text=texts[i],
                    specialist_top=list(answer.top),
                    specialist_confidence=confidence,
                    threshold=ref.threshold,
                    generalist_label=got.result.label,
                    generalist_confidence=got.result.confidence,
                    final_label=got.result.label,
                    route=route.value,
                    policy=effective.value,
                    cost=cost,
                    request_id=request_id,
                    generalist_prompt_tokens=got.result.prompt_tokens,
                    generalist_completion_tokens=got.result.completion_tokens,
                )
                escalation_rows.append(record)
                label, confidence, escalation_id = got.result.label, got.result.confidence, record.id
            decisions.append(
                Decision(
                    label=label,
                    confidence=confidence,
                    top=answer.top,
                    truncated=answer.truncated,
                    route=route,
                    latency_ms=latency_ms,
                    cost=cost,
                    probs=answer.probs,
                    escalation_id=escalation_id,
                    fallback=i in fallbacks,
                )
            )
            decision_rows.append(
                DecisionRecord(
                    model=ref.name,
                    model_version=ref.version,
                    route=route.value,
                    policy=effective.value,
                    cost=cost,
                    latency_ms=latency_ms,
                    request_id=request_id,
                    fallback=i in fallbacks,
                    escalation_id=escalation_id,
                    item=i,
                    label=label,
                    confidence=confidence,
                    margin=answer.top[0][1] - (answer.top[1][1] if len(answer.top) > 1 else 0.0),
                    text=texts[i],
                )
            )
        await self._record(escalation_rows, decision_rows)
        if self.metrics is not None:
            self.metrics.observe(ref.name, decisions, fallbacks=len(fallbacks))
        return decisions

    async def decide_spans(
        self,
        model: ModelRef | Extractor,
        extractions: Sequence[Extraction],
        policy: Policy | str | None,
        allow_fallback: bool = False,
        request_id: str = "",
        texts: Sequence[str] = (),
        generalist: str | None = None,
    ) -> list[Extraction]:
        """One extraction per text, from the extractor's, under the same policies, bounds and
        records as :meth:`decide` (:mod:`appliance.router.span_cascade`)."""
        from appliance.router.span_cascade import decide_spans  # it builds on this module

        return await decide_spans(
            self, model, extractions, policy, allow_fallback, request_id, texts, generalist
        )

    def _admit(
        self,
        ref: ModelRef,
        chosen: PricedGeneralist | None,
        effective: Policy,
        n_texts: int,
        n_wanted: int,
        allow_fallback: bool,
    ) -> bool:
        """Whether ``n_wanted`` texts of a call may go to the generalist now (False: the specialist
        answers them, as the caller allowed); raises when neither may happen."""
        reason = self._why_not_generalist(ref, chosen)
        if reason is None:
            if (problem := self.escalations.problem) is not None:
                raise FailedPrecondition(problem)  # before the generalist spends time on them
            if self.waiting + n_wanted <= self.max_waiting:
                return True
            if allow_fallback:
                return False
            raise ResourceExhausted(
                f"{self.waiting} texts are waiting for the generalist; {n_wanted} more would "
                f"pass the limit of {self.max_waiting}; retry later, or allow the fallback to "
                "the specialist"
            )
        if allow_fallback:
            return False
        raise FailedPrecondition(
            f"policy {effective.value} sends {n_wanted} of {n_texts} texts for model "
            f"{ref.name} to the generalist, but {reason}; ask for specialist_only, or allow "
            "the fallback to the specialist"
        )

    async def _record(
        self, escalation_rows: list[EscalationRecord], decision_rows: list[DecisionRecord]
    ) -> None:
        if escalation_rows:
            # Durable before the caller can send a response that names these escalation ids.
            await asyncio.to_thread(self.escalations.record, escalation_rows, decision_rows)
        else:
            # Specialist-only answers carry no record id: their rows are written in groups off the
            # hot path (a thread hop and a commit per request would cost more than the answer).
            self._pending.extend(decision_rows)
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.get_running_loop().create_task(self._flush_later())

    def _price(self, chosen: PricedGeneralist, engine_seconds: float, core_seconds: float) -> Cost:
        """The generalist's time at its own price, plus the specialist's at the box's."""
        placement = chosen.generalist.placement
        if chosen.cost == self.cost:
            return price_generalist(self.cost, placement, engine_seconds, core_seconds=core_seconds)
        spent = price_generalist(chosen.cost, placement, engine_seconds)
        specialist = self.cost.price(core_seconds)
        return Cost(
            core_seconds=spent.core_seconds + specialist.core_seconds,
            accelerator_seconds=spent.accelerator_seconds,
            price=spent.price + specialist.price,
            currency=self.cost.currency,
        )

    async def _ask_counted(
        self,
        chosen: PricedGeneralist,
        model: ModelRef | Specialist,
        ref: ModelRef,
        texts: Sequence[str],
        wanted: list[int],
        k: int,
    ) -> dict[int, _Answered]:
        """:meth:`_ask`, with its texts counted as waiting until it ends, however it ends."""
        self.waiting += len(wanted)
        try:
            demos: list[list[Demonstration]] = [[] for _ in wanted]
            if k and self.retriever is not None:
                demos = await asyncio.to_thread(self.retriever.nearest, model, [texts[i] for i in wanted], k)
            by_text = dict(zip(wanted, demos, strict=True))
            return await self._ask(chosen.generalist, ref, texts, wanted, by_text)
        finally:
            self.waiting -= len(wanted)

    async def _ask(
        self,
        generalist: Generalist,
        ref: ModelRef,
        texts: Sequence[str],
        wanted: list[int],
        demos: Mapping[int, list[Demonstration]],
    ) -> dict[int, _Answered]:
        descriptions = ref.label_descriptions or None
        known = set(ref.labels)

        async def one(i: int) -> tuple[ZeroShotResult, float, float, float]:
            queued = time.perf_counter()
            async with self._slots:
                began = time.perf_counter()
                try:
                    if demos.get(i):
                        result = await generalist.classify(
                            texts[i], ref.labels, descriptions, demonstrations=demos[i]
                        )
                    else:
                        result = await generalist.classify(texts[i], ref.labels, descriptions)
                except InvalidArgument as e:
                    raise InvalidArgument(f"text {i}: the generalist cannot take it: {e.message}") from e
                ended = time.perf_counter()
            if result.label not in known:
                raise ApplianceError(
                    f"the generalist answered {result.label!r}, not one of {ref.name}'s labels"
                )
            return result, queued, began, ended

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(i)) for i in wanted]
        except BaseExceptionGroup as failed:
            # The first failure cancelled the rest; report it with its own status.
            raise _first_error(failed) from None
        outcomes = [t.result() for t in tasks]
        parts = engine_shares(
            [(o[2], o[3]) for o in outcomes],
            [o[0].engine_seconds for o in outcomes],
            [o[0].prompt_tokens + o[0].completion_tokens for o in outcomes],
        )
        return {
            i: _Answered(result, wait_ms=1000.0 * (ended - queued), engine_seconds=part)
            for i, (result, queued, _began, ended), part in zip(wanted, outcomes, parts, strict=True)
        }


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first appliance error in a (nested) exception group, else its first exception."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        e = pending.pop(0)
        if isinstance(e, BaseExceptionGroup):
            pending[:0] = list(e.exceptions)
        else:
            leaves.append(e)
    for leaf in leaves:
        if isinstance(leaf, ApplianceError):
            return leaf
    return leaves[0]
