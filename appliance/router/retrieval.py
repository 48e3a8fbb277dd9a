"""Retrieval-augmented escalation: the nearest labelled examples, shown to the generalist.

A specialist's artifact carries no training texts by default (its manifest holds a fingerprint of
the data, never the data). ``appliance train --demonstrations`` opts in to a compact
*demonstration index* in the artifact, ``demonstrations.npz``, covered by the signed manifest like
every other file: the training texts and labels, and their embeddings by the specialist's own
encoder, L2-normalised and stored as float16 (384 dimensions: 768 bytes per example).

When a model's escalation setting asks for k demonstrations, the cascade embeds each escalated
text with the specialist's encoder, takes the k training examples of highest cosine similarity,
and passes them, nearest first, to the generalist's prompt
(:func:`appliance.engines.generalist.classification_body`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from appliance.engines.generalist_api import Demonstration
from appliance.errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    from appliance.engines.specialist import Specialist
    from appliance.router.cascade import ModelRef

log = logging.getLogger(__name__)

DEMONSTRATIONS_FILE = "demonstrations.npz"


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise InvalidArgument(f"embeddings must be a matrix, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


@dataclass(frozen=True)
class DemonstrationIndex:
    texts: list[str]
    labels: list[str]
    vectors: np.ndarray  # float16, one normalised row per text

    @classmethod
    def build(cls, texts: Sequence[str], labels: Sequence[str], embeddings: np.ndarray) -> DemonstrationIndex:
        if not (len(texts) == len(labels) == len(embeddings)):
            raise InvalidArgument(
                f"{len(texts)} texts, {len(labels)} labels and {len(embeddings)} embeddings must match"
            )
        return cls(list(texts), list(labels), _normalised(embeddings).astype(np.float16))

    def __len__(self) -> int:
        return len(self.texts)

    def save(self, folder: Path) -> Path:
        path = folder / DEMONSTRATIONS_FILE
        with path.open("wb") as f:
            np.savez(
                f,
                texts=np.frombuffer(json.dumps(self.texts).encode("utf-8"), dtype=np.uint8),
                labels=np.frombuffer(json.dumps(self.labels).encode("utf-8"), dtype=np.uint8),
                vectors=self.vectors,
            )
        return path

    @classmethod
    def load(cls, folder: Path) -> DemonstrationIndex | None:
        """The index in an artifact folder; None when it was published without one."""
        path = folder / DEMONSTRATIONS_FILE
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                texts = json.loads(data["texts"].tobytes().decode("utf-8"))
                labels = json.loads(data["labels"].tobytes().decode("utf-8"))
                vectors = np.asarray(data["vectors"], dtype=np.float16)
        except (OSError, ValueError, KeyError) as e:
            raise FailedPrecondition(f"{path}: not a demonstration index: {e}") from e
        if not (len(texts) == len(labels) == len(vectors)):
            raise FailedPrecondition(f"{path}: texts, labels and vectors differ in length")
        return cls(texts, labels, vectors)

    def nearest(self, queries: np.ndarray, k: int) -> list[list[Demonstration]]:
        """For each query embedding, the ``k`` examples of highest cosine similarity, nearest first."""
        if k < 1 or not len(self):
            return [[] for _ in range(len(queries))]
        k = min(k, len(self))
        sims = _normalised(queries) @ self.vectors.astype(np.float32).T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        out: list[list[Demonstration]] = []
        for row, picks in zip(sims, top, strict=True):
            ordered = picks[np.argsort(-row[picks], kind="stable")]
            out.append([Demonstration(self.texts[j], self.labels[j]) for j in ordered])
        return out


class Retriever(Protocol):
    def nearest(
        self, model: ModelRef | Specialist, texts: Sequence[str], k: int
    ) -> list[list[Demonstration]]:
        """Per text, up to ``k`` demonstrations from ``model``'s index (none without an index)."""
        ...


class SpecialistRetriever:
    """Demonstrations from each loaded version's own index, by its own encoder (blocking: call it
    off the event loop). A version without an index gets none, logged once."""

    def __init__(self) -> None:
        self._indexes: dict[Path, DemonstrationIndex | None] = {}
        self._lock = threading.Lock()

    def index_of(self, model: Specialist) -> DemonstrationIndex | None:
        folder = model.manifest.folder
        with self._lock:
            if folder not in self._indexes:
                index = DemonstrationIndex.load(folder)
                if index is None:
                    log.warning(
                        "%s has no demonstration index: escalations get no demonstrations", model.spec.ref
                    )
                self._indexes[folder] = index
            return self._indexes[folder]

    def nearest(
        self, model: ModelRef | Specialist, texts: Sequence[str], k: int
    ) -> list[list[Demonstration]]:
        """None for a bare :class:`ModelRef`: it has no artifact folder or encoder."""
        from appliance.router.cascade import ModelRef

        if isinstance(model, ModelRef):
            return [[] for _ in texts]
        index = self.index_of(model)
        if index is None or k < 1:
            return [[] for _ in texts]
        queries, _ = model.encoder.embed(list(texts))
        return index.nearest(queries, k)
