"""Span-level evaluation of an extractor: exact-match precision, recall and F1 (micro and per slot),
the most frequent boundary errors, and the confidence threshold at a target precision.

A predicted span is correct when a gold span of the same text has the same label, start and end.
The threshold is calibrated on span confidence with the classifier's rule
(:func:`appliance.factory.evaluate.calibrate_threshold`); a whole text counts as answered above it
when its text confidence (:func:`appliance.artifact.spans.text_confidence`) is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from appliance.artifact.manifest import Calibration, SlotScores
from appliance.artifact.spans import Span
from appliance.factory.evaluate import calibrate_threshold

BOUNDARY_EXAMPLES = 10


@dataclass
class SpanReport:
    n_texts: int
    micro: SlotScores
    per_slot: dict[str, SlotScores]
    calibration: Calibration
    exact_texts: float  # share of texts whose predicted spans equal the gold spans
    boundary_errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def f1(self) -> float:
        return self.micro.f1

    def summary(self) -> dict[str, float]:
        cal = self.calibration
        return {
            "n": self.n_texts,
            "micro_precision": self.micro.precision,
            "micro_recall": self.micro.recall,
            "micro_f1": self.micro.f1,
            "exact_texts": self.exact_texts,
            "threshold": cal.threshold,
            "span_coverage_at_threshold": cal.coverage,
            "text_coverage_at_threshold": cal.text_coverage if cal.text_coverage is not None else 0.0,
            "precision_at_threshold": cal.precision,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "micro": self.micro.model_dump(),
            "per_slot": {k: v.model_dump() for k, v in self.per_slot.items()},
            "calibration": self.calibration.model_dump(),
        }


def _scores(tp: int, predicted: int, support: int) -> SlotScores:
    p = tp / predicted if predicted else 0.0
    r = tp / support if support else 0.0
    return SlotScores(precision=p, recall=r, f1=2 * p * r / (p + r) if p + r else 0.0, support=support)


def _boundary_kind(gold: Span, pred: Span) -> str:
    if pred.start <= gold.start and pred.end >= gold.end:
        return "too long"
    if pred.start >= gold.start and pred.end <= gold.end:
        return "too short"
    return "shifted"


def evaluate_spans(
    predicted: Sequence[Sequence[Span]],
    gold: Sequence[Sequence[Span]],
    text_confidences: Sequence[float],
    labels: Sequence[str],
    target_precision: float = 0.99,
) -> SpanReport:
    if not len(predicted) == len(gold) == len(text_confidences):
        raise ValueError("predicted, gold and text confidences must have one entry per text")
    tp: Counter[str] = Counter()
    n_pred: Counter[str] = Counter()
    n_gold: Counter[str] = Counter()
    confidence: list[float] = []
    correct: list[float] = []
    boundary: Counter[tuple[str, str, str, str]] = Counter()
    exact = 0
    for pred_spans, gold_spans in zip(predicted, gold, strict=True):
        gold_keys = {(s.label, s.start, s.end) for s in gold_spans}
        pred_keys = {(s.label, s.start, s.end) for s in pred_spans}
        exact += gold_keys == pred_keys
        n_gold.update(s.label for s in gold_spans)
        for s in pred_spans:
            hit = (s.label, s.start, s.end) in gold_keys
            n_pred[s.label] += 1
            tp[s.label] += hit
            confidence.append(s.confidence)
            correct.append(float(hit))
            if not hit:
                for g in gold_spans:
                    if g.label == s.label and g.start < s.end and s.start < g.end:
                        boundary[(s.label, _boundary_kind(g, s), g.text, s.text)] += 1
    per_slot = {label: _scores(tp[label], n_pred[label], n_gold[label]) for label in labels}
    micro = _scores(sum(tp.values()), sum(n_pred.values()), sum(n_gold.values()))
    cal = calibrate_threshold(np.array(confidence), np.array(correct), target_precision)
    text_conf = np.asarray(text_confidences, dtype=np.float64)
    calibration = cal.model_copy(
        update={"text_coverage": float((text_conf >= cal.threshold).mean()) if len(text_conf) else 0.0}
    )
    errors = [
        {"label": label, "kind": kind, "gold": g, "predicted": p, "count": n}
        for (label, kind, g, p), n in boundary.most_common(BOUNDARY_EXAMPLES)
    ]
    return SpanReport(
        n_texts=len(gold),
        micro=micro,
        per_slot=per_slot,
        calibration=calibration,
        exact_texts=exact / len(gold) if gold else 0.0,
        boundary_errors=errors,
    )


def precision_at(
    predicted: Sequence[Sequence[Span]], gold: Sequence[Sequence[Span]], threshold: float
) -> tuple[float, float]:
    """(coverage, precision) of the predicted spans at or above a fixed confidence threshold."""
    kept: list[bool] = []
    total = 0
    for pred_spans, gold_spans in zip(predicted, gold, strict=True):
        keys = {(s.label, s.start, s.end) for s in gold_spans}
        total += len(pred_spans)
        kept += [(s.label, s.start, s.end) in keys for s in pred_spans if s.confidence >= threshold]
    if not kept:
        return 0.0, float("nan")
    return len(kept) / total, sum(kept) / len(kept)
