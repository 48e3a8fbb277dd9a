"""The routing layer between the specialists and the generalist.

- :mod:`~appliance.router.interface`: what the serving runtime calls on its router;
- :mod:`~appliance.router.policy`: the effective policy of a request, and the load-time label check;
- :mod:`~appliance.router.cascade`: per text, specialist or generalist, with cost and records;
- :mod:`~appliance.router.cost`: core- and accelerator-seconds, priced at the box's hourly rate;
- :mod:`~appliance.router.generalists`: several generalists by name, each priced, and per-model settings;
- :mod:`~appliance.router.retrieval`: the demonstration index and the nearest examples it gives;
- :mod:`~appliance.router.escalations`: the durable SQLite store of escalations and decisions;
- :mod:`~appliance.router.metrics`: Prometheus counters;
- :mod:`~appliance.router.commands`: ``appliance report``.
"""

from appliance.router.cascade import Cascade, ModelRef
from appliance.router.cost import CostModel, price_generalist, share
from appliance.router.escalations import EscalationStore
from appliance.router.interface import Router
from appliance.router.metrics import RouterMetrics
from appliance.router.policy import check_label_set, parse_policy, resolve_policy

__all__ = [
    "Cascade",
    "CostModel",
    "EscalationStore",
    "ModelRef",
    "Router",
    "RouterMetrics",
    "check_label_set",
    "parse_policy",
    "price_generalist",
    "resolve_policy",
    "share",
]
