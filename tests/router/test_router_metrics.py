"""Router counters: registration is idempotent per registry, and values add up."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry

from appliance.router.metrics import RouterMetrics
from appliance.types import Cost, Decision, Route


def decision(route: Route, core: float, price: float) -> Decision:
    return Decision(
        label="a",
        confidence=0.9,
        top=[("a", 0.9)],
        truncated=False,
        route=route,
        latency_ms=1.0,
        cost=Cost(core_seconds=core, price=price),
    )


def test_constructing_twice_on_one_registry_shares_the_counters() -> None:
    registry = CollectorRegistry()
    first, second = RouterMetrics(registry), RouterMetrics(registry)
    first.observe("m", [decision(Route.SPECIALIST, 1.0, 0.5)])
    second.observe("m", [decision(Route.SPECIALIST, 2.0, 0.25)])
    labels = {"model": "m", "route": "specialist"}
    assert registry.get_sample_value("appliance_decisions_total", labels) == 2
    assert registry.get_sample_value("appliance_cost_core_seconds_total", labels) == 3.0
    assert registry.get_sample_value("appliance_cost_price_total", labels) == 0.75


def test_the_default_registry_can_be_used_by_two_instances_in_one_process() -> None:
    first = RouterMetrics()
    second = RouterMetrics()  # would raise "Duplicated timeseries" if it registered again
    labels = {"model": "shared-default", "route": "specialist"}  # a model no other test observes
    before = REGISTRY.get_sample_value("appliance_decisions_total", labels) or 0.0
    first.observe("shared-default", [decision(Route.SPECIALIST, 1.0, 0.5)])
    second.observe("shared-default", [decision(Route.SPECIALIST, 1.0, 0.5)] * 2)
    assert REGISTRY.get_sample_value("appliance_decisions_total", labels) == before + 3


def test_escalations_and_fallbacks_are_counted_per_model() -> None:
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    batch = [
        decision(Route.GENERALIST, 1.0, 0.1),
        decision(Route.GENERALIST, 1.0, 0.1),
        decision(Route.SPECIALIST, 0.1, 0.0),
    ]
    metrics.observe("m", batch, fallbacks=1)
    assert registry.get_sample_value("appliance_escalations_total", {"model": "m"}) == 2
    assert registry.get_sample_value("appliance_fallbacks_total", {"model": "m"}) == 1
    assert registry.get_sample_value("appliance_decisions_total", {"model": "m", "route": "generalist"}) == 2
