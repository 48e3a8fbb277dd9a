"""The ingress placement: replicas follow the cluster's ``appliance_ingress`` units."""

from __future__ import annotations

from appliance.serve.app import build_app
from appliance.serve.placement import IngressPlacement, IngressWatcher, deployment_version, ingress_units


def test_units_come_from_the_resource() -> None:
    assert ingress_units({"CPU": 4.0, "appliance_ingress": 3.0}) == 3
    assert ingress_units({"CPU": 4.0}) == 0
    assert IngressPlacement(0).resources == {} and IngressPlacement(0).num_replicas == 1
    assert IngressPlacement(3).resources == {"appliance_ingress": 1.0}
    assert IngressPlacement(3).num_replicas == 3


def test_the_app_asks_one_unit_per_replica_with_a_version_that_ignores_the_count() -> None:
    three = build_app({"models": ["m"]}, IngressPlacement(3)).__dict__["_bound_deployment"]
    two = build_app({"models": ["m"]}, IngressPlacement(2)).__dict__["_bound_deployment"]
    other = build_app({"models": ["n"]}, IngressPlacement(2)).__dict__["_bound_deployment"]
    assert three.num_replicas == 3 and two.num_replicas == 2
    assert three.ray_actor_options["resources"] == {"appliance_ingress": 1.0}
    assert three.version == two.version != other.version  # scaling restarts nothing; new args roll
    unplaced = build_app({"models": ["m"]}, IngressPlacement(0)).__dict__["_bound_deployment"]
    assert unplaced.num_replicas == 1 and not unplaced.ray_actor_options.get("resources")
    assert deployment_version({"a": 1}) != deployment_version({"a": 2})


def test_the_watcher_redeploys_only_on_a_change_and_keeps_the_target_when_all_nodes_go() -> None:
    seen: list[int] = []
    units = iter([3, 3, 2, 0, 3])
    watcher = IngressWatcher(lambda p: seen.append(p.num_replicas), IngressPlacement(3), lambda: next(units))
    assert [watcher.poll_once() for _ in range(5)] == [False, False, True, False, True]
    assert seen == [2, 3] and watcher.deployed.units == 3
