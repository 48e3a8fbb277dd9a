"""Corrections in: check one against the model it corrects, then record it durably.

A correction names a decision (escalation id, or request id and the text's position), the right
label or spans, and a source. The label must be one of the model's labels unless a new label is
allowed (then a retrain is needed before any model can answer it). Recording is the escalation
store's: fsynced before the answer, the same correction twice is the first one's row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from appliance.errors import InvalidArgument, NotFound
from appliance.router.escalations import CorrectionRequest, EscalationStore
from appliance.store import ModelStore

# human:<name>, review-queue, or a model's name (NAME or NAME:VERSION)
SOURCE_RE = re.compile(r"^(human:[^\s:][^\s]{0,63}|review-queue|[a-z0-9][a-z0-9_.-]{0,62}(:[0-9]{1,9})?)$")


@dataclass(frozen=True)
class Recorded:
    id: int
    new: bool  # False: the same correction was already recorded (this is its id)
    model: str
    model_version: int
    trainable: bool  # False: the decision's text was not kept (store_texts off), so it cannot train
    note: str = ""


def check_source(source: str) -> str:
    if not SOURCE_RE.fullmatch(source):
        raise InvalidArgument(
            f"correction source {source!r}: use human:<name>, review-queue, or the name of the model that "
            "corrected it"
        )
    return source


def record(
    escalations: EscalationStore,
    models: ModelStore,
    model: str,
    request: CorrectionRequest,
    *,
    allow_new_label: bool = False,
) -> Recorded:
    """Check ``request`` against the decision it names (which must be ``model``'s) and record it."""
    check_source(request.source)
    target = escalations.resolve(request)
    if target.model != model:
        raise NotFound(f"no decision of model {model!r} with that id (it is one of another model)")
    notes: list[str] = []
    spec = models.load(f"{target.model}:{target.model_version}", verify=False).spec
    known = set(spec.labels) | ({spec.oos.label} if spec.oos else set())
    if request.label is not None and request.label not in known:
        if not allow_new_label:
            raise InvalidArgument(
                f"label {request.label!r} is not one of {spec.ref}'s {len(spec.labels)} labels; allow a new "
                "label to record it anyway (a retrain is then needed before a model can answer it)"
            )
        notes.append(f"{request.label!r} is a new label: retrain {model} before any model can answer it")
    for span in request.spans or ():
        if span.label not in known:
            raise InvalidArgument(f"span label {span.label!r} is not one of {spec.ref}'s slots")
    if spec.kind == "classifier" and request.spans is not None:
        raise InvalidArgument(f"{spec.ref} classifies: correct it with a label, not spans")
    if spec.kind == "span_extractor" and request.label is not None:
        raise InvalidArgument(f"{spec.ref} extracts spans: correct it with spans, not a label")
    if not target.has_text:
        notes.append("the decision's text was not kept (store_texts is off): recorded, but it cannot train")
    cid, new = escalations.correct(request)
    return Recorded(cid, new, target.model, target.model_version, target.has_text, "; ".join(notes))
