"""The gate: is a challenger at least as good as the champion, on the same texts?

Both versions answer the same frozen golden set (held out once, never trained on) and, for the
record, the recent corrected traffic. The challenger passes when, on the golden set:

- its accuracy is at least the champion's minus ``max_accuracy_drop_points`` (default 0.2),
- its coverage at the target precision is at least the champion's plus
  ``min_coverage_gain_points`` (default 0: no lower). Coverage is the share of golden texts at or
  above each version's own calibrated threshold (the factory's ``calibrate_threshold`` on its
  held-out data, target 0.99: what the cascade will automate), with the precision reached there
  reported beside it. The threshold is not re-fitted on the golden set: at precision 0.99 a
  threshold fitted on a few hundred texts hinges on two or three errors, and its coverage with it;
  a version without one (a bench's head) is scored at the threshold that reaches the target on
  the golden texts themselves,
- and McNemar's paired test does not find it worse (challenger wrong where the champion is right
  more often than the reverse, mid-p below ``alpha``, default 0.05).

Corrected traffic is reported, never gated on: the challenger was trained on it.
The verdict is written beside the version (``models/<name>/<version>.gate.json``) together with
the sha256 of the manifest it judged, so a later version published under a reused number is never
taken as gated.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from appliance.errors import InvalidArgument
from appliance.factory.evaluate import calibrate_threshold, selective
from appliance.factory.gate_rule import GateConfig
from appliance.loop.stats import McNemar, mcnemar
from appliance.store import MANIFEST, ModelStore

VERDICT_SUFFIX = ".gate.json"


@dataclass(frozen=True)
class Predictions:
    labels: list[str]
    confidence: np.ndarray  # the top-1 score per text
    # The version's calibrated threshold (its manifest's): coverage is measured there. None: the
    # threshold reaching the target precision on the scored texts themselves.
    threshold: float | None = None


class Predictor(Protocol):
    """A version that labels texts offline (a loaded specialist, or a bench's in-memory head)."""

    def predict(self, texts: Sequence[str]) -> Predictions: ...


@dataclass(frozen=True)
class LabelledTexts:
    texts: list[str]
    labels: list[str]
    source: str  # where they came from, for the verdict


@dataclass(frozen=True)
class SideScores:
    accuracy: float
    coverage: float  # at the target precision: the share at or above the threshold
    precision: float  # of those decisions, on these texts (NaN when none)
    threshold: float
    threshold_source: str  # "calibrated" (the version's own) or "these texts"


@dataclass(frozen=True)
class Comparison:
    """Champion and challenger on one set of texts."""

    source: str
    n: int
    champion: SideScores
    challenger: SideScores
    test: McNemar

    @property
    def accuracy_delta_points(self) -> float:
        return 100.0 * (self.challenger.accuracy - self.champion.accuracy)

    @property
    def coverage_delta_points(self) -> float:
        return 100.0 * (self.challenger.coverage - self.champion.coverage)


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Verdict:
    model: str
    champion_version: int
    challenger_version: int
    passed: bool
    checks: list[Check]
    golden: Comparison
    traffic: Comparison | None
    config: GateConfig
    challenger_manifest_sha256: str = ""
    created_epoch: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("golden", "traffic"):
            if out[key] is not None:
                comparison: Comparison = getattr(self, key)
                out[key]["accuracy_delta_points"] = comparison.accuracy_delta_points
                out[key]["coverage_delta_points"] = comparison.coverage_delta_points
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Verdict:
        def comparison(d: dict[str, Any] | None) -> Comparison | None:
            if d is None:
                return None
            return Comparison(
                source=d["source"],
                n=d["n"],
                champion=SideScores(**d["champion"]),
                challenger=SideScores(**d["challenger"]),
                test=McNemar(**d["test"]),
            )

        golden = comparison(data["golden"])
        assert golden is not None
        return cls(
            model=data["model"],
            champion_version=data["champion_version"],
            challenger_version=data["challenger_version"],
            passed=data["passed"],
            checks=[Check(**c) for c in data["checks"]],
            golden=golden,
            traffic=comparison(data.get("traffic")),
            config=GateConfig(**data["config"]),
            challenger_manifest_sha256=data.get("challenger_manifest_sha256", ""),
            created_epoch=data.get("created_epoch", 0.0),
        )


def side_scores(predictions: Predictions, truth: Sequence[str], target: float) -> SideScores:
    """Accuracy, and coverage at the target precision: at the version's calibrated threshold when
    it has one (what the cascade will automate), else at the threshold reaching the target on
    these texts."""
    correct = np.array([p == t for p, t in zip(predictions.labels, truth, strict=True)], dtype=np.float64)
    confidence = np.asarray(predictions.confidence, dtype=np.float64)
    if predictions.threshold is not None:
        coverage, precision = selective(confidence, correct, predictions.threshold)
        return SideScores(float(correct.mean()), coverage, precision, predictions.threshold, "calibrated")
    calibration = calibrate_threshold(confidence, correct, target)
    return SideScores(
        float(correct.mean()),
        calibration.coverage,
        calibration.precision,
        calibration.threshold,
        "these texts",
    )


def compare(champion: Predictor, challenger: Predictor, data: LabelledTexts, target: float) -> Comparison:
    if not data.texts:
        raise InvalidArgument(f"{data.source}: no texts to compare the versions on")
    ours, theirs = champion.predict(data.texts), challenger.predict(data.texts)
    truth = data.labels
    right_a = np.array([p == t for p, t in zip(ours.labels, truth, strict=True)])
    right_z = np.array([p == t for p, t in zip(theirs.labels, truth, strict=True)])
    return Comparison(
        source=data.source,
        n=len(truth),
        champion=side_scores(ours, truth, target),
        challenger=side_scores(theirs, truth, target),
        test=mcnemar(right_a, right_z),
    )


def checks_for(golden: Comparison, config: GateConfig) -> list[Check]:
    drop = -golden.accuracy_delta_points
    worse = golden.test.b > golden.test.c and golden.test.p_mid < config.alpha
    return [
        Check(
            "accuracy",
            drop <= config.max_accuracy_drop_points + 1e-9,
            f"{100 * golden.challenger.accuracy:.2f}% vs {100 * golden.champion.accuracy:.2f}% "
            f"({golden.accuracy_delta_points:+.2f} points; "
            f"at most {config.max_accuracy_drop_points:g} lower)",
        ),
        Check(
            "coverage",
            golden.coverage_delta_points >= config.min_coverage_gain_points - 1e-9,
            f"{100 * golden.challenger.coverage:.2f}% vs {100 * golden.champion.coverage:.2f}% at precision "
            f"{config.target_precision:g} ({golden.coverage_delta_points:+.2f} points)",
        ),
        Check(
            "mcnemar",
            not worse,
            f"b={golden.test.b} c={golden.test.c} mid-p={golden.test.p_mid:.4g} "
            f"exact p={golden.test.p_exact:.4g}" + (" (significantly worse)" if worse else ""),
        ),
    ]


def judge(
    model: str,
    versions: tuple[int, int],
    predictors: tuple[Predictor, Predictor],
    golden: LabelledTexts,
    traffic: LabelledTexts | None,
    config: GateConfig,
    challenger_manifest_sha256: str = "",
) -> Verdict:
    """The verdict on ``versions`` = (champion, challenger), answered by ``predictors`` in that order."""
    champion, challenger = predictors
    on_golden = compare(champion, challenger, golden, config.target_precision)
    on_traffic = (
        compare(champion, challenger, traffic, config.target_precision) if traffic and traffic.texts else None
    )
    checks = checks_for(on_golden, config)
    return Verdict(
        model=model,
        champion_version=versions[0],
        challenger_version=versions[1],
        passed=all(c.passed for c in checks),
        checks=checks,
        golden=on_golden,
        traffic=on_traffic,
        config=config,
        challenger_manifest_sha256=challenger_manifest_sha256,
    )


# -- the record beside the version ---------------------------------------------------------------


def manifest_sha256(store: ModelStore, name: str, version: int) -> str:
    return hashlib.sha256((store.path(name, version) / MANIFEST).read_bytes()).hexdigest()


def verdict_path(store: ModelStore, name: str, version: int) -> Path:
    return store.path(name, version).with_name(f"{version}{VERDICT_SUFFIX}")


def save_verdict(store: ModelStore, verdict: Verdict) -> Path:
    """Write the verdict atomically (a temporary file renamed over the old one)."""
    path = verdict_path(store, verdict.model, verdict.challenger_version)
    temp = path.with_name(f".{path.name}-{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(verdict.to_dict(), handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    return path


def load_verdict(store: ModelStore, name: str, version: int) -> Verdict | None:
    """The recorded verdict on this very version (its manifest unchanged), or None."""
    path = verdict_path(store, name, version)
    try:
        verdict = Verdict.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        current = manifest_sha256(store, name, version)
    except OSError:
        return None
    return verdict if verdict.challenger_manifest_sha256 == current else None
