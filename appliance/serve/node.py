"""How many ingress processes a serving node runs, and the share of its cores each one takes.

The Python request path (grpc.aio callbacks, protobuf, TLS, auth, audit) costs about as much CPU
per request as the int8 encoder (bench/PERF.md), and one process runs it on one event loop, so a
node serves with several ingress processes on one port (SO_REUSEPORT spreads connections among
them). Each holds its own encoder sessions and heads: no call crosses a process per request.

A node says how many ingress processes it takes through the Ray resource
:data:`INGRESS_RESOURCE` (``ray start --resources '{"appliance_ingress": N}'``; the local
``appliance serve`` starts Ray with it); each ingress replica asks for one unit of it.
"""

from __future__ import annotations

from appliance.engines.encoder import cores

INGRESS_RESOURCE = "appliance_ingress"
# The default stops here: every process holds a copy of the encoder and heads, and past this many
# event loops the engine, not the front end, is what a node runs out of.
MAX_DEFAULT_INGRESS = 8
MAX_INGRESS_PER_NODE = 64


def default_ingress_per_node(node_cores: int | None = None) -> int:
    """One ingress process per two cores (its event loop and one encoder batch), 1 to 8."""
    available = cores() if node_cores is None else node_cores
    return max(1, min(MAX_DEFAULT_INGRESS, available // 2))


def ingress_per_node(configured: int | None, node_cores: int | None = None) -> int:
    """The configured count, or the default for this node's cores."""
    return configured if configured is not None else default_ingress_per_node(node_cores)


def cores_per_ingress(count: int, node_cores: int | None = None) -> int:
    """The cores one of ``count`` ingress processes may keep busy with encoder batches."""
    available = cores() if node_cores is None else node_cores
    return max(1, available // max(1, count))


def declared_units() -> int | None:
    """The ``appliance_ingress`` units the Ray node of this process declares; None outside Ray or
    on a node that declares none. On a cluster this, not the Serve config, is the node's count:
    each node says its own (``ray start --resources``), and the replicas on it split its cores."""
    import ray

    if not ray.is_initialized():
        return None
    here = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == here and node.get("Alive"):
            units = int(node.get("Resources", {}).get(INGRESS_RESOURCE, 0))
            return units or None
    return None
