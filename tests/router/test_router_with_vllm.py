"""The cascade against the real generalist: a vLLM engine serving a tiny random Llama.

The model's answers are noise, but the interface is the real one: the load-time label check
runs the engine's own tokenizer and prompt, and escalations go through vLLM with the output
constrained to the label set.
"""

from __future__ import annotations

import asyncio
import csv
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from importlib import resources
from pathlib import Path

import pytest

from appliance.config import apply_offline_env
from appliance.engines.generalist import GeneralistEngine
from appliance.engines.generalist_args import GeneralistArgs
from appliance.engines.tiny_llm import build_tiny_llm
from appliance.errors import FailedPrecondition
from appliance.router.cascade import Cascade, ModelRef
from appliance.router.cost import CostModel
from appliance.router.escalations import EscalationStore
from appliance.types import Policy, Route, SpecialistAnswer

apply_offline_env()

pytestmark = [pytest.mark.slow]

WINDOW = 1024
LABELS = ["card_arrival", "card_linking", "exchange_rate", "lost_or_stolen_card", "refund"]


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llm"), seed=0)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def banking_texts(n: int) -> list[str]:
    path = resources.files("appliance") / "data" / "banking77" / "test.csv"
    with path.open(encoding="utf-8", newline="") as f:
        return [row["text"] for row in csv.DictReader(f)][:n]


def model(labels: list[str], threshold: float = 0.8, policy: Policy = Policy.CASCADE) -> ModelRef:
    descriptions = {"refund": "the customer wants money back"} if "refund" in labels else {}
    return ModelRef("bank", 1, labels, threshold, descriptions, policy)


def test_a_label_set_too_large_for_the_engine_window_fails_at_load(tiny_llm: Path, tmp_path: Path) -> None:
    # The check needs only the engine's tokenizer: it is not started.
    engine = GeneralistEngine(GeneralistArgs(path=str(tiny_llm), max_model_len=WINDOW))
    with EscalationStore(tmp_path / "e.db") as store:
        cascade = Cascade(engine, store, CostModel(cores=2))
        asyncio.run(cascade.check_model(model(LABELS)))
        too_many = [f"label_number_{i}_with_a_rather_long_name" for i in range(300)]
        with pytest.raises(FailedPrecondition, match=r"model bank:1: .*300 labels.*window is 1024 tokens"):
            asyncio.run(cascade.check_model(model(too_many)))


@pytest.mark.integration
def test_escalations_go_through_vllm_and_are_recorded(
    tiny_llm: Path, tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    args = GeneralistArgs(
        path=str(tiny_llm), max_model_len=WINDOW, kv_cache_gib=1, max_concurrency=4, enforce_eager=True
    )
    engine = GeneralistEngine(args)
    loop.run_until_complete(engine.start())
    db = tmp_path / "e.db"
    try:
        with EscalationStore(db) as store:
            cascade = Cascade(engine, store, CostModel(price_per_hour=3.6, cores=2), max_concurrency=4)
            texts = banking_texts(4)
            answers = [
                SpecialistAnswer([("card_arrival", c)], None, False, core_seconds=0.01, latency_ms=2.0)
                for c in (0.95, 0.2, 0.5, 0.9)
            ]
            decisions = loop.run_until_complete(
                cascade.decide(model(LABELS), answers, None, request_id="req-vllm", texts=texts)
            )
    finally:
        loop.run_until_complete(engine.stop())

    routes = [d.route for d in decisions]
    assert routes == [Route.SPECIALIST, Route.GENERALIST, Route.GENERALIST, Route.SPECIALIST]
    for d in decisions[1:3]:
        assert d.label in LABELS
        assert 0.0 < d.confidence <= 1.0
        assert d.cost.core_seconds > 0.01  # the generalist's share on top of the specialist's
        assert d.escalation_id
    with closing(sqlite3.connect(db)) as conn:
        stored = conn.execute(
            "SELECT id, generalist_label, generalist_prompt_tokens, generalist_completion_tokens"
            " FROM escalations"
        ).fetchall()
    assert {row[0] for row in stored} == {decisions[1].escalation_id, decisions[2].escalation_id}
    assert all(label in LABELS and prompt > 0 and completion > 0 for _, label, prompt, completion in stored)
