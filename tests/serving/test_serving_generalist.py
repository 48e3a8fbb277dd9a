"""`appliance serve --generalist`: the cascade and Generate on the real Ray app with real vLLM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from appliance.engines.tiny_llm import build_tiny_llm
from appliance.router.escalations import EscalationStore
from tests.helpers.serving import MODEL, App

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEXTS = [
    "I still have not received my card",
    "what exchange rate do you use",
    "my top up did not go through",
    "can you tell me something",
    "transfer pending",
    "refund please",
]


@pytest.fixture(scope="module")
def cascade_app(start_app, tmp_path_factory: pytest.TempPathFactory) -> App:
    llm = build_tiny_llm(tmp_path_factory.mktemp("tiny-llm"))
    generalist = {"path": str(llm), "max_model_len": 1024, "kv_cache_gib": 1.0, "enforce_eager": True}
    return start_app("cascade", generalist=generalist)


def wait_generation_ready(app: App, timeout: float = 300.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    with app.client() as client:
        while client.health("appliance.v1.GenerationService") != "SERVING":
            assert time.monotonic() < deadline, "the generalist never became ready"
            time.sleep(1.0)


def test_generate_streams_with_usage_and_cost(cascade_app: App) -> None:
    wait_generation_ready(cascade_app)
    with cascade_app.client() as client:
        chunks = list(client.generate("The card was", max_tokens=12, temperature=0.0))
    assert len(chunks) >= 2
    assert all(not c.finished for c in chunks[:-1]) and chunks[-1].finished
    last = chunks[-1]
    assert last.usage.prompt_tokens > 0 and 0 < last.usage.completion_tokens <= 12
    assert last.cost.core_seconds > 0 and last.cost.price > 0


def test_cascade_routes_by_the_calibrated_threshold(cascade_app: App) -> None:
    with cascade_app.client() as client:
        info = client.get_model(MODEL)
        response = client.classify(MODEL, TEXTS, top_k=3, policy="cascade")
    for r in response.results:
        specialist_confidence = r.top[0][1]
        assert r.route == ("specialist" if specialist_confidence >= info.threshold else "generalist")
        assert r.label in info.labels
        assert r.price > 0
        if r.route == "generalist":
            assert r.escalation_id and 0 < r.confidence <= 1
            assert r.core_seconds > 0


def test_generalist_only_answers_every_text_within_the_label_set(cascade_app: App) -> None:
    with cascade_app.client() as client:
        labels = set(client.get_model(MODEL).labels)
        response = client.classify(MODEL, TEXTS, policy="generalist_only")
    assert [r.route for r in response.results] == ["generalist"] * len(TEXTS)
    assert all(r.label in labels and r.escalation_id for r in response.results)


def test_no_generalist_is_failed_precondition_unless_fallback_is_allowed(app: App) -> None:
    with app.client() as client:
        with pytest.raises(grpc.RpcError) as err:
            client.classify(MODEL, TEXTS, policy="generalist_only")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        response = client.classify(MODEL, TEXTS, policy="generalist_only", allow_fallback=True)
    assert all(r.route == "specialist" and r.fallback for r in response.results)


def test_escalations_survive_a_restart_and_the_report_adds_up(cascade_app: App, home: Path) -> None:
    from ray import serve

    with cascade_app.client() as client:
        ids = [r.escalation_id for r in client.classify(MODEL, TEXTS, policy="generalist_only").results]
    serve.delete(cascade_app.name)  # the replica and its database connections are gone
    with EscalationStore(home / "escalations" / "escalations.db") as store:
        stored = {e.id for e in store.iter_escalations(None, None, MODEL)}
    assert set(ids) <= stored
    out = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "report", "--json", "--hours", "1"],
        capture_output=True,
        text=True,
        check=True,
        env={**__import__("os").environ, "APPLIANCE_HOME": str(home)},
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["decisions"] >= len(TEXTS) * 3
    assert 0.0 <= report["automation_rate"] <= 1.0
    assert report["automation_rate"] + report["escalation_rate"] == pytest.approx(1.0)
