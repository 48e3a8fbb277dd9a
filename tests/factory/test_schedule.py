"""The fine-tune planner, driven by a fake clock: the plan follows the measured speed and the run
ends near its budget, whatever the load does."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest

from appliance.factory.schedule import Plan, Planner, lr_factor, set_total, warmup_steps

BUDGET_S = 600.0
PER_EPOCH = 100


def base_plan(total: int = 1000, cap: int = 3000) -> Plan:
    return Plan(total=total, warmup=warmup_steps(0.1, total), cap=cap)


def simulate(plan: Plan, seconds_for: Callable[[int], float]) -> tuple[int, float, list[int]]:
    """Run the trainer's loop on a fake clock: (steps done, clock at the end, totals after each re-fit)."""
    rng = np.random.default_rng(7)
    planner = Planner(plan, deadline=BUDGET_S, first_step=0, started=0.0)
    step, now, totals = 0, 0.0, []
    while step < plan.total and not (step > 0 and now >= BUDGET_S):
        now += seconds_for(step) * rng.uniform(0.9, 1.1)  # a little jitter, as on a real box
        step += 1
        if planner.after_step(step, now, epoch_end=step % PER_EPOCH == 0):
            totals.append(plan.total)
    return step, now, totals


def lands_in_budget(step: int, now: float, plan: Plan) -> None:
    assert step == plan.total, "the plan completes before the deadline stops it"
    assert 0.9 * BUDGET_S <= now <= BUDGET_S


def test_slow_then_fast_extends_the_plan() -> None:
    plan = base_plan()
    step, now, totals = simulate(plan, lambda s: 1.0 if s < 300 else 0.2)
    after_slow = totals[0]
    assert after_slow < 1000, "the slow start shrinks the plan below the recipe's"
    assert plan.total > after_slow and plan.total > 1000, "the speed-up grows it again, past the recipe"
    assert plan.replans >= 2
    lands_in_budget(step, now, plan)


def test_fast_then_slow_shrinks_the_plan() -> None:
    plan = base_plan()
    step, now, totals = simulate(plan, lambda s: 0.2 if s < 400 else 1.0)
    peak = max(totals)
    assert peak > 1000, "an idle box grows the plan past the recipe"
    assert plan.total < peak, "the slow-down shrinks it"
    lands_in_budget(step, now, plan)


def test_steady_speed_grows_to_the_cap_and_no_further() -> None:
    plan = base_plan(total=500, cap=800)
    step, now, _ = simulate(plan, lambda s: 0.1)
    assert plan.total == 800 and step == 800
    assert now < 0.5 * BUDGET_S  # the cap, not the budget, ended it


def test_a_fixed_plan_never_changes() -> None:
    plan = base_plan(total=50, cap=50)
    step, _, _ = simulate(plan, lambda s: 0.01)
    assert plan.total == 50 and step == 50 and plan.replans == 0


@pytest.mark.parametrize("at", [40, 300, 550])
@pytest.mark.parametrize("new_total", [600, 2400])
def test_refit_keeps_the_learning_rate_continuous_and_ends_at_zero(at: int, new_total: int) -> None:
    plan = base_plan()
    before = lr_factor(at, plan)
    set_total(plan, at, new_total)
    if at < 100:  # inside the original warm-up: the ramp may only steepen, never pass the peak
        assert before <= lr_factor(at, plan) <= 1.0
    else:
        assert lr_factor(at, plan) == pytest.approx(before)
    factors = [lr_factor(s, plan) for s in range(at, new_total + 1)]
    assert factors[-1] == 0.0
    after_warmup = factors[max(0, plan.warmup - at) :]
    assert all(a >= b for a, b in itertools.pairwise(after_warmup)), "decay is monotone"


def test_checkpointed_plans_round_trip_and_old_ones_load() -> None:
    plan = base_plan()
    set_total(plan, 300, 1500)
    assert Plan.from_dict(plan.to_dict()) == plan
    old = Plan.from_dict({"total": 900, "warmup": 90, "fitted": True})
    assert (old.total, old.cap, old.replans) == (900, 900, 0)
    assert lr_factor(500, old) == pytest.approx((900 - 500) / (900 - 90))
