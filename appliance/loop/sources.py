"""What the gate scores on: the golden set of a model, its recent corrected traffic, and a
published version as a :class:`~appliance.loop.gate.Predictor`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.artifact.manifest import SpecialistManifest
from appliance.engines.specialist import Specialist
from appliance.errors import ApplianceError, NotFound
from appliance.loop.gate import LabelledTexts, Predictions


@dataclass(frozen=True)
class SpecialistPredictor:
    """A loaded specialist's offline answers (its out-of-scope rejection included)."""

    specialist: Specialist

    def predict(self, texts: Sequence[str]) -> Predictions:
        probs, rejection, _ = self.specialist.scored(list(texts))
        top = probs.argmax(axis=1)
        confidence = probs[np.arange(len(top)), top]
        labels = [self.specialist.labels[int(i)] for i in top]
        oos = self.specialist.spec.oos
        if oos is not None and rejection is not None:
            labels = [
                oos.label if r < oos.threshold else label for label, r in zip(labels, rejection, strict=True)
            ]
        return Predictions(labels, confidence, self.specialist.threshold)


def golden_from_file(path: Path, text_column: str, label_column: str) -> LabelledTexts:
    from appliance.dataset import load_labelled

    data = load_labelled(path, text_column, label_column)
    return LabelledTexts(list(data.texts), list(data.labels), f"golden file {path.name}")


def golden_from_store(
    home: Path, champion: SpecialistManifest, challenger: SpecialistManifest
) -> LabelledTexts:
    """The frozen golden set in the dataset store that the champion's lineage names (held out once,
    never trained on), else the challenger's."""
    from appliance.datasets.store import DatasetStore

    store = DatasetStore(home)
    for manifest in (champion, challenger):
        digest = manifest.lineage.golden_dataset if manifest.lineage is not None else None
        if digest is not None and store.exists(digest):
            data = store.get(digest).labelled()
            return LabelledTexts(list(data.texts), list(data.labels), f"golden set {digest[:12]}")
    raise NotFound(
        f"neither {champion.ref} nor {challenger.ref} names a golden set in the dataset store; "
        "give --golden FILE"
    )


def corrected_traffic(db: Path, name: str, hours: float) -> LabelledTexts | None:
    """Corrected decisions of ``name`` over the last ``hours`` whose text was kept; None without any."""
    from appliance.router.escalations import EscalationStore

    if not db.is_file():
        return None
    since = time.time() - 3600.0 * hours
    try:
        store = EscalationStore(db)
        try:
            rows = list(store.iter_corrections(name, since))
        finally:
            store.close()
    except ApplianceError:
        return None
    latest: dict[str, tuple[str, str]] = {}  # the last correction of a decision wins
    for c in rows:
        if c.text and c.label:
            latest[c.target] = (c.text, c.label)
    if not latest:
        return None
    texts, labels = zip(*latest.values(), strict=True)
    return LabelledTexts(list(texts), list(labels), f"corrected traffic, last {hours:g} h")
