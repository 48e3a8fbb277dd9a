"""The span cascade over the real server: Extract on the product's ApplianceServer and
ServingRuntime with the Cascade as router and a real vLLM engine (the tiny random Llama) as the
generalist, called over TLS.

The tiny model's answers are noise, which is what this needs: whatever it claims, every span that
comes back must be the text at its offsets, and every claim that is not must be dropped, counted
(response, Prometheus, escalation row) and never answered.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from appliance.api.server import ApplianceServer
from appliance.client import Client, Extracted
from appliance.engines.generalist import GeneralistEngine
from appliance.engines.generalist_args import GeneralistArgs
from appliance.engines.tiny_llm import build_tiny_llm
from appliance.router.cascade import Cascade
from appliance.router.cost import CostModel
from appliance.router.escalations import EscalationStore
from appliance.router.metrics import RouterMetrics
from appliance.security.tokens import TokenStore
from appliance.serve.runtime import RuntimeSettings, ServingRuntime
from appliance.store import ModelStore
from tests.helpers.extractor import EXTRACTOR, build_extractor
from tests.security.test_security_server import LiveServer, published_home

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BOOKING = "I'd like a table for 4 people on Friday at 7pm"
EMOJI = "🎉🎉 Table for 4 people tomorrow at 8pm please, Zoë Ünal 🍕"
TEXTS = [BOOKING, EMOJI, "dinner for two next saturday around 19:30", "book it for Sam Lee at noon"]
DROPPED = "appliance_generalist_spans_dropped_total"


class CascadeServer(LiveServer):
    """LiveServer with the cascade as router and the tiny model on vLLM as its generalist."""

    def __init__(self, home: Path, llm: Path, registry: CollectorRegistry) -> None:
        super().__init__(home, models=(EXTRACTOR,))
        self.registry = registry
        args = GeneralistArgs(
            path=str(llm), max_model_len=1024, kv_cache_gib=1, max_concurrency=4, enforce_eager=True
        )
        self.engine = GeneralistEngine(args)
        self.db = home / "escalations" / "escalations.db"
        self.db.parent.mkdir(parents=True, exist_ok=True)
        self.escalations = EscalationStore(self.db)

    async def _start(self) -> int:
        await self.engine.start()
        router = Cascade(self.engine, self.escalations, CostModel(cores=2), RouterMetrics(self.registry))
        self.runtime = ServingRuntime(
            RuntimeSettings(models=self.models), store=ModelStore(self.home), router=router
        )
        self.server = ApplianceServer(self.runtime, self.settings, generalist=self.engine)
        port = await self.server.start()
        await self.runtime.start()
        if not self.runtime.is_ready():
            raise RuntimeError(f"{self.models} did not load: {self.runtime.start_errors}")
        return port

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self._run(self.server.stop(grace=2.0), timeout=60)
            self.server = None
        self._run(self.engine.stop(), timeout=120)
        self.escalations.close()
        super().__exit__(*exc)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = published_home(tmp_path_factory.getbasetemp())
    store = ModelStore(path)
    if not store.versions(EXTRACTOR):
        build_extractor(store)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("APPLIANCE_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture(scope="module")
def live(
    home: Path, registry: CollectorRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CascadeServer]:
    llm = build_tiny_llm(tmp_path_factory.mktemp("tiny-llm"), seed=0)
    with CascadeServer(home, llm, registry) as server:
        yield server


@pytest.fixture(scope="module")
def client(live: CascadeServer, home: Path) -> Iterator[Client]:
    secret = TokenStore(home / "tokens" / "tokens.json").create(
        "span-cascade", [f"extract:{EXTRACTOR}", "models:read"]
    )
    with live.client(secret) as c:
        yield c


def dropped_so_far(registry: CollectorRegistry) -> float:
    return registry.get_sample_value(DROPPED, {"model": EXTRACTOR}) or 0.0


def assert_spans_are_the_text(out: Extracted, texts: list[str]) -> None:
    for text, result in zip(texts, out.results, strict=True):
        for s in result.spans:
            assert text[s.start : s.end] == s.text, (text, s)


def test_generalist_spans_are_substrings_at_their_offsets_and_the_rest_is_dropped_and_counted(
    client: Client, live: CascadeServer, registry: CollectorRegistry
) -> None:
    before = dropped_so_far(registry)
    out = client.extract(EXTRACTOR, TEXTS, policy="generalist_only")
    assert_spans_are_the_text(out, TEXTS)
    assert all(r.escalation_id for r in out.results)
    assert all(s.route == "generalist" for r in out.results for s in r.spans)
    assert all(r.price > 0 and r.core_seconds > 0 for r in out.results)
    dropped = sum(r.dropped_generalist_spans for r in out.results)
    # The tiny model's words are noise: most are in none of these texts.
    assert dropped > 0
    assert dropped_so_far(registry) - before == dropped

    # Durable before the answer: another connection reads every row, with both span lists.
    with EscalationStore(live.db) as store:
        rows = {e.id: e for e in store.iter_escalations(None, None, EXTRACTOR)}
    claimed = 0
    for text, result in zip(TEXTS, out.results, strict=True):
        row = rows[result.escalation_id]
        assert row.kind == "extract" and row.policy == "generalist_only"
        stored = json.loads(row.generalist_spans or "null")
        lost = [s for s in stored if s.get("dropped")]
        found = [s for s in stored if not s.get("dropped")]
        assert len(lost) == result.dropped_generalist_spans
        for claim in lost:  # nowhere in the text, or only where an earlier claim was placed
            words = claim["text"].strip()
            places = [i for i in range(len(text)) if words and text.startswith(words, i)]
            assert claim["start"] is None
            assert all(any(i < f["end"] and f["start"] < i + len(words) for f in found) for i in places)
        assert all(text[s["start"] : s["end"]] == s["text"] for s in found)
        # generalist_only: every span answered is one the generalist placed, none is the extractor's
        assert sorted((s.start, s.end, s.label) for s in result.spans) == sorted(
            (s["start"], s["end"], s["label"]) for s in found
        )
        assert json.loads(row.specialist_spans or "null") is not None
        claimed += len(stored)
    assert claimed > 0, "the generalist claimed no span at all: nothing was checked"


def test_cascade_escalates_only_texts_with_a_span_below_the_threshold(client: Client) -> None:
    threshold = client.get_model(EXTRACTOR).threshold
    specialist = client.extract(EXTRACTOR, TEXTS, policy="specialist_only")
    cascaded = client.extract(EXTRACTOR, TEXTS, policy="cascade")
    assert_spans_are_the_text(cascaded, TEXTS)
    assert any(r.escalation_id for r in cascaded.results), "no text was uncertain: the routing went untested"
    for own, result in zip(specialist.results, cascaded.results, strict=True):
        uncertain = any(s.confidence < threshold for s in own.spans)
        assert bool(result.escalation_id) == uncertain
        if not uncertain:
            assert result.spans == own.spans and result.dropped_generalist_spans == 0
            continue
        confident = [s for s in own.spans if s.confidence >= threshold]
        assert [s for s in result.spans if s.route == "specialist"] == confident
        assert result.price > own.price  # the generalist's time on top of the extractor's
