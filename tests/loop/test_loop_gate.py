"""The gate over known predictions: a worse challenger is refused, a better one passes, the
verdict is recorded beside the version and only counts for the manifest it judged."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from appliance.errors import FailedPrecondition, InvalidArgument
from appliance.loop.gate import (
    GateConfig,
    LabelledTexts,
    Predictions,
    judge,
    load_verdict,
    manifest_sha256,
    save_verdict,
)
from appliance.loop.promotion import LoopPolicy, promote
from appliance.store import ModelStore

N = 400
LABELS = ["a", "b", "c", "d"]


@dataclass(frozen=True)
class Fixed:
    """Answers texts "t<i>" with a fixed label and confidence per index."""

    labels: list[str]
    confidence: np.ndarray
    threshold: float | None = None

    def predict(self, texts: Sequence[str]) -> Predictions:
        index = [int(t[1:]) for t in texts]
        return Predictions([self.labels[i] for i in index], self.confidence[index], self.threshold)


def golden(n: int = N) -> LabelledTexts:
    return LabelledTexts([f"t{i}" for i in range(n)], [LABELS[i % 4] for i in range(n)], "golden fixture")


def predictor(wrong: set[int], seed: int, n: int = N) -> Fixed:
    """Right except on ``wrong``; confident where right, unsure where wrong (some overlap)."""
    rng = np.random.default_rng(seed)
    truth = golden(n).labels
    labels = [LABELS[(LABELS.index(t) + 1) % 4] if i in wrong else t for i, t in enumerate(truth)]
    confidence = np.where([i in wrong for i in range(n)], rng.uniform(0.3, 0.9, n), rng.uniform(0.6, 1.0, n))
    return Fixed(labels, confidence)


def test_a_worse_challenger_is_refused_with_its_p_value() -> None:
    champion = predictor(set(range(0, 40)), seed=1)  # 90% right
    challenger = predictor(set(range(0, 40)) | set(range(100, 130)), seed=2)  # 82.5%: 30 more wrong
    verdict = judge("m", (1, 2), (champion, challenger), golden(), None, GateConfig())
    assert not verdict.passed
    checks = {c.name: c for c in verdict.checks}
    assert not checks["accuracy"].passed
    assert not checks["mcnemar"].passed  # 30 discordant pairs, all one way
    assert verdict.golden.test.b == 30 and verdict.golden.test.c == 0
    assert verdict.golden.test.p_mid < 1e-8
    assert verdict.golden.accuracy_delta_points == pytest.approx(-7.5)


def test_a_better_challenger_passes_and_a_tiny_drop_is_tolerated() -> None:
    champion = predictor(set(range(0, 40)), seed=1)
    better = predictor(set(range(0, 20)), seed=1)  # the same confidences, 20 fewer errors
    verdict = judge("m", (1, 2), (champion, better), golden(), None, GateConfig())
    assert verdict.passed, verdict.checks
    assert verdict.golden.challenger.coverage >= verdict.golden.champion.coverage
    assert verdict.golden.test.c == 20

    # one more error in 400 is 0.25 points: over the default 0.2, within a 0.3 margin
    worse_by_one = predictor(set(range(0, 41)), seed=1)
    strict = judge("m", (1, 2), (champion, worse_by_one), golden(), None, GateConfig())
    lenient = judge(
        "m", (1, 2), (champion, worse_by_one), golden(), None,
        GateConfig(max_accuracy_drop_points=0.3, min_coverage_gain_points=-5.0),
    )  # fmt: skip
    assert not {c.name: c for c in strict.checks}["accuracy"].passed
    assert lenient.passed, lenient.checks


def test_coverage_lower_at_the_target_precision_is_refused() -> None:
    champion = predictor(set(range(0, 40)), seed=1)
    # same answers, but the errors are now as confident as the right ones: nothing reaches 0.99
    flat = Fixed(champion.labels, np.full(N, 0.8))
    verdict = judge("m", (1, 2), (champion, flat), golden(), None, GateConfig())
    checks = {c.name: c for c in verdict.checks}
    assert checks["accuracy"].passed and checks["mcnemar"].passed
    assert not checks["coverage"].passed
    assert verdict.golden.challenger.coverage == 0.0


def test_coverage_at_each_versions_calibrated_threshold() -> None:
    base = predictor(set(range(0, 40)), seed=1)
    champion = Fixed(base.labels, base.confidence, threshold=0.6)
    timid = Fixed(base.labels, base.confidence, threshold=0.95)  # same answers, a higher threshold
    verdict = judge("m", (1, 2), (champion, timid), golden(), None, GateConfig())
    golden_scores = verdict.golden
    assert golden_scores.champion.threshold_source == "calibrated" and golden_scores.champion.threshold == 0.6
    expected = float((base.confidence >= 0.95).mean())
    assert golden_scores.challenger.coverage == pytest.approx(expected)
    right = np.array([p == t for p, t in zip(base.labels, golden().labels, strict=True)])
    assert golden_scores.challenger.precision == pytest.approx(right[base.confidence >= 0.95].mean())
    assert [c.name for c in verdict.checks if not c.passed] == ["coverage"]


def test_traffic_is_reported_never_gated() -> None:
    champion = predictor(set(range(0, 40)), seed=1)
    challenger = predictor(set(range(0, 20)), seed=1)
    traffic = LabelledTexts([f"t{i}" for i in range(50)], ["d"] * 50, "corrections")  # all wrong for both
    verdict = judge("m", (1, 2), (champion, challenger), golden(), traffic, GateConfig())
    assert verdict.passed
    assert verdict.traffic is not None and verdict.traffic.n == 50


def test_bad_settings_and_empty_sets_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="target precision"):
        GateConfig(target_precision=1.5)
    empty = LabelledTexts([], [], "nothing")
    with pytest.raises(InvalidArgument, match="no texts"):
        judge("m", (1, 2), (predictor(set(), 1), predictor(set(), 1)), empty, None, GateConfig())


def _fake_version(store: ModelStore, name: str, version: int, body: str) -> None:
    folder = store.path(name, version)
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"name": name, "version": version, "x": body}))


def test_verdict_recorded_beside_the_version_and_bound_to_its_manifest(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _fake_version(store, "m", 2, "first")
    champion, challenger = predictor(set(range(40)), 1), predictor(set(range(20)), 1)
    verdict = judge(
        "m", (1, 2), (champion, challenger), golden(), None, GateConfig(), manifest_sha256(store, "m", 2)
    )
    path = save_verdict(store, verdict)
    assert path == tmp_path / "models" / "m" / "2.gate.json"
    again = load_verdict(store, "m", 2)
    assert again is not None and again.passed and again.golden == verdict.golden
    assert store.versions("m") == [2]  # the record is not taken for a version

    loaded: list[str] = []
    assert promote(store, "m", 2, lambda ref: loaded.append(ref) or 1) == 1
    assert loaded == ["m:2"]

    # a different manifest under the same number (removed and republished): the verdict is void
    (store.path("m", 2) / "manifest.json").write_text("{}")
    assert load_verdict(store, "m", 2) is None
    with pytest.raises(FailedPrecondition, match="has not been gated"):
        promote(store, "m", 2, lambda ref: 1)
    assert promote(store, "m", 2, lambda ref: 1, force=True) == 1


def test_a_refused_verdict_blocks_promotion(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _fake_version(store, "m", 3, "worse")
    worse = predictor(set(range(80)), 2)
    verdict = judge("m", (1, 3), (predictor(set(range(40)), 1), worse), golden(), None, GateConfig(),
                    manifest_sha256(store, "m", 3))  # fmt: skip
    save_verdict(store, verdict)
    with pytest.raises(FailedPrecondition, match="failed the gate"):
        promote(store, "m", 3, lambda ref: pytest.fail("LoadModel must not be called"))


def test_policy_file_sets_auto_promotion_and_the_rule(tmp_path: Path) -> None:
    assert LoopPolicy.read(tmp_path) == LoopPolicy()  # off by default
    (tmp_path / "loop").mkdir()
    (tmp_path / "loop" / "policy.json").write_text(
        json.dumps({"auto_promote": True, "gate": {"max_accuracy_drop_points": 0.5}})
    )
    policy = LoopPolicy.read(tmp_path)
    assert policy.auto_promote and policy.gate.max_accuracy_drop_points == 0.5
    (tmp_path / "loop" / "policy.json").write_text(json.dumps({"gate": {"nonsense": 1}}))
    with pytest.raises(FailedPrecondition, match="not a loop policy"):
        LoopPolicy.read(tmp_path)


def test_the_rule_is_described_from_its_settings() -> None:
    from appliance.factory.gate_rule import describe

    text = describe(GateConfig())
    assert "0.2 points" in text and "precision 0.99" in text and "mid-p < 0.05" in text
    custom = describe(GateConfig(max_accuracy_drop_points=1.0, min_coverage_gain_points=-2.0, alpha=0.01))
    assert "1 points" in custom and "-2 points" in custom and "mid-p < 0.01" in custom
