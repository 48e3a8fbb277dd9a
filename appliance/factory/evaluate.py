"""Evaluation: accuracy, macro-F1, per-class report, confusions, calibration, risk-coverage.

The confidence threshold is what the cascade uses: decisions at or above it are automated by the
specialist; the rest go to the generalist. It is picked on held-out data as the lowest
confidence that keeps the automated decisions' precision at the target (default 0.99), which
maximises coverage (the automation rate) subject to that precision.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from appliance.artifact.manifest import Calibration

ECE_BINS = 15
CURVE_POINTS = 21


@dataclass
class Report:
    n: int
    accuracy: float
    macro_f1: float
    ece: float
    calibration: Calibration
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    confused_pairs: list[dict[str, Any]] = field(default_factory=list)
    risk_coverage: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "ece": self.ece,
            "threshold": self.calibration.threshold,
            "coverage_at_threshold": self.calibration.coverage,
            "precision_at_threshold": self.calibration.precision,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "calibration": self.calibration.model_dump()}


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def calibrate_threshold(confidence: np.ndarray, correct: np.ndarray, target: float) -> Calibration:
    """The threshold with the largest coverage whose selective precision reaches ``target``."""
    order = np.argsort(-confidence, kind="stable")
    conf_sorted = confidence[order]
    hits = np.cumsum(correct[order])
    counts = np.arange(1, len(order) + 1)
    precision = hits / counts
    # A cut between equal confidences can't be served: only the last index of each tie counts.
    last_of_tie = np.append(conf_sorted[1:] != conf_sorted[:-1], True)
    ok = np.flatnonzero((precision >= target) & last_of_tie)
    if ok.size == 0:
        return Calibration(
            target_precision=target, threshold=1.0 + 1e-6, coverage=0.0, precision=float("nan")
        )
    k = int(ok[-1])
    return Calibration(
        target_precision=target,
        threshold=float(conf_sorted[k]),
        coverage=float(counts[k] / len(order)),
        precision=float(precision[k]),
    )


def risk_coverage_curve(confidence: np.ndarray, correct: np.ndarray) -> list[dict[str, float]]:
    order = np.argsort(-confidence, kind="stable")
    hits = np.cumsum(correct[order])
    n = len(order)
    points = []
    for coverage in np.linspace(1.0 / CURVE_POINTS, 1.0, CURVE_POINTS - 1):
        k = max(1, round(coverage * n))
        points.append(
            {
                "coverage": float(k / n),
                "risk": float(1.0 - hits[k - 1] / k),
                "threshold": float(confidence[order][k - 1]),
            }
        )
    return points


def evaluate(probs: np.ndarray, y: np.ndarray, labels: list[str], target_precision: float = 0.99) -> Report:
    """``probs`` ``[n, C]`` in label order; ``y`` the true label indices."""
    pred = probs.argmax(axis=1)
    confidence = probs[np.arange(len(pred)), pred]
    correct = (pred == y).astype(np.float64)
    per_class: dict[str, dict[str, float]] = {}
    f1s = []
    for c, label in enumerate(labels):
        tp = float(np.sum((pred == c) & (y == c)))
        predicted = float(np.sum(pred == c))
        support = float(np.sum(y == c))
        if support == 0 and predicted == 0:
            continue
        p = tp / predicted if predicted else 0.0
        r = tp / support if support else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        f1s.append(f1)
        per_class[label] = {"precision": p, "recall": r, "f1": f1, "support": support}
    confusions = Counter((int(t), int(p)) for t, p in zip(y, pred, strict=True) if t != p)
    pairs = [
        {"true": labels[t], "predicted": labels[p], "count": n} for (t, p), n in confusions.most_common(10)
    ]
    return Report(
        n=len(y),
        accuracy=float(correct.mean()),
        macro_f1=float(np.mean(f1s)) if f1s else 0.0,
        ece=expected_calibration_error(confidence, correct),
        calibration=calibrate_threshold(confidence, correct, target_precision),
        per_class=per_class,
        confused_pairs=pairs,
        risk_coverage=risk_coverage_curve(confidence, correct),
    )


def precision_at(probs: np.ndarray, y: np.ndarray, threshold: float) -> tuple[float, float]:
    """(coverage, precision) of decisions at or above a fixed threshold."""
    pred = probs.argmax(axis=1)
    return selective(probs[np.arange(len(pred)), pred], pred == y, threshold)


def selective(confidence: np.ndarray, correct: np.ndarray, threshold: float) -> tuple[float, float]:
    """(coverage, precision) of the decisions whose confidence is at or above ``threshold``;
    NaN precision when none is."""
    kept = confidence >= threshold
    if not kept.any():
        return 0.0, float("nan")
    return float(kept.mean()), float(np.asarray(correct, dtype=bool)[kept].mean())


# -- out of scope ------------------------------------------------------------------------------------

# The in-scope accuracy a rejection threshold may cost, in percentage points.
OOS_MAX_LOSS_POINTS = 0.5


def calibrate_rejection(
    probs: np.ndarray, y: np.ndarray, oos_probs: np.ndarray, max_loss_points: float = OOS_MAX_LOSS_POINTS
) -> tuple[float, float, float]:
    """(threshold, in-scope accuracy loss in points, oos recall): the highest threshold on the top
    probability (so the best out-of-scope recall) that rejects at most ``max_loss_points`` of the
    in-scope rows the head gets right. ``probs``/``y``: in-scope rows; ``oos_probs``: out-of-scope."""
    top = probs.max(axis=1)
    threshold, lost = threshold_for_loss(top, probs.argmax(axis=1) == y, max_loss_points)
    recall = float((oos_probs.max(axis=1) < threshold).mean()) if len(oos_probs) else 0.0
    return threshold, lost, recall


def threshold_for_loss(
    scores: np.ndarray, correct: np.ndarray, max_loss_points: float = OOS_MAX_LOSS_POINTS
) -> tuple[float, float]:
    """(threshold, in-scope accuracy loss in points): the highest threshold on in-scope rows' rejection
    ``scores`` (rejected when below it) that rejects at most ``max_loss_points`` of the rows, counted
    among those answered right (``correct``); rejecting a wrong answer costs no accuracy."""
    right = np.sort(scores[np.asarray(correct, dtype=bool)])
    may_lose = int(np.floor(max_loss_points / 100.0 * len(scores) + 1e-9))
    # The (may_lose+1)-th smallest right answer's score rejects at most ``may_lose`` (fewer on ties).
    if may_lose < len(right):
        threshold = float(right[may_lose])
    else:
        threshold = float(np.nextafter(right[-1], np.inf)) + 1e-6 if len(right) else 1.0 + 1e-6
    lost = float(np.sum(right < threshold)) / max(1, len(scores))
    return threshold, 100.0 * lost


def oos_scores(probs: np.ndarray, y: np.ndarray, oos_probs: np.ndarray, threshold: float) -> dict[str, float]:
    """:func:`rejection_scores` of the top probability."""
    return rejection_scores(probs, y, probs.max(axis=1), oos_probs.max(axis=1), threshold)


def rejection_scores(
    probs: np.ndarray, y: np.ndarray, in_score: np.ndarray, oos_score: np.ndarray, threshold: float
) -> dict[str, float]:
    """Out-of-scope recall and precision of rejecting scores below ``threshold``, and the in-scope
    accuracy with rejection (a rejected in-scope row counts as wrong). ``probs``/``y``/``in_score``:
    in-scope rows; ``oos_score``: out-of-scope rows. NaN precision when nothing is rejected."""
    in_rejected = in_score < threshold
    oos_rejected = oos_score < threshold
    rejected = int(in_rejected.sum() + oos_rejected.sum())
    right = (probs.argmax(axis=1) == y) & ~in_rejected
    return {
        "oos_recall": float(oos_rejected.mean()) if len(oos_score) else float("nan"),
        "oos_precision": float(oos_rejected.sum() / rejected) if rejected else float("nan"),
        "in_scope_accuracy": float(right.mean()) if len(y) else float("nan"),
    }
