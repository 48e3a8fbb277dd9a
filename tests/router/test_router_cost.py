"""Cost arithmetic: unit prices, pricing, and the split of a batch's time over its texts."""

from __future__ import annotations

import math

import pytest

from appliance.engines.generalist_api import Placement
from appliance.errors import InvalidArgument
from appliance.router.cost import CostModel, price_generalist, share


def test_a_cpu_box_splits_its_hourly_price_evenly_over_its_cores() -> None:
    model = CostModel(price_per_hour=3.6, cores=4)
    # 3.6 per hour = 0.001 per second for the box, 0.00025 per core-second.
    assert model.price_per_core_second == pytest.approx(0.00025)
    cost = model.price(core_seconds=8.0)
    assert cost.price == pytest.approx(0.002)
    assert (cost.core_seconds, cost.accelerator_seconds, cost.currency) == (8.0, 0.0, "USD")


def test_four_cores_busy_for_an_hour_cost_the_box_price_for_an_hour() -> None:
    model = CostModel(price_per_hour=2.0, cores=4)
    assert model.price(core_seconds=4 * 3600.0).price == pytest.approx(2.0)


def test_a_gpu_box_charges_the_accelerators_and_lets_cores_ride_free_by_default() -> None:
    model = CostModel(price_per_hour=7.2, cores=32, accelerators=2)
    assert model.price_per_core_second == 0.0
    assert model.price_per_accelerator_second == pytest.approx(0.001)
    cost = model.price(core_seconds=100.0, accelerator_seconds=3.0)
    assert cost.price == pytest.approx(0.003)


def test_generalist_time_is_charged_for_every_unit_the_engine_holds() -> None:
    cpu_box = CostModel(price_per_hour=3.6, cores=4)
    # On CPU the engine holds all the cores: 2 s of engine time are 8 core-seconds.
    cost = price_generalist(cpu_box, Placement(), engine_seconds=2.0, core_seconds=0.5)
    assert (cost.core_seconds, cost.accelerator_seconds) == (8.5, 0.0)
    assert cost.price == pytest.approx(8.5 * 0.00025)
    gpu_box = CostModel(price_per_hour=7.2, cores=32, accelerators=4)
    # A two-GPU tensor-parallel engine on a four-GPU box: 3 s are 6 accelerator-seconds.
    cost = price_generalist(gpu_box, Placement(accelerator=True, units=2), 3.0, core_seconds=1.0)
    assert (cost.core_seconds, cost.accelerator_seconds) == (1.0, 6.0)
    assert cost.price == pytest.approx(6.0 * 7.2 / 3600 / 4)
    # Without units, every accelerator the cost model counts.
    assert price_generalist(gpu_box, Placement(accelerator=True), 1.0).accelerator_seconds == 4.0
    with pytest.raises(InvalidArgument, match="counts none"):
        price_generalist(cpu_box, Placement(accelerator=True), 1.0)


def test_a_cpu_share_moves_that_fraction_of_the_price_to_the_cores() -> None:
    model = CostModel(price_per_hour=3.6, cores=10, accelerators=1, cpu_share=0.25)
    assert model.price_per_core_second == pytest.approx(3.6 * 0.25 / 3600 / 10)
    assert model.price_per_accelerator_second == pytest.approx(3.6 * 0.75 / 3600)
    # The whole box for one hour: 10 cores and 1 accelerator, each busy 3600 s.
    assert model.price(10 * 3600.0, 3600.0).price == pytest.approx(3.6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"price_per_hour": -1.0},
        {"price_per_hour": math.nan},
        {"cores": 0},
        {"accelerators": -1},
        {"accelerators": 1, "cpu_share": 1.5},
        {"cpu_share": 0.5},  # a CPU box: the cores carry the whole price
        {"currency": " "},
    ],
)
def test_bad_cost_settings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        CostModel(**kwargs)  # type: ignore[arg-type]


def test_accelerator_time_on_a_box_without_accelerators_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="no accelerators"):
        CostModel(cores=2).price(1.0, accelerator_seconds=1.0)
    with pytest.raises(InvalidArgument, match="negative"):
        CostModel(cores=2).price(-1.0)


def test_shares_follow_token_counts_and_add_up_to_the_measured_total() -> None:
    wall, threads, tokens = 0.137, 2, [5, 15, 30, 1, 49]
    parts = share(wall, threads, tokens)
    assert math.fsum(parts) == pytest.approx(wall * threads, rel=1e-12)
    for part, t in zip(parts, tokens, strict=True):
        assert part == pytest.approx(wall * threads * t / sum(tokens), rel=1e-9)


def test_a_batch_of_empty_texts_is_split_evenly_and_an_empty_batch_costs_nothing() -> None:
    assert share(1.0, 4, [0, 0]) == [2.0, 2.0]
    assert share(1.0, 4, []) == []


@pytest.mark.parametrize(("wall", "threads", "tokens"), [(-1.0, 1, [1]), (1.0, 0, [1]), (1.0, 1, [-1])])
def test_impossible_measurements_are_refused(wall: float, threads: int, tokens: list[int]) -> None:
    with pytest.raises(InvalidArgument):
        share(wall, threads, tokens)
