"""The span cascade's routing logic and its validator, with a scripted generalist stand-in.

The stand-in answers spans from a script (text -> claims); the store, cost model and counters are
real. The real vLLM engine answers in tests/serving/test_serving_extract_cascade.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from scripted_generalist import ScriptedGeneralist

from appliance.engines.generalist_api import SpanAnswer, SpanClaim
from appliance.errors import FailedPrecondition
from appliance.router.cascade import Cascade, ModelRef
from appliance.router.cost import CostModel
from appliance.router.escalations import EscalationStore
from appliance.router.metrics import RouterMetrics
from appliance.router.span_cascade import is_at, merge, place_claims
from appliance.types import Cost, ExtractedSpan, Extraction, Policy, Route

SLOTS = ["date", "time", "people"]
COST = CostModel(price_per_hour=3.6, cores=2)
EMOJI = "🎉🎉 Table for 4 people tomorrow at 8pm, Zoë 🍕"


@dataclass
class ScriptedSpans(ScriptedGeneralist):
    """The scripted stand-in, answering Extract with ``spans[text]`` (else no spans)."""

    spans: dict[str, list[SpanClaim]] = field(default_factory=dict)
    extracted: list[str] = field(default_factory=list)

    async def extract(
        self,
        text: str,
        labels: Sequence[str],
        descriptions: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> SpanAnswer:
        self.extracted.append(text)
        claims = self.spans.get(text, [])
        assert all(c.label in labels for c in claims)
        return SpanAnswer(claims, self.confidence, self.prompt_tokens(text), 20, self.engine_seconds)


def extractor(threshold: float = 0.8) -> ModelRef:
    return ModelRef("r8k", 3, SLOTS, threshold, {}, Policy.CASCADE)


def span(text: str, words: str, label: str, confidence: float, nth: int = 0) -> ExtractedSpan:
    start = -1
    for _ in range(nth + 1):
        start = text.index(words, start + 1)
    return ExtractedSpan(label, start, start + len(words), words, confidence)


def extraction(spans: list[ExtractedSpan], core_seconds: float = 0.01) -> Extraction:
    return Extraction(spans=spans, truncated=False, latency_ms=2.0, cost=Cost(core_seconds=core_seconds))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EscalationStore]:
    with EscalationStore(tmp_path / "escalations.db") as s:
        yield s


def run(cascade: Cascade, extractions: list[Extraction], texts: list[str], **kw: object) -> list[Extraction]:
    import asyncio

    async def go() -> list[Extraction]:
        try:
            return await cascade.decide_spans(extractor(), extractions, texts=texts, **kw)  # type: ignore[arg-type]
        finally:
            await cascade.close()

    return asyncio.run(go())


# ------------------------------------------------------------------ the validator


def test_claims_are_placed_at_code_point_offsets_of_the_text_as_sent() -> None:
    placed = place_claims(EMOJI, [SpanClaim("people", "4"), SpanClaim("time", "8pm")], 0.5)
    assert placed.dropped == []
    assert [(s.label, s.start, s.end) for s in placed.spans] == [
        ("people", EMOJI.index("4"), EMOJI.index("4") + 1),
        ("time", EMOJI.index("8pm"), EMOJI.index("8pm") + 3),
    ]
    assert EMOJI.index("4") == 13  # two emoji count one each, not four bytes or two UTF-16 units
    assert all(EMOJI[s.start : s.end] == s.text and s.route is Route.GENERALIST for s in placed.spans)


def test_a_claim_that_is_not_a_substring_is_dropped() -> None:
    claims = [
        SpanClaim("date", "Friday"),
        SpanClaim("people", "four"),
        SpanClaim("time", "   "),
        SpanClaim("time", "8pm"),
    ]
    placed = place_claims(EMOJI, claims, 0.5)
    assert [c.text for c in placed.dropped] == ["Friday", "four", "   "]
    assert [s.text for s in placed.spans] == ["8pm"]


def test_repeated_words_take_successive_places_and_surrounding_blanks_are_stripped() -> None:
    text = "2 adults and 2 kids"
    placed = place_claims(
        text, [SpanClaim("people", " 2 "), SpanClaim("people", "2"), SpanClaim("people", "2")], 1.0
    )
    assert [(s.start, s.end) for s in placed.spans] == [(0, 1), (13, 14)]
    assert len(placed.dropped) == 1  # a third "2" is nowhere: the text has two


def test_is_at_checks_the_stated_offsets() -> None:
    assert is_at(EMOJI, span(EMOJI, "Zoë", "people", 1.0))
    assert not is_at(EMOJI, ExtractedSpan("people", 12, 13, "4", 1.0))  # one code point early
    assert not is_at(EMOJI, ExtractedSpan("people", 40, 99, "4", 1.0))
    assert not is_at(EMOJI, ExtractedSpan("people", 5, 5, "", 1.0))


def test_merge_keeps_confident_specialist_spans_over_overlapping_generalist_ones() -> None:
    text = "at 8pm for 4"
    kept = [span(text, "8pm", "time", 0.99)]
    generalist = place_claims(text, [SpanClaim("date", "8pm for"), SpanClaim("people", "4")], 0.3).spans
    assert [(s.label, s.text, s.route) for s in merge(kept, generalist)] == [
        ("time", "8pm", Route.SPECIALIST),
        ("people", "4", Route.GENERALIST),
    ]


# ------------------------------------------------------------------ routing


def test_cascade_escalates_texts_with_an_uncertain_span_and_keeps_only_real_substrings(
    store: EscalationStore,
) -> None:
    sure = "a table for 2 at 7pm"
    unsure = EMOJI
    generalist = ScriptedSpans(
        spans={
            unsure: [SpanClaim("people", "4"), SpanClaim("date", "tomorrow"), SpanClaim("time", "nine pm")]
        }
    )
    registry = CollectorRegistry()
    cascade = Cascade(generalist, store, COST, RouterMetrics(registry))
    extractions = [
        extraction([span(sure, "2", "people", 0.95), span(sure, "7pm", "time", 0.9)]),
        extraction([span(unsure, "4", "people", 0.4), span(unsure, "8pm", "time", 0.97)]),
    ]
    out = run(cascade, extractions, [sure, unsure], policy=Policy.CASCADE, request_id="r1")

    assert generalist.extracted == [unsure]
    assert out[0].escalation_id == "" and out[0].spans == extractions[0].spans
    assert out[0].cost.price == pytest.approx(COST.price(0.01).price) and out[0].cost.price > 0
    got = out[1]
    assert [(s.label, s.text, s.route) for s in got.spans] == [
        ("people", "4", Route.GENERALIST),
        ("date", "tomorrow", Route.GENERALIST),
        ("time", "8pm", Route.SPECIALIST),  # confident: kept; the generalist's "nine pm" is not in the text
    ]
    assert all(unsure[s.start : s.end] == s.text for s in got.spans)
    assert got.dropped_generalist_spans == 1 and got.escalation_id
    assert got.cost.core_seconds > 0.01  # the generalist's share and the extractor's: both spent
    dropped = registry.get_sample_value("appliance_generalist_spans_dropped_total", {"model": "r8k"})
    assert dropped == 1
    escalations = registry.get_sample_value("appliance_escalations_total", {"model": "r8k"})
    assert escalations == 1

    (row,) = list(store.iter_escalations(None, None, "r8k"))
    assert row.id == got.escalation_id and row.kind == "extract" and row.final_label == ""
    assert row.specialist_confidence == pytest.approx(0.4)
    stored = json.loads(row.generalist_spans or "[]")
    assert [(s["text"], s["start"]) for s in stored] == [
        ("4", unsure.index("4")),
        ("tomorrow", unsure.index("tomorrow")),
        ("nine pm", None),
    ]
    assert [s["text"] for s in json.loads(row.specialist_spans or "[]")] == ["4", "8pm"]


def test_generalist_only_answers_every_text_with_the_generalists_spans(store: EscalationStore) -> None:
    text = "book for 3 on monday"
    generalist = ScriptedSpans(spans={text: [SpanClaim("date", "monday")]})
    cascade = Cascade(generalist, store, COST)
    out = run(cascade, [extraction([span(text, "3", "people", 0.99)])], [text], policy=Policy.GENERALIST_ONLY)
    assert [(s.text, s.route) for s in out[0].spans] == [("monday", Route.GENERALIST)]


def test_without_a_generalist_the_policy_fails_or_falls_back(store: EscalationStore) -> None:
    text = "book for 3"
    uncertain = [extraction([span(text, "3", "people", 0.1)])]
    with pytest.raises(FailedPrecondition, match="no generalist is configured"):
        run(Cascade(None, store, COST), uncertain, [text], policy=Policy.CASCADE)
    out = run(Cascade(None, store, COST), uncertain, [text], policy=Policy.CASCADE, allow_fallback=True)
    assert (
        out[0].fallback and out[0].spans == uncertain[0].spans and out[0].spans[0].route is Route.SPECIALIST
    )
    # No policy on a box without a generalist: the extractor answers, no fallback.
    out = run(Cascade(None, store, COST), uncertain, [text], policy=None)
    assert not out[0].fallback and out[0].spans == uncertain[0].spans
