"""Routing logic of the cascade, with a scripted generalist stand-in (see scripted_generalist.py).

Everything else is real: the SQLite escalation store on disk, the cost model, the Prometheus
counters. The real vLLM engine behind the same interface is exercised in test_router_with_vllm.py.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from scripted_generalist import ScriptedGeneralist

from appliance.artifact.manifest import SpecialistManifest
from appliance.errors import (
    ApplianceError,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from appliance.router.cascade import Cascade, ModelRef
from appliance.router.cost import CostModel
from appliance.router.escalations import EscalationStore
from appliance.router.metrics import RouterMetrics
from appliance.types import Decision, Policy, Route, SpecialistAnswer
from tests.artifact.old_manifest import old_manifest

LABELS = ["card_arrival", "card_linking", "exchange_rate", "refund"]
COST = CostModel(price_per_hour=3.6, cores=2)  # 0.0005 per core-second


def model(
    threshold: float = 0.8, default_policy: Policy | None = Policy.CASCADE, labels: list[str] = LABELS
) -> ModelRef:
    return ModelRef(
        name="bank",
        version=2,
        labels=labels,
        threshold=threshold,
        label_descriptions={"refund": "money back"},
        default_policy=default_policy,
    )


def answer(confidence: float, core_seconds: float = 0.02, latency_ms: float = 3.0) -> SpecialistAnswer:
    return SpecialistAnswer(
        top=[("card_arrival", confidence), ("card_linking", (1 - confidence) / 2)],
        probs=None,
        truncated=False,
        core_seconds=core_seconds,
        latency_ms=latency_ms,
    )


def texts_for(n: int) -> list[str]:
    return [" ".join(["word"] * (k + 1)) + f" text {k}" for k in range(n)]


@dataclass
class Rig:
    store: EscalationStore
    registry: CollectorRegistry
    db: Path

    def cascade(self, generalist: ScriptedGeneralist | None, cost: CostModel = COST, **kw: Any) -> Cascade:
        return Cascade(generalist, self.store, cost, RouterMetrics(self.registry), **kw)

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        with closing(sqlite3.connect(self.db)) as conn:
            return conn.execute(sql).fetchall()

    def counter(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    db = tmp_path / "escalations.db"
    store = EscalationStore(db)
    yield Rig(store, CollectorRegistry(), db)
    store.close()


def decide(
    cascade: Cascade,
    confidences: Sequence[float],
    policy: Policy | None = None,
    allow_fallback: bool = False,
    ref: ModelRef | None = None,
) -> tuple[list[Decision], list[SpecialistAnswer], list[str]]:
    answers = [answer(c, core_seconds=0.01 * (k + 1)) for k, c in enumerate(confidences)]
    texts = texts_for(len(confidences))

    async def run() -> list[Decision]:
        try:
            return await cascade.decide(
                ref or model(), answers, policy, allow_fallback=allow_fallback, request_id="r1", texts=texts
            )
        finally:
            await cascade.close()  # writes the buffered specialist-only rows, as a server's shutdown does

    return asyncio.run(run()), answers, texts


def test_threshold_one_sends_every_text_to_the_generalist_and_records_each(rig: Rig) -> None:
    generalist = ScriptedGeneralist(script={texts_for(3)[1]: "card_linking"})
    decisions, _, texts = decide(rig.cascade(generalist), [0.999, 0.5, 0.97], ref=model(threshold=1.0))
    assert [d.route for d in decisions] == [Route.GENERALIST] * 3
    assert generalist.calls == texts
    # The scripted label, else the last label.
    assert [d.label for d in decisions] == ["refund", "card_linking", "refund"]
    assert all(d.confidence == 0.75 for d in decisions)
    ids = [d.escalation_id for d in decisions]
    assert all(ids) and len(set(ids)) == 3
    # On disk, through another connection, by the time decide returned.
    stored = rig.rows("SELECT id, final_label, policy, request_id, threshold FROM escalations ORDER BY rowid")
    assert stored == [(i, d.label, "cascade", "r1", 1.0) for i, d in zip(ids, decisions, strict=True)]


def test_threshold_zero_keeps_every_text_on_the_specialist(rig: Rig) -> None:
    generalist = ScriptedGeneralist()
    decisions, answers, _ = decide(rig.cascade(generalist), [0.01, 0.5, 0.99], ref=model(threshold=0.0))
    assert [d.route for d in decisions] == [Route.SPECIALIST] * 3
    assert generalist.calls == []
    assert [(d.label, d.confidence) for d in decisions] == [a.top[0] for a in answers]
    assert all(d.escalation_id == "" for d in decisions)
    assert rig.rows("SELECT COUNT(*) FROM escalations") == [(0,)]
    assert rig.rows("SELECT route, COUNT(*) FROM decisions GROUP BY route") == [("specialist", 3)]


def test_a_mixed_batch_escalates_exactly_the_texts_below_the_threshold(rig: Rig) -> None:
    generalist = ScriptedGeneralist()
    # 0.8 equals the threshold: "at least the threshold" stays with the specialist.
    decisions, answers, texts = decide(rig.cascade(generalist), [0.95, 0.5, 0.8, 0.2, 0.79999])
    routes = [d.route for d in decisions]
    assert routes == [
        Route.SPECIALIST,
        Route.GENERALIST,
        Route.SPECIALIST,
        Route.GENERALIST,
        Route.GENERALIST,
    ]
    assert generalist.calls == [texts[1], texts[3], texts[4]]
    for d, a in zip(decisions, answers, strict=True):
        assert d.top == a.top  # the specialist's view travels with every decision
        if d.route is Route.GENERALIST:
            assert d.latency_ms >= a.latency_ms
        else:
            assert d.latency_ms == a.latency_ms
    escalation_id = decisions[1].escalation_id
    [stored] = rig.rows(
        f"SELECT specialist_top, specialist_confidence FROM escalations WHERE id = '{escalation_id}'"
    )
    assert stored == ('[["card_arrival", 0.5], ["card_linking", 0.25]]', 0.5)


def test_costs_add_up_per_text_and_in_the_counters(rig: Rig) -> None:
    generalist = ScriptedGeneralist(engine_seconds=0.5)
    decisions, answers, texts = decide(rig.cascade(generalist), [0.95, 0.5, 0.9, 0.3])
    generalist_parts = {}
    for k, (d, a) in enumerate(zip(decisions, answers, strict=True)):
        assert d.cost.price == pytest.approx(d.cost.core_seconds * 0.0005)
        assert d.cost.accelerator_seconds == 0.0
        if d.route is Route.SPECIALIST:
            assert d.cost.core_seconds == a.core_seconds
        else:  # both routes were spent on it
            generalist_parts[k] = d.cost.core_seconds - a.core_seconds
    # The generalist's busy time is shared by tokens, and never more than the engine reported.
    assert set(generalist_parts) == {1, 3}
    assert all(part >= 0 for part in generalist_parts.values())
    assert sum(generalist_parts.values()) <= COST.cores * 2 * 0.5 + 1e-12
    tokens = {k: ScriptedGeneralist.prompt_tokens(texts[k]) + 2 for k in generalist_parts}
    assert generalist_parts[1] > 0
    assert generalist_parts[3] / generalist_parts[1] == pytest.approx(tokens[3] / tokens[1])
    # Counters equal the sums of the decisions' costs, per route.
    for route in Route:
        mine = [d for d in decisions if d.route is route]
        labels = {"model": "bank", "route": route.value}
        assert rig.counter("appliance_decisions_total", **labels) == len(mine)
        assert rig.counter("appliance_cost_core_seconds_total", **labels) == pytest.approx(
            math.fsum(d.cost.core_seconds for d in mine)
        )
        assert rig.counter("appliance_cost_price_total", **labels) == pytest.approx(
            math.fsum(d.cost.price for d in mine)
        )
    assert rig.counter("appliance_escalations_total", model="bank") == 2
    # And the decision rows the report reads hold the same numbers.
    [(n, core, price)] = rig.rows("SELECT COUNT(*), SUM(cost_core_seconds), SUM(price) FROM decisions")
    assert n == 4
    assert core == pytest.approx(math.fsum(d.cost.core_seconds for d in decisions))
    assert price == pytest.approx(math.fsum(d.cost.price for d in decisions))


def test_an_accelerator_generalist_is_charged_in_accelerator_seconds(rig: Rig) -> None:
    gpu_box = CostModel(price_per_hour=3.6, cores=16, accelerators=1)
    generalist = ScriptedGeneralist(accelerator=True)
    decisions, answers, _ = decide(rig.cascade(generalist, cost=gpu_box), [0.5, 0.95])
    escalated, kept = decisions
    assert escalated.cost.core_seconds == answers[0].core_seconds  # the specialist's part only
    assert escalated.cost.price == pytest.approx(escalated.cost.accelerator_seconds * 0.001)
    assert kept.cost.price == 0.0  # cores ride free on a GPU box by default
    with pytest.raises(InvalidArgument, match="counts none"):
        rig.cascade(generalist, cost=COST)


def test_generalist_only_sends_even_confident_texts(rig: Rig) -> None:
    generalist = ScriptedGeneralist()
    decisions, _, _ = decide(rig.cascade(generalist), [0.99, 0.999], policy=Policy.GENERALIST_ONLY)
    assert [d.route for d in decisions] == [Route.GENERALIST] * 2
    assert rig.rows("SELECT DISTINCT policy FROM escalations") == [("generalist_only",)]


def test_specialist_only_never_calls_the_generalist(rig: Rig) -> None:
    generalist = ScriptedGeneralist()
    decisions, _, _ = decide(rig.cascade(generalist), [0.1, 0.2], policy=Policy.SPECIALIST_ONLY)
    assert [d.route for d in decisions] == [Route.SPECIALIST] * 2
    assert generalist.calls == []


def test_the_model_default_policy_applies_when_the_request_states_none(rig: Rig) -> None:
    generalist = ScriptedGeneralist()
    ref = model(default_policy=Policy.SPECIALIST_ONLY)
    decisions, _, _ = decide(rig.cascade(generalist), [0.1], ref=ref)
    assert decisions[0].route is Route.SPECIALIST
    decisions, _, _ = decide(rig.cascade(generalist), [0.1], policy=Policy.CASCADE, ref=ref)
    assert decisions[0].route is Route.GENERALIST


def test_without_a_generalist_a_policy_that_needs_one_is_a_failed_precondition(rig: Rig) -> None:
    cascade = rig.cascade(None)
    with pytest.raises(FailedPrecondition) as caught:
        decide(cascade, [0.95, 0.5], policy=Policy.CASCADE)
    assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert (
        "sends 1 of 2 texts for model bank to the generalist, but no generalist is configured"
        in caught.value.message
    )
    with pytest.raises(FailedPrecondition):
        decide(cascade, [0.95], policy=Policy.GENERALIST_ONLY)
    assert rig.rows("SELECT COUNT(*) FROM decisions") == [(0,)]
    # Confident texts need no generalist, and an unstated policy falls back to specialist_only.
    assert [d.route for d in decide(cascade, [0.95], policy=Policy.CASCADE)[0]] == [Route.SPECIALIST]
    assert [d.route for d in decide(cascade, [0.1])[0]] == [Route.SPECIALIST]


def test_allow_fallback_answers_with_the_specialist_and_counts_the_fallbacks(rig: Rig) -> None:
    decisions, answers, _ = decide(
        rig.cascade(None), [0.95, 0.5, 0.3], policy=Policy.CASCADE, allow_fallback=True
    )
    assert [d.route for d in decisions] == [Route.SPECIALIST] * 3
    assert [(d.label, d.confidence) for d in decisions] == [a.top[0] for a in answers]
    assert all(d.escalation_id == "" for d in decisions)
    assert rig.rows("SELECT fallback FROM decisions ORDER BY id") == [(0,), (1,), (1,)]
    assert rig.rows("SELECT COUNT(*) FROM escalations") == [(0,)]
    assert rig.counter("appliance_fallbacks_total", model="bank") == 2


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (
            ResourceExhausted("the generalist is serving 8 requests, its limit; retry later"),
            "RESOURCE_EXHAUSTED",
        ),
        (Unavailable("the generalist engine is dead; it must be restarted"), "UNAVAILABLE"),
    ],
)
def test_generalist_overload_and_death_propagate_with_their_status(
    rig: Rig, error: ApplianceError, status: str
) -> None:
    texts = texts_for(4)
    generalist = ScriptedGeneralist(fail_with=error, failing={texts[2]})
    with pytest.raises(ApplianceError) as caught:
        decide(rig.cascade(generalist), [0.1, 0.2, 0.3, 0.4])
    assert caught.value is error
    assert caught.value.code.name == status
    # Nothing is recorded for a call that failed as a whole.
    assert rig.rows("SELECT COUNT(*) FROM escalations") == [(0,)]
    assert rig.rows("SELECT COUNT(*) FROM decisions") == [(0,)]


def test_a_text_the_generalist_refuses_is_invalid_with_its_index(rig: Rig) -> None:
    texts = texts_for(2)
    generalist = ScriptedGeneralist(
        fail_with=InvalidArgument("the prompt is 3000 tokens"), failing={texts[1]}
    )
    with pytest.raises(
        InvalidArgument, match="text 1: the generalist cannot take it: the prompt is 3000 tokens"
    ):
        decide(rig.cascade(generalist), [0.1, 0.2])


def test_escalations_run_concurrently_up_to_the_bound(rig: Rig) -> None:
    generalist = ScriptedGeneralist()
    decide(rig.cascade(generalist, max_concurrency=3), [0.1] * 7)
    assert len(generalist.calls) == 7
    assert generalist.most_in_flight == 3


def test_a_label_set_the_generalist_cannot_take_fails_the_load_when_the_default_needs_it(rig: Rig) -> None:
    generalist = ScriptedGeneralist(max_labels=3)
    cascade = rig.cascade(generalist)
    with pytest.raises(FailedPrecondition, match=r"model bank:2: .*4 labels do not fit; at most 3"):
        asyncio.run(cascade.check_model(model(default_policy=Policy.CASCADE)))
    # Served specialist-only by default: it loads, and requests that want the generalist are told why.
    ref = model(default_policy=Policy.SPECIALIST_ONLY)
    asyncio.run(cascade.check_model(ref))
    with pytest.raises(FailedPrecondition, match="4 labels do not fit"):
        decide(cascade, [0.1], policy=Policy.CASCADE, ref=ref)
    decisions, _, _ = decide(cascade, [0.1], policy=Policy.CASCADE, ref=ref, allow_fallback=True)
    assert decisions[0].route is Route.SPECIALIST
    assert generalist.calls == []


def test_a_loaded_specialist_is_read_as_a_model_ref(rig: Rig) -> None:
    """Everything routing needs comes from the specialist's typed manifest."""

    @dataclass
    class Loaded:  # what ModelRef.of reads of appliance.engines.specialist.Specialist
        spec: SpecialistManifest

    def manifest(**changes: Any) -> SpecialistManifest:
        data = old_manifest()
        data["calibration"] = {**data["calibration"], "threshold": 0.6}
        return SpecialistManifest.model_validate(
            {**data, "name": "bank", "version": 7, "labels": list(LABELS), **changes}
        )

    described = manifest(default_policy="generalist_only", label_descriptions={"refund": "money back"})
    ref = ModelRef.of(Loaded(described))
    assert ref == ModelRef("bank", 7, list(LABELS), 0.6, {"refund": "money back"}, Policy.GENERALIST_ONLY)
    # a manifest that states no policy gets the factory's default
    unstated = {k: v for k, v in manifest().model_dump().items() if k != "default_policy"}
    assert ModelRef.of(Loaded(SpecialistManifest.model_validate(unstated))).default_policy is Policy.CASCADE


def test_mismatched_answers_and_texts_are_an_internal_error(rig: Rig) -> None:
    cascade = rig.cascade(ScriptedGeneralist())
    with pytest.raises(ApplianceError, match="2 specialist answers for 1 texts"):
        asyncio.run(cascade.decide(model(), [answer(0.9), answer(0.9)], None, texts=["one"]))


def test_a_text_rejected_as_out_of_scope_is_answered_by_the_specialist(rig: Rig) -> None:
    generalist = ScriptedGeneralist()
    cascade = rig.cascade(generalist)
    answers = [replace(answer(0.3), rejected_as="oos"), answer(0.3), answer(0.95)]
    texts = texts_for(3)

    async def run() -> list[Decision]:
        try:
            return await cascade.decide(model(), answers, None, request_id="r1", texts=texts)
        finally:
            await cascade.close()

    decisions = asyncio.run(run())
    assert [d.route for d in decisions] == [Route.SPECIALIST, Route.GENERALIST, Route.SPECIALIST]
    assert (decisions[0].label, decisions[0].confidence) == ("oos", 0.3)
    assert decisions[2].label == "card_arrival"
    assert generalist.calls == [texts[1]]
