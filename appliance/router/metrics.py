"""Prometheus counters of the routing layer.

Counters only; rates come from PromQL, which computes them over any window without a gauge that
would freeze one window into the process. The escalation rate per model::

    sum by (model) (rate(appliance_escalations_total[5m]))
      / sum by (model) (rate(appliance_decisions_total[5m]))

and the cost per 1,000 decisions on a route::

    1000 * rate(appliance_cost_price_total[1h]) / rate(appliance_decisions_total[1h])

An escalation is a decision the generalist answered (``route="generalist"``), under the cascade
or under ``generalist_only``. Prices are in the cost model's currency. For an extractor each text
is one decision; ``appliance_generalist_spans_dropped_total`` counts the spans the generalist
claimed that were not in their text (dropped, never answered).

Constructing :class:`RouterMetrics` twice on one registry (the default one, or any other) shares
the first construction's collectors instead of failing with a duplicate registration.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter

from appliance.types import Cost, Decision, Extraction, Route


class _Collectors:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.decisions = Counter(
            "appliance_decisions",
            "decisions, by model and the route that answered",
            ["model", "route"],
            registry=r,
        )
        self.escalations = Counter(
            "appliance_escalations",
            "decisions the generalist answered, recorded for retraining",
            ["model"],
            registry=r,
        )
        self.fallbacks = Counter(
            "appliance_fallbacks",
            "decisions the specialist answered because the generalist was needed but absent",
            ["model"],
            registry=r,
        )
        self.dropped_spans = Counter(
            "appliance_generalist_spans_dropped",
            "spans the generalist returned that are not in the text at the offsets found, dropped",
            ["model"],
            registry=r,
        )
        self.core_seconds = Counter(
            "appliance_cost_core_seconds",
            "CPU core-seconds spent on decisions",
            ["model", "route"],
            registry=r,
        )
        self.accelerator_seconds = Counter(
            "appliance_cost_accelerator_seconds",
            "accelerator-seconds spent on decisions",
            ["model", "route"],
            registry=r,
        )
        self.price = Counter(
            "appliance_cost_price",
            "price of decisions in the configured currency, at the box's hourly price",
            ["model", "route"],
            registry=r,
        )


_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, _Collectors] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = REGISTRY if registry is None else registry
        with _LOCK:
            collectors = _BY_REGISTRY.get(self.registry)
            if collectors is None:
                collectors = _BY_REGISTRY[self.registry] = _Collectors(self.registry)
        self._c = collectors

    def observe(self, model: str, decisions: Iterable[Decision], fallbacks: int = 0) -> None:
        """Count one request's decisions (summed per route first: one increment per series)."""
        self._count(model, ((d.route, d.cost) for d in decisions), fallbacks)

    def observe_extractions(
        self, model: str, extractions: Iterable[Extraction], fallbacks: int = 0, dropped: int = 0
    ) -> None:
        """Count one Extract request: each text is a decision, on the generalist's route when it
        was escalated; ``dropped``: the generalist's spans that were not in their text."""
        routed = ((Route.GENERALIST if e.escalation_id else Route.SPECIALIST, e.cost) for e in extractions)
        self._count(model, routed, fallbacks)
        if dropped:
            self._c.dropped_spans.labels(model).inc(dropped)

    def _count(self, model: str, decisions: Iterable[tuple[Route, Cost]], fallbacks: int) -> None:
        totals: dict[Route, list[float]] = {}
        for route, cost in decisions:
            t = totals.setdefault(route, [0, 0.0, 0.0, 0.0])
            t[0] += 1
            t[1] += cost.core_seconds
            t[2] += cost.accelerator_seconds
            t[3] += cost.price
        c = self._c
        for route, (count, core, accel, price) in totals.items():
            c.decisions.labels(model, route.value).inc(count)
            c.core_seconds.labels(model, route.value).inc(core)
            c.accelerator_seconds.labels(model, route.value).inc(accel)
            c.price.labels(model, route.value).inc(price)
            if route is Route.GENERALIST:
                c.escalations.labels(model).inc(count)
        if fallbacks:
            c.fallbacks.labels(model).inc(fallbacks)
