"""A published home for the workflow tests: the b8 classifier, the r8k extractor, b8-shared (b8 on
the extractor's encoder and precision, so that the two can share a pass) and a labelled dataset
in the dataset store; and the product's server over it (no Ray), with workflows served."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from appliance.dataset.records import LabelledRow
from appliance.datasets.store import DatasetStore
from appliance.factory import pipeline
from appliance.router.cascade import Cascade
from appliance.router.cost import CostModel
from appliance.router.escalations import EscalationStore
from appliance.router.metrics import RouterMetrics
from appliance.security.tokens import TokenStore
from appliance.serve.runtime import RuntimeSettings, ServingRuntime
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


class RoutedServer(LiveServer):
    """The live server with the cascade router as ``appliance serve`` builds it, here without a
    generalist: a policy that needs one is FAILED_PRECONDITION, as on a box that has none."""

    async def _start(self) -> int:
        from appliance.api.server import ApplianceServer

        self.escalations = EscalationStore(self.home / "escalations" / "escalations.db", strict=False)
        router = Cascade(None, self.escalations, CostModel(cores=2), RouterMetrics(CollectorRegistry()))
        self.runtime = ServingRuntime(
            RuntimeSettings(models=self.models), store=ModelStore(self.home), router=router
        )
        self.server = ApplianceServer(self.runtime, self.settings)
        port = await self.server.start()
        await self.runtime.start()
        if not self.runtime.is_ready():
            raise RuntimeError(f"{self.models} did not load: {self.runtime.start_errors}")
        return port

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.escalations.close()


@pytest.fixture(scope="module")
def live(home: Path) -> Iterator[LiveServer]:
    from tests.security.test_security_server import MODEL

    with RoutedServer(home, models=(MODEL, EXTRACTOR, SHARED)) as server:
        yield server


__all__ = ["LABELS", "SHARED"]
