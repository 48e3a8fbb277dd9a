"""Several endpoints behind one channel: gRPC's own balancing, health checking and retries.

An address is ``host:port``, a comma list of them (``10.0.0.1:50051,10.0.0.2:50051``), or a DNS
name with several addresses (``dns:///appliance.internal:50051``). With more than one endpoint the
channel gets the service config :func:`service_config` builds: ``round_robin`` over every
endpoint it holds a connection to (a node that is gone drops out within one reconnect; with
``health_check``, also one whose ``grpc.health.v1`` is not SERVING: models not warm, draining; that
needs health open to the client network, since the channel's health calls carry no bearer token),
and a retry policy that re-sends a call refused with UNAVAILABLE (a node
that went away before it answered) to another endpoint, with exponential backoff, within gRPC's
retry budget (``retryThrottling``). The same JSON works for Java and Go clients (docs/CLUSTER.md).

A retried ``Classify`` or ``Extract`` carries the caller's ``request_id`` unchanged, so the
answer and its decision record are tied to one id however many times it was sent.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

# Calls that are safe to send again after UNAVAILABLE: reads, and the inference calls (which
# change nothing but the decision record, keyed by request id). Admin calls and the generation
# stream are never retried by the channel.
RETRIED_METHODS = (
    ("appliance.v1.InferenceService", "Classify"),
    ("appliance.v1.InferenceService", "Extract"),
    ("appliance.v1.InferenceService", "Embed"),
    ("appliance.v1.ModelService", "ListModels"),
    ("appliance.v1.ModelService", "GetModel"),
    ("inference.GRPCInferenceService", "ModelInfer"),
)
MAX_ATTEMPTS = 4
INITIAL_BACKOFF_S = 0.05
MAX_BACKOFF_S = 1.0


def endpoints(address: str) -> list[str]:
    """The ``host:port`` endpoints of a comma list (one entry for a single address or DNS name)."""
    parts = [part.strip() for part in address.split(",")]
    if not all(parts):
        raise ValueError(f"empty endpoint in {address!r}")
    return parts


def channel_target(address: str) -> str:
    """The gRPC target for ``address``: a comma list of IP endpoints becomes one ``ipv4:``/``ipv6:``
    target that a single channel balances over; anything else is passed as it is."""
    parts = endpoints(address)
    if len(parts) == 1:
        return parts[0]
    families = {_family(part) for part in parts}
    if len(families) != 1 or None in families:
        raise ValueError(
            f"a comma list of endpoints must be IP addresses of one family (host:port), got {address!r}; "
            "for host names use one DNS name with several addresses: dns:///NAME:PORT"
        )
    return f"{families.pop()}:{','.join(parts)}"


def balances(address: str) -> bool:
    """Whether ``address`` may name several endpoints (a list, or a name the dns resolver expands)."""
    return len(endpoints(address)) > 1 or address.startswith("dns:")


def _family(endpoint: str) -> str | None:
    host, _, port = endpoint.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"endpoint {endpoint!r} has no port (host:port)")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return "ipv4" if ip.version == 4 else "ipv6"


def service_config(
    max_attempts: int = MAX_ATTEMPTS,
    initial_backoff_s: float = INITIAL_BACKOFF_S,
    max_backoff_s: float = MAX_BACKOFF_S,
    health_check: bool = False,
) -> dict[str, Any]:
    """The service config: round_robin over the endpoints, retries of UNAVAILABLE."""
    config: dict[str, Any] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": service, "method": method} for service, method in RETRIED_METHODS],
                "retryPolicy": {
                    "maxAttempts": max_attempts,
                    "initialBackoff": f"{initial_backoff_s}s",
                    "maxBackoff": f"{max_backoff_s}s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
        # the retry budget: a failed call costs a token, a success returns 0.1; no retries below 5
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    }
    if health_check:  # the server's overall health: SERVING once every configured model is warm
        config["healthCheckConfig"] = {"serviceName": ""}
    return config


def channel_options(address: str) -> list[tuple[str, Any]]:
    """Channel options for ``address``: the service config when it may be several endpoints."""
    if not balances(address):
        return []
    return [
        ("grpc.service_config", json.dumps(service_config())),
        ("grpc.enable_retries", 1),
        ("grpc.lb_policy_name", "round_robin"),
    ]
