"""Where the ingress runs: one replica per unit of the ``appliance_ingress`` Ray resource.

A node is meant to serve when its ``ray start`` declares ``--resources '{"appliance_ingress": N}'``
(the Ansible roles and the KubeRay manifest set it; the local start sets it for its one node). Each
ingress replica asks for one unit, so Ray places exactly N replicas on such a node and none
elsewhere. Nodes come and go, so the head-side process runs an :class:`IngressWatcher` that keeps
``num_replicas`` equal to the cluster's live units and redeploys when that number changes.

A cluster without the resource (tests, a bare ``ray.init``) keeps the single unplaced replica.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from appliance.serve.node import INGRESS_RESOURCE

log = logging.getLogger(__name__)

WATCH_PERIOD_S = 2.0


@dataclass(frozen=True)
class IngressPlacement:
    """How many ingress replicas to run, and what each one asks of its node."""

    units: int  # live ``appliance_ingress`` units in the cluster; 0: the resource is not used

    @property
    def num_replicas(self) -> int:
        return max(self.units, 1)

    @property
    def resources(self) -> dict[str, float]:
        return {INGRESS_RESOURCE: 1.0} if self.units > 0 else {}


def ingress_units(resources: Mapping[str, float] | None = None) -> int:
    """The live ``appliance_ingress`` units of the connected cluster (``ray.cluster_resources``
    counts only nodes that are alive). 0 when Ray is not connected or no node declares it."""
    if resources is None:
        import ray

        if not ray.is_initialized():
            return 0
        resources = ray.cluster_resources()
    return int(resources.get(INGRESS_RESOURCE, 0))


def current_placement() -> IngressPlacement:
    return IngressPlacement(ingress_units())


def deployment_version(args: Mapping[str, Any]) -> str:
    """A version that changes with the application's arguments and nothing else.

    Serve restarts every replica of a deployment whose version changes, and gives each imperative
    deploy a random one. Pinning it to the arguments makes a redeploy that only changes
    ``num_replicas`` a scale-up or scale-down that leaves the serving replicas alone, while a
    changed configuration still rolls every replica."""
    from importlib.metadata import version

    blob = json.dumps({"args": dict(args), "code": version("appliance")}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class IngressWatcher:
    """Polls the cluster's ingress units and calls ``redeploy(placement)`` when they change.

    Runs in the process that deployed the application (``appliance serve``). A failed redeploy is
    logged and retried on the next poll; the replicas already serving are not touched by it."""

    def __init__(
        self,
        redeploy: Callable[[IngressPlacement], None],
        deployed: IngressPlacement,
        units: Callable[[], int] = ingress_units,
        period_s: float = WATCH_PERIOD_S,
    ) -> None:
        self._redeploy = redeploy
        self._units = units
        self._period_s = period_s
        self.deployed = deployed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ingress-watcher", daemon=True)

    def start(self) -> IngressWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._period_s + 30)

    def poll_once(self) -> bool:
        """One look at the cluster; True when it redeployed."""
        units = self._units()
        if units == self.deployed.units or (units == 0 and self.deployed.units > 0):
            # 0 while serving with the resource: every serving node is gone (or Ray is unreachable).
            # Keep the last target: the replicas come back when the nodes do.
            return False
        wanted = IngressPlacement(units)
        log.info("ingress units %d -> %d: redeploying with %d replicas", self.deployed.units, units, units)
        self._redeploy(wanted)
        self.deployed = wanted
        return True

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            try:
                self.poll_once()
            except Exception as exc:  # the GCS restarting, a deploy refused: try again next poll
                log.warning("ingress placement: %s", exc)


@contextmanager
def following_nodes(
    redeploy: Callable[[IngressPlacement], None], deployed: IngressPlacement, enabled: bool = True
) -> Iterator[None]:
    """While the block runs, keep the ingress on every serving node, starting from the placement
    the application was ``deployed`` with (nodes may have joined since; a no-op unless ``enabled``
    and the cluster uses the resource)."""
    if not enabled or deployed.units == 0:
        yield
        return
    watcher = IngressWatcher(redeploy, deployed).start()
    try:
        yield
    finally:
        watcher.stop()
