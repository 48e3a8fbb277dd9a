"""Retrain: the champion's training set, corrected, trained again and published as a challenger.

The training rows are the champion's training set from the dataset store (never the original
file), with every corrected decision overriding the rows of the same text, and, when asked, the
generalist's confident answers on escalations (distillation; each row marked ``generalist``). The
champion's golden set is the held-out set, and no golden text is ever trained on. Training,
export, the int8 gate and calibration are :func:`appliance.factory.pipeline.train`'s.

The challenger is published with ``stage: challenger`` and does not change what is served: a
bare name serves its ``SERVING`` version, else the newest, so when no ``SERVING`` exists the
current champion is written there first. An interrupted retrain publishes nothing (the store's
staging and atomic rename).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.dataset.records import LabelledRow, normalized
from appliance.datasets.store import DatasetStore, canonical_jsonl
from appliance.errors import FailedPrecondition
from appliance.factory.pipeline import PreparedData, Progress, TrainResult, TrainSpec, default_base, train
from appliance.router.escalations import Correction, Escalation, EscalationStore, database_path
from appliance.store import Manifest, ModelStore, folder_digest, hash_files

log = logging.getLogger(__name__)

GENERALIST_ORIGIN = "generalist"
CORRECTION_ORIGIN = "correction"


@dataclass(frozen=True)
class RetrainSpec:
    name: str
    since: datetime | float | None = None  # corrections and escalations from this time on
    generalist_min_confidence: float | None = None  # None: no distillation
    max_minutes: float | None = None  # None: the champion's budget (fine-tune only)
    base: Path | None = None  # the champion's base encoder folder; default: the packaged one


@dataclass
class RetrainPlan:
    """What a retrain would train on, and what it had to leave out."""

    champion: Manifest
    golden_digest: str
    rows: list[LabelledRow]
    corrections: int = 0  # corrected decisions trained on
    without_text: int = 0  # corrections recorded without their text (store_texts off): cannot train
    on_golden: int = 0  # corrections of golden texts: never trained on
    golden_overlap: int = 0  # champion training rows whose text is golden too: left out
    spans: int = 0  # span corrections, which a classifier cannot use
    overridden: int = 0  # champion training rows a correction replaced
    distilled: int = 0  # rows the generalist labelled
    new_labels: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "champion": self.champion.spec.ref,
            "training_rows": len(self.rows),
            "corrections_used": self.corrections,
            "corrections_without_text": self.without_text,
            "corrections_on_golden": self.on_golden,
            "span_corrections_ignored": self.spans,
            "rows_overridden": self.overridden,
            "golden_rows_left_out": self.golden_overlap,
            "distilled": self.distilled,
            "new_labels": self.new_labels,
            "golden_dataset": self.golden_digest,
        }

    def left_out(self) -> list[str]:
        """The corrections that could not train, and why."""
        out = []
        if self.without_text:
            out.append(
                f"{self.without_text} correction(s) were recorded without their text (store_texts is off) "
                "and cannot train; turn on store_escalation_texts to keep the texts of future decisions"
            )
        if self.on_golden:
            out.append(
                f"{self.on_golden} correction(s) of golden texts were left out (held out, never trained)"
            )
        if self.spans:
            out.append(f"{self.spans} span correction(s) were left out: this model classifies")
        return out

    def notes(self) -> list[str]:
        """What a person reading the report should know."""
        out = self.left_out()
        if self.golden_overlap:
            out.append(f"{self.golden_overlap} training row(s) of the champion share a golden text: left out")
        if self.new_labels:
            out.append(f"new label(s) trained: {', '.join(self.new_labels)}")
        return out


def champion_of(models: ModelStore, name: str) -> Manifest:
    """The version a bare ``name`` serves, verified."""
    return models.load(f"{name}:{models.served_version(name)}")


def latest_per_decision(corrections: Iterable[Correction]) -> list[Correction]:
    """One correction per corrected decision: the latest one overrides the earlier ones."""
    latest: dict[str, Correction] = {}
    for c in corrections:
        latest[c.target] = c
    return sorted(latest.values(), key=lambda c: c.id)


def plan(
    spec: RetrainSpec, models: ModelStore, datasets: DatasetStore, escalations: Path | None = None
) -> RetrainPlan:
    """The training rows of a retrain; FailedPrecondition when there is nothing new to train on."""
    champion = champion_of(models, spec.name)
    if champion.spec.kind != "classifier":
        raise FailedPrecondition(f"{champion.spec.ref} is a {champion.spec.kind}; retrain takes classifiers")
    lineage = champion.spec.lineage
    train_digest = lineage.train_dataset if lineage else None
    golden_digest = lineage.golden_dataset if lineage else None
    missing = [
        role
        for role, digest in (("training", train_digest), ("golden", golden_digest))
        if digest is None or not datasets.exists(digest)
    ]
    if train_digest is None or golden_digest is None or missing:
        raise FailedPrecondition(
            f"{champion.spec.ref}: its {' and '.join(missing)} set is not in the dataset store (trained "
            "before the store existed, or deleted); train it again with `appliance train`"
        )
    base = datasets.get(train_digest).rows
    golden = {normalized(r.text) for r in datasets.get(golden_digest).rows}
    out = RetrainPlan(champion=champion, golden_digest=golden_digest, rows=[])

    db = escalations or database_path(models.home)
    store = EscalationStore.reader(db) if db.is_file() else None
    try:
        corrected: dict[str, LabelledRow] = {}
        for c in latest_per_decision(store.iter_corrections(spec.name, spec.since) if store else []):
            if c.label is None:
                out.spans += 1
            elif c.text is None:
                out.without_text += 1
            elif normalized(c.text) in golden:
                out.on_golden += 1
            else:
                corrected[normalized(c.text)] = LabelledRow(
                    c.text, c.label, f"{CORRECTION_ORIGIN}:{c.source}"
                )
        distilled: dict[str, LabelledRow] = {}
        if spec.generalist_min_confidence is not None and store is not None:
            for e in store.iter_escalations(since=spec.since, model=spec.name):
                if _distillable(e, spec.generalist_min_confidence, golden, corrected):
                    assert e.text is not None
                    distilled[normalized(e.text)] = LabelledRow(e.text, e.generalist_label, GENERALIST_ORIGIN)
    finally:
        if store is not None:
            store.close()

    # A training row whose text is also golden (a training file that shares texts with the eval
    # file) is dropped too: the golden set is never trained on.
    own = [r for r in base if isinstance(r, LabelledRow) and normalized(r.text) not in golden]
    out.golden_overlap = len(base) - len(own)
    replaced = corrected.keys() | distilled.keys()
    kept = [r for r in own if normalized(r.text) not in replaced]
    out.overridden = len(own) - len(kept)
    out.rows = [*kept, *corrected.values(), *distilled.values()]
    out.corrections, out.distilled = len(corrected), len(distilled)
    out.new_labels = sorted({r.label for r in out.rows} - set(champion.spec.labels) - _oos(champion))
    if canonical_jsonl(out.rows) == canonical_jsonl(own):
        reasons = "; ".join(out.left_out()) or "no corrections recorded for it"
        since = f" since {_iso(spec.since)}" if spec.since is not None else ""
        raise FailedPrecondition(
            f"nothing new to retrain {champion.spec.ref} on{since}: {reasons}. Record corrections with "
            "`appliance feedback correct` or the review queue, or add --include-generalist-labels"
        )
    return out


def _iso(when: datetime | float) -> str:
    moment = when if isinstance(when, datetime) else datetime.fromtimestamp(when, UTC)
    return moment.isoformat(timespec="seconds")


def _oos(champion: Manifest) -> set[str]:
    return {champion.spec.oos.label} if champion.spec.oos else set()


def _distillable(
    e: Escalation, min_confidence: float, golden: set[str], corrected: dict[str, LabelledRow]
) -> bool:
    if e.text is None or e.generalist_confidence < min_confidence or (e.kind or "classify") != "classify":
        return False
    key = normalized(e.text)
    return key not in golden and key not in corrected


@dataclass
class RetrainResult:
    plan: RetrainPlan
    result: TrainResult

    def summary(self) -> dict[str, Any]:
        champion = self.plan.champion.spec
        return {
            "challenger": self.result.summary(),
            **self.plan.summary(),
            "champion_metrics": dict(champion.metrics),
            "serving": champion.ref,
            "notes": self.plan.notes(),
        }


def retrain(
    spec: RetrainSpec,
    models: ModelStore | None = None,
    progress: Progress = log.info,
    escalations: Path | None = None,
) -> RetrainResult:
    models = models or ModelStore()
    datasets = DatasetStore(models.home)
    planned = plan(spec, models, datasets, escalations)
    champion = planned.champion.spec
    for note in planned.notes():
        progress(f"note: {note}")
    base = (spec.base or default_base()).resolve()
    if folder_digest(hash_files(base)) != champion.base_encoder.sha256:
        raise FailedPrecondition(
            f"{champion.ref} was trained from base encoder {champion.base_encoder.name} "
            f"({champion.base_encoder.sha256[:12]}), not {base}; give its folder with --base"
        )
    if models.serving_version(spec.name) is None:
        # Publishing makes the challenger the newest version: pin what a bare name serves first.
        models.set_serving_version(spec.name, champion.version)
    train_spec = TrainSpec(
        data=Path(f"{spec.name}-{champion.version}-retrain"),
        text_column=champion.columns.text if champion.columns else "text",
        label_column=champion.columns.label if champion.columns else "label",
        name=spec.name,
        mode=champion.mode,
        base=base,
        max_minutes=spec.max_minutes if spec.max_minutes is not None else 45.0,
        target_precision=champion.calibration.target_precision,
        default_policy=champion.default_policy,
        head_c=champion.head.regularisation_C or TrainSpec.head_c,
        label_descriptions=dict(champion.label_descriptions),
        oos_label=champion.oos.label if champion.oos else TrainSpec.oos_label,
        prepared=PreparedData(
            train=planned.rows,
            golden_digest=planned.golden_digest,
            corrections=planned.corrections,
            distilled=planned.distilled,
        ),
        stage="challenger",
    )
    progress(
        f"retraining {champion.ref} on {len(planned.rows)} rows ({planned.corrections} corrected, "
        f"{planned.distilled} from the generalist), evaluated on its golden set"
    )
    return RetrainResult(planned, train(train_spec, models, progress))
