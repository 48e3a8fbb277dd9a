"""`appliance serve --generalist` with a span extractor: the span cascade through the Ray Serve
generalist deployment (GeneralistClient.extract), real vLLM, escalations stored by the ingress."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.engines.tiny_llm import build_tiny_llm
from appliance.router.escalations import EscalationStore
from appliance.store import ModelStore
from tests.helpers.extractor import EXTRACTOR, build_extractor
from tests.helpers.serving import App
from tests.serving.test_serving_generalist import wait_generation_ready

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEXTS = ["🎉 a table for 4 people on Friday at 7pm", "book it for Sam Lee at noon"]


@pytest.fixture(scope="module")
def span_app(start_app, home: Path, tmp_path_factory: pytest.TempPathFactory) -> App:
    store = ModelStore(home)
    if not store.versions(EXTRACTOR):
        build_extractor(store)
    llm = build_tiny_llm(tmp_path_factory.mktemp("tiny-llm"))
    generalist = {"path": str(llm), "max_model_len": 1024, "kv_cache_gib": 1.0, "enforce_eager": True}
    app = start_app("spans", generalist=generalist, models=[EXTRACTOR])
    wait_generation_ready(app)
    return app


def test_extract_escalates_through_the_generalist_deployment(span_app: App, home: Path) -> None:
    with span_app.client() as client:
        out = client.extract(EXTRACTOR, TEXTS, policy="generalist_only")
    for text, result in zip(TEXTS, out.results, strict=True):
        assert result.escalation_id and result.price > 0
        assert all(s.route == "generalist" and text[s.start : s.end] == s.text for s in result.spans)
    with EscalationStore(home / "escalations" / "escalations.db") as store:
        rows = {e.id: e for e in store.iter_escalations(None, None, EXTRACTOR)}
    for result in out.results:
        row = rows[result.escalation_id]
        assert row.kind == "extract"
        stored = json.loads(row.generalist_spans or "null")
        assert sum(1 for s in stored if s.get("dropped")) == result.dropped_generalist_spans
