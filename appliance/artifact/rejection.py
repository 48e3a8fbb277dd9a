"""Out-of-scope rejection as a published classifier applies it, offline and when served.

The score is :func:`appliance.artifact.maths.oos_score` of the manifest's ``oos.score`` kind; a text
whose score is below ``oos.threshold`` is answered ``oos.label``. ``max_prob_knn`` also needs the
training rows' normalised embeddings, stored (float16) in the file ``oos.references`` names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.artifact.manifest import OutOfScope
from appliance.artifact.maths import nearest_similarity, oos_score

REFERENCES_FILE = "oos_references.npy"


@dataclass(frozen=True)
class Rejection:
    spec: OutOfScope
    references: np.ndarray | None  # [N, D] normalised embeddings, for max_prob_knn

    @property
    def needs_embeddings(self) -> bool:
        return self.spec.score != "max_prob"

    def similarity(self, normalized: np.ndarray) -> np.ndarray | None:
        """Each row's similarity to its nearest reference; None for a score that needs none."""
        if not self.needs_embeddings:
            return None
        if self.references is None:
            raise ValueError(f"the {self.spec.score} score needs its references file")
        return nearest_similarity(normalized, self.references)

    def scores(self, probs: np.ndarray, normalized: np.ndarray) -> np.ndarray:
        """Rejection scores of rows with head probabilities ``[B, C]`` and embeddings ``[B, D]``."""
        return self.combine(probs, self.similarity(normalized))

    def combine(self, probs: np.ndarray, similarity: np.ndarray | None) -> np.ndarray:
        """The score from the probabilities (the top one suffices) and the similarities."""
        return oos_score(self.spec.score, probs, similarity, self.spec.scale or (0.0, 1.0, 0.0, 1.0))

    def rejects(self, top: float, similarity: float | None) -> bool:
        """Whether one served row, its top probability and nearest similarity, is rejected."""
        sim = None if similarity is None else np.array([similarity], dtype=np.float32)
        return bool(self.combine(np.array([[top]], dtype=np.float32), sim)[0] < self.spec.threshold)

    @classmethod
    def load(cls, folder: Path, spec: OutOfScope) -> Rejection:
        refs = None
        if spec.references is not None:
            refs = np.load(folder / spec.references, allow_pickle=False).astype(np.float32)
        return cls(spec, refs)


def save_references(folder: Path, normalized: np.ndarray) -> str:
    np.save(folder / REFERENCES_FILE, normalized.astype(np.float16), allow_pickle=False)
    return REFERENCES_FILE
