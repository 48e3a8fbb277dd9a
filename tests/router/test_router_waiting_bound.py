"""The cascade bounds the texts waiting for the generalist: past ``max_waiting`` an escalation is
refused RESOURCE_EXHAUSTED before any text is sent, or answered by the specialist as a fallback
when the caller allows one. The scripted generalist holds its answers at a gate, so that calls
stay waiting; the escalation store and counters are real.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from contextlib import closing
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry
from scripted_generalist import ScriptedGeneralist

from appliance.errors import InvalidArgument, ResourceExhausted, Unavailable
from appliance.router.cascade import Cascade, ModelRef
from appliance.router.cost import CostModel
from appliance.router.escalations import EscalationStore
from appliance.router.metrics import RouterMetrics
from appliance.types import Decision, Policy, Route, SpecialistAnswer

LABELS = ["card_arrival", "card_linking", "refund"]
REF = ModelRef(name="bank", version=1, labels=LABELS, threshold=0.8, default_policy=Policy.CASCADE)
BOUND_S = 10.0  # the most any wait below may take; never reached when things work


def unsure(n: int) -> list[SpecialistAnswer]:
    """``n`` answers below the threshold: each one escalates."""
    return [
        SpecialistAnswer(
            top=[("card_arrival", 0.4)], probs=None, truncated=False, core_seconds=0.01, latency_ms=1
        )
        for _ in range(n)
    ]


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EscalationStore]:
    escalations = EscalationStore(tmp_path / "escalations.db")
    yield escalations
    escalations.close()


async def until(check: Callable[[], bool]) -> None:
    async def poll() -> None:
        while not check():
            await asyncio.sleep(0.001)

    await asyncio.wait_for(poll(), BOUND_S)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), BOUND_S * 3))


def test_escalations_past_the_bound_are_refused_or_fall_back_and_the_bound_frees_up(
    store: EscalationStore, registry: CollectorRegistry, tmp_path: Path
) -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        generalist = ScriptedGeneralist(gate=gate)
        cascade = Cascade(generalist, store, CostModel(cores=2), RouterMetrics(registry), max_waiting=3)

        def decide(n: int, tag: str, allow_fallback: bool = False) -> Awaitable[list[Decision]]:
            texts = [f"{tag} {k}" for k in range(n)]
            return cascade.decide(REF, unsure(n), None, allow_fallback=allow_fallback, texts=texts)

        held = asyncio.ensure_future(decide(2, "held"))
        await until(lambda: generalist.in_flight == 2)
        assert cascade.waiting == 2

        with pytest.raises(ResourceExhausted) as refused:
            await decide(2, "refused")
        assert refused.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 texts are waiting for the generalist; 2 more would pass the limit of 3" in (
            refused.value.message
        )
        assert not any(text.startswith("refused") for text in generalist.calls)  # none was sent

        fell_back = await decide(2, "fallback", allow_fallback=True)
        assert [(d.route, d.fallback, d.label) for d in fell_back] == [
            (Route.SPECIALIST, True, "card_arrival")
        ] * 2
        assert registry.get_sample_value("appliance_fallbacks_total", {"model": "bank"}) == 2

        fits = asyncio.ensure_future(decide(1, "fits"))  # 2 + 1 is within the bound
        await until(lambda: generalist.in_flight == 3)
        assert cascade.waiting == 3

        gate.set()
        answered = [*(await held), *(await fits)]
        assert [d.route for d in answered] == [Route.GENERALIST] * 3
        assert cascade.waiting == 0
        again = await decide(3, "again")  # the bound is free again
        assert [d.route for d in again] == [Route.GENERALIST] * 3
        await cascade.close()

    run(scenario)
    with closing(sqlite3.connect(tmp_path / "escalations.db")) as conn:
        assert conn.execute("SELECT COUNT(*) FROM escalations").fetchone() == (6,)


def test_a_failed_escalation_frees_its_place(store: EscalationStore, registry: CollectorRegistry) -> None:
    async def scenario() -> None:
        generalist = ScriptedGeneralist(fail_with=Unavailable("the generalist is down"), failing={"bad"})
        cascade = Cascade(generalist, store, CostModel(cores=2), RouterMetrics(registry), max_waiting=2)
        with pytest.raises(Unavailable):
            await cascade.decide(REF, unsure(2), None, texts=["bad", "good"])
        assert cascade.waiting == 0
        decisions = await cascade.decide(REF, unsure(2), None, texts=["one", "two"])
        assert [d.route for d in decisions] == [Route.GENERALIST] * 2
        await cascade.close()

    run(scenario)


def test_the_bound_must_be_positive(store: EscalationStore) -> None:
    with pytest.raises(InvalidArgument, match="max_waiting must be at least 1"):
        Cascade(ScriptedGeneralist(), store, CostModel(cores=2), max_waiting=0)
