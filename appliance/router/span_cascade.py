"""The cascade for span extractors: uncertain texts' fields from the generalist, checked against the text.

Per text, under the effective policy (:mod:`appliance.router.policy`, resolved as for Classify):

- ``specialist_only``: the extractor's spans;
- ``cascade``: a text whose spans all reach the extractor's calibrated threshold (its manifest's
  calibration) keeps them. A text with a span below it goes to the generalist: its confident spans
  stay (route ``specialist``), the uncertain ones give way to the generalist's spans that overlap
  no confident one (route ``generalist``). A text with no span at all is not escalated: the
  threshold is calibrated on spans;
- ``generalist_only``: the generalist's spans alone.

The generalist states each field as ``{label, text}`` under a JSON schema that lists the
extractor's slots (:meth:`appliance.engines.generalist.GeneralistEngine.extract`), not as offsets:
a language model copies words well and counts characters badly. :func:`place_claims` finds the
words in the text (code points of the text as sent, left to right, never overlapping a span it
already placed) and keeps a span only if ``text[start:end]`` is exactly its words. Anything else
is dropped and counted: per text in ``Extraction.dropped_generalist_spans``, in the counter
``appliance_generalist_spans_dropped_total`` and in the escalation row.

Admission (no generalist, the waiting bound, fallbacks, a damaged store), concurrency slots, cost
(the generalist's share of the engine's time plus the extractor's: both were spent) and the
durable records are those of :class:`appliance.router.cascade.Cascade`, which this module extends.
An escalation row has kind ``extract``, both span lists as JSON, no labels (``""``) and the
lowest specialist span confidence.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from appliance.engines.generalist_api import Generalist, SpanAnswer, SpanClaim
from appliance.errors import ApplianceError, InvalidArgument
from appliance.router.cascade import Cascade, ModelRef, _first_error
from appliance.router.cost import engine_shares
from appliance.router.escalations import DecisionRecord, EscalationRecord
from appliance.router.policy import resolve_policy
from appliance.types import ExtractedSpan, Extraction, Policy, Route

if TYPE_CHECKING:
    from appliance.engines.extractor import Extractor


@dataclass(frozen=True)
class Placed:
    """The generalist's claims for one text: those found in it, and those that were not."""

    spans: list[ExtractedSpan]
    dropped: list[SpanClaim]


def is_at(source: str, span: ExtractedSpan) -> bool:
    """Whether ``span`` is a non-empty substring of ``source`` at the offsets it states."""
    return 0 <= span.start < span.end <= len(source) and source[span.start : span.end] == span.text


def place_claims(source: str, claims: Sequence[SpanClaim], confidence: float) -> Placed:
    """Each claim at the first place in ``source`` that holds its words (stripped) and overlaps no
    claim placed before it; a claim with no such place is dropped."""
    spans: list[ExtractedSpan] = []
    dropped: list[SpanClaim] = []
    for claim in claims:
        words = claim.text.strip()
        start = source.find(words) if words else -1
        while start >= 0 and any(_overlap((start, start + len(words)), s) for s in spans):
            start = source.find(words, start + 1)
        span = ExtractedSpan(claim.label, start, start + len(words), words, confidence, Route.GENERALIST)
        if start < 0 or not is_at(source, span):
            dropped.append(claim)
        else:
            spans.append(span)
    return Placed(sorted(spans, key=lambda s: (s.start, s.end)), dropped)


def merge(kept: Sequence[ExtractedSpan], generalist: Sequence[ExtractedSpan]) -> list[ExtractedSpan]:
    """The kept (confident) specialist spans plus the generalist's that overlap none of them."""
    added = [g for g in generalist if not any(_overlap((k.start, k.end), g) for k in kept)]
    return sorted([*kept, *added], key=lambda s: (s.start, s.end))


def _overlap(a: tuple[int, int], b: ExtractedSpan) -> bool:
    return a[0] < b.end and b.start < a[1]


def spans_json(spans: Sequence[ExtractedSpan], dropped: Sequence[SpanClaim] = ()) -> str:
    """Spans as stored in an escalation row; a dropped claim has no offsets."""
    rows: list[dict[str, object]] = [
        {"label": s.label, "start": s.start, "end": s.end, "text": s.text, "confidence": s.confidence}
        for s in spans
    ]
    rows += [{"label": c.label, "start": None, "end": None, "text": c.text, "dropped": True} for c in dropped]
    return json.dumps(rows, ensure_ascii=False)


@dataclass(frozen=True)
class _Asked:
    answer: SpanAnswer
    wait_ms: float  # queueing for a slot plus the generalist's own time
    engine_seconds: float  # this text's share of the engine's busy span


async def decide_spans(
    cascade: Cascade,
    model: ModelRef | Extractor,
    extractions: Sequence[Extraction],
    policy: Policy | str | None,
    allow_fallback: bool = False,
    request_id: str = "",
    texts: Sequence[str] = (),
    generalist: str | None = None,
) -> list[Extraction]:
    """:meth:`Cascade.decide_spans`: one extraction per text, in order, from the extractor's."""
    ref = ModelRef.of(model)
    if len(extractions) != len(texts):
        raise ApplianceError(f"{len(extractions)} extractions for {len(texts)} texts")
    chosen = cascade.generalists.choose(generalist, cascade.settings.get(ref.name))
    effective = resolve_policy(policy, ref.default_policy, chosen is not None)
    if effective is Policy.SPECIALIST_ONLY:
        wanted: list[int] = []
    elif effective is Policy.GENERALIST_ONLY:
        wanted = list(range(len(texts)))
    else:
        wanted = [i for i, e in enumerate(extractions) if any(s.confidence < ref.threshold for s in e.spans)]

    fallbacks: set[int] = set()
    asked: dict[int, _Asked] = {}
    if wanted:
        if cascade._admit(ref, chosen, effective, len(texts), len(wanted), allow_fallback):
            assert chosen is not None
            cascade.waiting += len(wanted)
            try:
                asked = await _ask(cascade, chosen.generalist, ref, texts, wanted)
            finally:
                cascade.waiting -= len(wanted)
        else:
            fallbacks = set(wanted)

    results: list[Extraction] = []
    escalation_rows: list[EscalationRecord] = []
    decision_rows: list[DecisionRecord] = []
    dropped_total = 0
    for i, extraction in enumerate(extractions):
        lowest = min((s.confidence for s in extraction.spans), default=None)
        result = replace(
            extraction, cost=cascade.cost.price(extraction.cost.core_seconds), fallback=i in fallbacks
        )
        got = asked.get(i)
        if got is not None:
            assert chosen is not None  # it answered
            placed = place_claims(texts[i], got.answer.spans, got.answer.confidence)
            kept = (
                []
                if effective is Policy.GENERALIST_ONLY
                else [s for s in extraction.spans if s.confidence >= ref.threshold]
            )
            cost = cascade._price(chosen, got.engine_seconds, extraction.cost.core_seconds)
            record = EscalationRecord(
                model=ref.name,
                model_version=ref.version,
                text=texts[i],
                specialist_top=[],
                specialist_confidence=lowest if lowest is not None else 1.0,
                threshold=ref.threshold,
                generalist_label="",
                generalist_confidence=got.answer.confidence,
                final_label="",
                route=Route.GENERALIST.value,
                policy=effective.value,
                cost=cost,
                request_id=request_id,
                generalist_prompt_tokens=got.answer.prompt_tokens,
                generalist_completion_tokens=got.answer.completion_tokens,
                kind="extract",
                specialist_spans=spans_json(extraction.spans),
                generalist_spans=spans_json(placed.spans, placed.dropped),
            )
            escalation_rows.append(record)
            dropped_total += len(placed.dropped)
            result = replace(
                result,
                spans=merge(kept, placed.spans),
                latency_ms=extraction.latency_ms + got.wait_ms,
                cost=cost,
                escalation_id=record.id,
                dropped_generalist_spans=len(placed.dropped),
            )
        results.append(result)
        decision_rows.append(
            DecisionRecord(
                model=ref.name,
                model_version=ref.version,
                route=(Route.GENERALIST if got is not None else Route.SPECIALIST).value,
                policy=effective.value,
                cost=result.cost,
                latency_ms=result.latency_ms,
                request_id=request_id,
                fallback=i in fallbacks,
                escalation_id=result.escalation_id,
                item=i,
                confidence=lowest,
                text=texts[i],
            )
        )
    await cascade._record(escalation_rows, decision_rows)
    if cascade.metrics is not None:
        metrics = cascade.metrics
        metrics.observe_extractions(ref.name, results, fallbacks=len(fallbacks), dropped=dropped_total)
    return results


async def _ask(
    cascade: Cascade, generalist: Generalist, ref: ModelRef, texts: Sequence[str], wanted: list[int]
) -> dict[int, _Asked]:
    descriptions = ref.label_descriptions or None

    async def one(i: int) -> tuple[SpanAnswer, float, float, float]:
        queued = time.perf_counter()
        async with cascade._slots:
            began = time.perf_counter()
            try:
                answer = await generalist.extract(texts[i], ref.labels, descriptions)
            except InvalidArgument as e:
                raise InvalidArgument(f"text {i}: the generalist cannot take it: {e.message}") from e
            ended = time.perf_counter()
        return answer, queued, began, ended

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(i)) for i in wanted]
    except BaseExceptionGroup as failed:
        raise _first_error(failed) from None  # the first failure cancelled the rest
    outcomes = [t.result() for t in tasks]
    parts = engine_shares(
        [(began, ended) for _, _, began, ended in outcomes],
        [answer.engine_seconds for answer, *_ in outcomes],
        [answer.prompt_tokens + answer.completion_tokens for answer, *_ in outcomes],
    )
    return {
        i: _Asked(answer, wait_ms=1000.0 * (ended - queued), engine_seconds=part)
        for i, (answer, queued, _, ended), part in zip(wanted, outcomes, parts, strict=True)
    }
