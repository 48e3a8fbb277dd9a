"""Rejection calibrated without out-of-scope rows (``appliance train --reject-unknown``).

Leave-labels-out folds stand in for the unknown: each fold holds a few labels out of training, fits
the head on the rest (less a tenth of their rows, kept to score in scope) and scores the held-out
labels' rows as out of scope. The score kind with the best mean out-of-scope recall at the in-scope
loss budget is kept. The threshold itself is then set, for the head fitted on all the training
data, on the held-out in-scope rows: only in-scope rows fix the accuracy a threshold costs, and the
folds' heads (fewer labels, fewer rows) score on another scale than the final one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from appliance.artifact.head import Head
from appliance.artifact.manifest import OutOfScope
from appliance.artifact.maths import OOS_SCORES, nearest_similarity, oos_score
from appliance.artifact.rejection import REFERENCES_FILE
from appliance.factory.evaluate import OOS_MAX_LOSS_POINTS, threshold_for_loss

FOLDS = 3
LABELS_PER_FOLD = 0.1  # share of the labels each fold holds out
IN_SCOPE_VAL = 0.1  # share of the kept labels' rows each fold scores in scope

FitHead = Callable[[np.ndarray, np.ndarray, int], Head]


@dataclass(frozen=True)
class Scored:
    """One score kind's inputs on a set of rows."""

    probs: np.ndarray
    similarity: np.ndarray

    @property
    def top(self) -> np.ndarray:
        return self.probs.max(axis=1)


def as_stored(references: np.ndarray) -> np.ndarray:
    """References as served: stored in float16 (:func:`appliance.artifact.rejection.save_references`)."""
    return references.astype(np.float16).astype(np.float32)


def score_rows(head: Head, references: np.ndarray, x: np.ndarray) -> Scored:
    return Scored(head.probs(x), nearest_similarity(x, references))


def scale_of(scored: Scored) -> tuple[float, float, float, float]:
    """Mean and standard deviation of the top probability and of the nearest similarity."""
    eps = 1e-6
    top, sim = scored.top, scored.similarity
    return float(top.mean()), float(top.std() + eps), float(sim.mean()), float(sim.std() + eps)


def scores(kind: str, scored: Scored, scale: tuple[float, float, float, float]) -> np.ndarray:
    return oos_score(kind, scored.probs, scored.similarity, scale)


@dataclass(frozen=True)
class FoldResult:
    recall: dict[str, float]  # per score kind, at the loss budget
    n_oos: int


def leave_labels_out(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    fit: FitHead,
    max_loss_points: float = OOS_MAX_LOSS_POINTS,
    folds: int = FOLDS,
    seed: int = 0,
) -> list[FoldResult]:
    """Out-of-scope recall of each score kind on ``folds`` disjoint groups of held-out labels."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_classes)
    per_fold = max(1, round(LABELS_PER_FOLD * n_classes))
    if n_classes - per_fold < 2:
        raise ValueError(f"{n_classes} labels: too few to hold {per_fold} out and keep two")
    results = []
    for f in range(min(folds, n_classes // per_fold)):
        out = np.isin(y, order[f * per_fold : (f + 1) * per_fold])
        kept = np.flatnonzero(~out)
        val = np.zeros(len(y), dtype=bool)
        val[rng.choice(kept, max(1, round(IN_SCOPE_VAL * len(kept))), replace=False)] = True
        train = ~out & ~val
        # the kept labels renumbered 0..k-1, so that the fold's head has no empty classes
        remap = np.full(n_classes, -1)
        labels = np.unique(y[train])
        remap[labels] = np.arange(len(labels))
        head = fit(x[train], remap[y[train]], len(labels))
        refs = as_stored(x[train])
        in_scope, oos = score_rows(head, refs, x[val]), score_rows(head, refs, x[out])
        correct = in_scope.probs.argmax(axis=1) == remap[y[val]]
        scale = scale_of(in_scope)
        recall = {}
        for kind in OOS_SCORES:
            threshold, _ = threshold_for_loss(scores(kind, in_scope, scale), correct, max_loss_points)
            recall[kind] = float((scores(kind, oos, scale) < threshold).mean())
        results.append(FoldResult(recall, int(out.sum())))
    return results


def best_kind(results: list[FoldResult]) -> tuple[str, float]:
    """The score kind with the best mean fold recall (the first, and cheapest, on a tie)."""
    mean = {k: float(np.mean([r.recall[k] for r in results])) for k in OOS_SCORES}
    kind = max(OOS_SCORES, key=lambda k: mean[k])
    return kind, mean[kind]


def calibrate_unknown(
    label: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    n_classes: int,
    fit: FitHead,
    head: Head,
    x_held: np.ndarray,
    y_held: np.ndarray,
    kind: str = "auto",
    max_loss_points: float = OOS_MAX_LOSS_POINTS,
    seed: int = 0,
) -> tuple[OutOfScope, np.ndarray | None]:
    """The rejection for ``head`` (fitted on all of ``x_train``) and, for a knn score, its references.
    ``kind``: one of OOS_SCORES, or ``auto`` for the folds' best."""
    if kind != "auto" and kind not in OOS_SCORES:
        raise ValueError(f"out-of-scope score {kind!r}: use auto or one of {', '.join(OOS_SCORES)}")
    results = leave_labels_out(x_train, y_train, n_classes, fit, max_loss_points, seed=seed)
    best, recall = best_kind(results)
    if kind == "auto":
        kind = best
    else:
        recall = float(np.mean([r.recall[kind] for r in results]))
    refs = as_stored(x_train)
    held = score_rows(head, refs, x_held)
    scale = scale_of(held) if kind != "max_prob" else None
    threshold, lost = threshold_for_loss(
        scores(kind, held, scale or (0.0, 1.0, 0.0, 1.0)),
        held.probs.argmax(axis=1) == y_held,
        max_loss_points,
    )
    spec = OutOfScope(
        label=label,
        threshold=threshold,
        max_accuracy_loss_points=max_loss_points,
        in_scope_accuracy_loss_points=lost,
        oos_recall=recall,
        heldout_oos=sum(r.n_oos for r in results),
        score=kind,  # type: ignore[arg-type]  # one of OOS_SCORES, the Literal's values
        scale=scale,
        references=REFERENCES_FILE if kind != "max_prob" else None,
        calibrated_on="leave_labels_out",
    )
    return spec, (refs if kind != "max_prob" else None)
