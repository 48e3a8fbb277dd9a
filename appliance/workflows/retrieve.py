"""Retrieve steps: the nearest labelled examples to a text, from a dataset in the dataset store.

The dataset's texts are embedded once per (dataset, model version) by the same backend call as
``Embed`` (so by the model's own encoder, batched with live traffic) and kept in memory as one
L2-normalised matrix; a lookup is one matrix product. Only classification sets (texts with labels)
can be retrieved from.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance import config
from appliance.backend import Backend
from appliance.errors import ApplianceError, FailedPrecondition
from appliance.workflows.validate import DatasetCheck

MAX_INDEXES = 8  # (dataset, model version) pairs kept embedded at once


@dataclass(frozen=True)
class Hit:
    text: str
    label: str
    score: float  # cosine similarity


@dataclass(frozen=True)
class Found:
    model: str
    version: int
    neighbours: list[list[Hit]]  # per text, best first


@dataclass(frozen=True)
class _Index:
    texts: list[str]
    labels: list[str]
    vectors: np.ndarray  # [n, dim], L2-normalised


def _labelled(home: Path, dataset: str) -> tuple[str, list[str], list[str]]:
    """(digest, texts, labels) of a classification dataset in the store."""
    from appliance.datasets.store import DatasetStore

    stored = DatasetStore(home).get(dataset)
    data = stored.labelled()
    return stored.digest, list(data.texts), list(data.labels)


def dataset_check(home: Path | None = None) -> DatasetCheck:
    """For publishing: whether a retrieve step's dataset is a classification set in the store."""
    root = home or config.appliance_home()

    def check(dataset: str) -> str | None:
        from appliance.datasets.store import DatasetStore

        try:
            info = DatasetStore(root).info(dataset)
        except ApplianceError as exc:
            return exc.message
        if info.kind != "classify":
            return f"holds {info.kind} rows; a retrieve step needs labelled texts (kind classify)"
        return None

    return check


class Retriever:
    def __init__(self, backend: Backend, home: Path | None = None) -> None:
        self.backend = backend
        self.home = home or config.appliance_home()
        self._indexes: dict[tuple[str, str, int], _Index] = {}
        self._digests: dict[str, str] = {}  # as a step names it → its digest
        self._lock = asyncio.Lock()

    async def nearest(
        self, model: str, dataset: str, texts: list[str], k: int, timeout: float | None
    ) -> Found:
        queries = await self.backend.embed(model, texts, timeout=timeout)
        index = await self._index(dataset, queries.model, queries.version, timeout)
        scores = queries.vectors @ index.vectors.T
        k = min(k, len(index.texts))
        neighbours = []
        for row in scores:
            order = np.argsort(-row, kind="stable")[:k]
            neighbours.append([Hit(index.texts[j], index.labels[j], float(row[j])) for j in order])
        return Found(queries.model, queries.version, neighbours)

    async def _index(self, dataset: str, model: str, version: int, timeout: float | None) -> _Index:
        from appliance.datasets.store import DatasetStore

        async with self._lock:  # one build per dataset and version, however many runs ask at once
            known = self._digests.get(dataset, "")
            # a dataset removed from the store (the right to forget) is not served from memory either
            if (known, model, version) in self._indexes and DatasetStore(self.home).exists(known):
                return self._indexes[(known, model, version)]
            digest, texts, labels = await asyncio.to_thread(_labelled, self.home, dataset)
            self._digests[dataset] = digest
            if not texts:
                raise FailedPrecondition(f"dataset {digest[:12]} has no rows to retrieve from")
            chunk = self.backend.limits.max_texts_per_call
            parts = []
            for start in range(0, len(texts), chunk):
                out = await self.backend.embed(
                    f"{model}:{version}", texts[start : start + chunk], timeout=timeout
                )
                parts.append(out.vectors)
            index = _Index(texts, labels, np.concatenate(parts).astype(np.float32))
            if len(self._indexes) >= MAX_INDEXES:
                self._indexes.pop(next(iter(self._indexes)))
            self._indexes[(digest, model, version)] = index
            return index
