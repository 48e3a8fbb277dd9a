"""A small published span extractor for tests: head mode on a Restaurant8k subset.

About 200 examples of the shipped ``train_4.json`` train in well under a minute on 2 cores (the
first call in a store also exports the base encoder, which is cached for later ones).
"""

from __future__ import annotations

from pathlib import Path

from appliance.factory.extract import ExtractResult, ExtractSpec, train_extractor
from appliance.store import ModelStore

RESTAURANT8K = Path(__file__).resolve().parents[2] / "appliance" / "data" / "restaurant8k"
EXTRACTOR = "r8k"


def build_extractor(
    store: ModelStore, name: str = EXTRACTOR, examples: int = 200, data: Path = RESTAURANT8K / "train_4.json"
) -> ExtractResult:
    """Train and publish ``name`` into ``store`` from the first ``examples`` texts of ``data``."""
    return train_extractor(ExtractSpec(data=data, name=name, limit=examples), store, progress=lambda _: None)
