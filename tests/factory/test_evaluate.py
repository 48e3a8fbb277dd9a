"""Evaluation metrics on hand-made confidences, and against plain reference computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from appliance.artifact.maths import softmax
from appliance.factory.evaluate import (
    CURVE_POINTS,
    calibrate_threshold,
    evaluate,
    expected_calibration_error,
    precision_at,
    risk_coverage_curve,
)


def arrays(confidence: list[float], correct: list[int]) -> tuple[np.ndarray, np.ndarray]:
    return np.array(confidence, dtype=np.float64), np.array(correct, dtype=np.float64)


def brute_force_threshold(confidence: np.ndarray, correct: np.ndarray, target: float) -> tuple[float, float]:
    """(threshold, coverage): try every confidence as the cut, keep the widest one on target."""
    best = (math.inf, 0.0)
    for t in np.unique(confidence):
        kept = confidence >= t
        if correct[kept].mean() >= target and kept.mean() > best[1]:
            best = (float(t), float(kept.mean()))
    return best


# -- calibrate_threshold -------------------------------------------------------------------------------


def test_threshold_takes_the_widest_cut_on_target() -> None:
    conf, ok = arrays([0.9, 0.8, 0.7, 0.6], [1, 1, 0, 1])
    # cumulative precision from the top: 1, 1, 2/3, 3/4
    wide = calibrate_threshold(conf, ok, target=0.75)
    assert (wide.threshold, wide.coverage, wide.precision) == (0.6, 1.0, 0.75)
    narrow = calibrate_threshold(conf, ok, target=0.8)
    assert (narrow.threshold, narrow.coverage, narrow.precision) == (0.8, 0.5, 1.0)
    assert narrow.target_precision == 0.8


def test_threshold_ignores_input_order() -> None:
    conf, ok = arrays([0.6, 0.9, 0.7, 0.8], [1, 1, 0, 1])
    cal = calibrate_threshold(conf, ok, target=0.8)
    assert (cal.threshold, cal.coverage) == (0.8, 0.5)


@pytest.mark.parametrize("tie_order", [[1, 0], [0, 1]])
def test_a_threshold_never_splits_tied_confidences(tie_order: list[int]) -> None:
    # Two decisions at 0.8, one right, one wrong. Keeping "only the right one" is not a threshold
    # that can be served, so precision 1.0 is reachable only above 0.8.
    conf, ok = arrays([0.9, 0.8, 0.8, 0.7], [1, *tie_order, 0])
    cal = calibrate_threshold(conf, ok, target=1.0)
    assert (cal.threshold, cal.coverage, cal.precision) == (0.9, 0.25, 1.0)
    # at 2/3 the tie is taken whole, and no further
    cal = calibrate_threshold(conf, ok, target=2 / 3)
    assert (cal.threshold, cal.coverage) == (0.8, 0.75)


def test_an_unreachable_target_covers_nothing() -> None:
    conf, ok = arrays([0.9, 0.8, 0.5], [0, 1, 1])
    cal = calibrate_threshold(conf, ok, target=1.0)
    assert cal.coverage == 0.0
    assert math.isnan(cal.precision)
    assert cal.threshold > 1.0  # no softmax confidence reaches it
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    assert precision_at(probs, np.array([1, 1, 0]), cal.threshold)[0] == 0.0


def test_all_correct_covers_everything() -> None:
    conf, ok = arrays([0.4, 0.9, 0.35], [1, 1, 1])
    cal = calibrate_threshold(conf, ok, target=0.99)
    assert (cal.threshold, cal.coverage, cal.precision) == (0.35, 1.0, 1.0)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("target", [0.5, 0.9, 0.99])
def test_threshold_matches_brute_force(seed: int, target: float) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 200))
    # rounded, so that ties are common
    confidence = np.round(rng.uniform(0.2, 1.0, n), 2)
    correct = (rng.uniform(size=n) < confidence).astype(np.float64)
    cal = calibrate_threshold(confidence, correct, target)
    threshold, coverage = brute_force_threshold(confidence, correct, target)
    assert cal.coverage == pytest.approx(coverage)
    if coverage:
        assert cal.threshold == threshold
        kept = confidence >= cal.threshold
        assert cal.precision == pytest.approx(correct[kept].mean())
        assert cal.precision >= target


# -- expected calibration error ---------------------------------------------------------------------------


def test_ece_of_a_perfectly_calibrated_toy_is_zero() -> None:
    # 80% right at confidence 0.8, 50% right at 0.5, 100% right at 1.0
    conf, ok = arrays([0.8] * 10 + [0.5] * 4 + [1.0] * 3, [1] * 8 + [0] * 2 + [1, 0, 1, 0] + [1] * 3)
    assert expected_calibration_error(conf, ok) == pytest.approx(0.0, abs=1e-12)


def test_ece_weights_each_bin_by_its_share() -> None:
    # 4 at 0.9 with half right: gap 0.4; 6 at 0.3 with a third right: gap 1/30
    conf, ok = arrays([0.9] * 4 + [0.3] * 6, [1, 1, 0, 0, 1, 1, 0, 0, 0, 0])
    assert expected_calibration_error(conf, ok) == pytest.approx(0.4 * 0.4 + 0.6 / 30)


def test_ece_of_an_always_sure_coin_flip() -> None:
    conf, ok = arrays([1.0] * 6, [1, 0, 1, 0, 1, 0])
    assert expected_calibration_error(conf, ok) == pytest.approx(0.5)


# -- risk-coverage ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 100, 1000])
def test_risk_coverage_curve(n: int) -> None:
    rng = np.random.default_rng(n)
    confidence = rng.uniform(0.1, 1.0, n)
    correct = (rng.uniform(size=n) < confidence).astype(np.float64)
    curve = risk_coverage_curve(confidence, correct)
    assert len(curve) == CURVE_POINTS - 1
    coverages = [p["coverage"] for p in curve]
    thresholds = [p["threshold"] for p in curve]
    assert coverages == sorted(coverages) and coverages[-1] == 1.0
    assert thresholds == sorted(thresholds, reverse=True)
    assert curve[-1]["risk"] == pytest.approx(1.0 - correct.mean())
    for point in curve:
        kept = confidence >= point["threshold"]  # distinct confidences: the cut is exact
        assert kept.mean() == pytest.approx(point["coverage"])
        assert point["risk"] == pytest.approx(1.0 - correct[kept].mean())


def test_confident_decisions_carry_less_risk_when_confidence_is_informative() -> None:
    confidence = np.linspace(0.05, 1.0, 400)
    correct = (confidence > 0.3).astype(np.float64)  # every mistake has low confidence
    curve = risk_coverage_curve(confidence, correct)
    risks = [p["risk"] for p in curve]
    assert risks == sorted(risks)
    assert risks[0] == 0.0 and risks[-1] > 0.2


# -- the full report ------------------------------------------------------------------------------------


def random_probs(rng: np.random.Generator, n: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes))
    logits[np.arange(n), y] += 1.5  # better than chance, not perfect
    return softmax(logits), y


@pytest.mark.parametrize("seed", range(5))
def test_report_agrees_with_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = [f"l{i}" for i in range(6)]
    probs, y = random_probs(rng, 300, len(labels))
    pred = probs.argmax(axis=1)
    report = evaluate(probs, y, labels, target_precision=0.9)
    assert report.n == 300
    assert report.accuracy == pytest.approx(accuracy_score(y, pred))
    assert report.macro_f1 == pytest.approx(f1_score(y, pred, average="macro"))
    p, r, f, support = precision_recall_fscore_support(y, pred, labels=range(6), zero_division=0)
    for i, label in enumerate(labels):
        got = report.per_class[label]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx(
            (p[i], r[i], f[i], support[i])
        )
    # calibration on the same confidences as the report's
    confidence = probs.max(axis=1)
    cal = calibrate_threshold(confidence, (pred == y).astype(float), 0.9)
    assert report.calibration == cal
    summary = report.summary()
    assert summary["threshold"] == cal.threshold and summary["coverage_at_threshold"] == cal.coverage
    # the confusion list counts real mistakes, most frequent first
    counts = [pair["count"] for pair in report.confused_pairs]
    assert counts == sorted(counts, reverse=True)
    for pair in report.confused_pairs:
        t, q = labels.index(pair["true"]), labels.index(pair["predicted"])
        assert t != q and pair["count"] == int(np.sum((y == t) & (pred == q)))


def test_report_of_a_perfect_classifier() -> None:
    y = np.array([0, 1, 2, 2, 1, 0])
    probs = np.eye(3)[y] * 0.9 + 0.1 / 3
    report = evaluate(probs, y, ["a", "b", "c"])
    assert (report.accuracy, report.macro_f1) == (1.0, 1.0)
    assert report.confused_pairs == []
    assert report.calibration.coverage == 1.0


def test_labels_absent_from_the_data_do_not_dilute_macro_f1() -> None:
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1]])
    report = evaluate(probs, y, ["a", "b", "never_seen"])
    assert set(report.per_class) == {"a", "b"}
    assert report.macro_f1 == pytest.approx(f1_score(y, probs.argmax(axis=1), average="macro"))
    assert report.confused_pairs == [{"true": "b", "predicted": "a", "count": 1}]


def test_precision_at_a_fixed_threshold() -> None:
    probs = np.array([[0.95, 0.05], [0.1, 0.9], [0.3, 0.7], [0.55, 0.45]])
    y = np.array([0, 0, 1, 0])
    assert precision_at(probs, y, 0.9) == (0.5, 0.5)
    assert precision_at(probs, y, 0.7) == (0.75, pytest.approx(2 / 3))
    coverage, precision = precision_at(probs, y, 0.99)
    assert coverage == 0.0 and math.isnan(precision)


def test_softmax_is_stable_for_large_logits() -> None:
    out = softmax(np.array([[1000.0, 1000.0, -1000.0], [0.0, 1.0, 2.0]]))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out.sum(axis=1), 1.0)
    np.testing.assert_allclose(out[0], [0.5, 0.5, 0.0], atol=1e-12)
    np.testing.assert_allclose(out[1], np.exp([0, 1, 2]) / np.exp([0, 1, 2]).sum())
