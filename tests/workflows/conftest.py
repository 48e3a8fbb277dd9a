"""A published home for the workflow tests: the b8 classifier, the r8k extractor, b8-shared (b8 on
the extractor's encoder and precision, so that the two can share a pass) and a labelled dataset
in the dataset store; and the product's server over it (no Ray), with workflows served."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.dataset.records import LabelledRow
from appliance.datasets.store import DatasetStore
from appliance.factory import pipeline
from appliance.security.tokens import TokenStore
from appliance.store import ModelStore
from tests.helpers.extractor import EXTRACTOR, build_extractor
from tests.security.test_security_server import LiveServer, published_home
from tests.serving.specialists import LABELS, sample_texts, train_subset

SHARED = "b8-shared"


def _examples() -> list[LabelledRow]:
    """Held-out Banking77 texts of the b8 labels, as a retrieval set."""
    return [LabelledRow(text, label) for text, label in sample_texts(per_label=6)]


@pytest.fixture(scope="session")
def workflow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = published_home(tmp_path_factory.getbasetemp())
    store = ModelStore(path)
    if not store.versions(EXTRACTOR):
        build_extractor(store)
    if not store.versions(SHARED):
        precision = store.load(EXTRACTOR).spec.precision
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(pipeline, "gate", lambda *_: (precision, f"{precision}: the extractor's encoder"))
            train_subset(store, SHARED, path / "work-shared")
    return path


@pytest.fixture(scope="session")
def dataset_digest(workflow_home: Path) -> str:
    ref = DatasetStore(workflow_home).put(_examples(), name="b8-examples", role="train", kind="classify")
    return ref.digest


@pytest.fixture(scope="module")
def home(workflow_home: Path) -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("APPLIANCE_HOME", str(workflow_home))
        yield workflow_home


@pytest.fixture(scope="module")
def tokens(home: Path) -> TokenStore:
    return TokenStore(home / "tokens" / "tokens.json")


@pytest.fixture(scope="module")
def live(home: Path) -> Iterator[LiveServer]:
    from tests.security.test_security_server import MODEL

    with LiveServer(home, models=(MODEL, EXTRACTOR, SHARED)) as server:
        yield server


__all__ = ["LABELS", "SHARED"]
