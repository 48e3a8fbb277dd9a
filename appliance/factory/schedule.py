"""The fine-tune's learning-rate schedule and the planner that keeps it inside the time budget.

The schedule is a linear warm-up followed by a linear decay to zero at ``Plan.total``. The planner
re-measures the speed over a recent window of steps (evaluations and checkpoints included, since
they cost wall time too) every ``REPLAN_EVERY`` steps and at each epoch end, and re-fits the
remaining steps so the run ends near its deadline: fewer when the box slows down, more (up to
``Plan.cap``) when it speeds up or the base plan is short of the budget. A re-fit keeps the learning
rate continuous: the decay restarts from the current factor towards zero at the new end.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, fields

# Steps timed before the first fit (the start is slower: allocator and thread-pool warm-up).
CALIBRATION_STEPS = 8
REPLAN_EVERY = 200
# Steps the speed is measured over: recent enough to follow a change of load.
SPEED_WINDOW = 200
# Fraction of the remaining time planned for steps; the rest covers the final evaluation and save.
TIME_SHARE = 0.95
# A re-fit smaller than this fraction of the remaining steps is noise: keep the plan.
MIN_CHANGE = 0.02
# Steps an epoch-end re-fit waits after the last one (tiny epochs would re-fit on every few steps).
MIN_REFIT_GAP = 25


@dataclass
class Plan:
    """Step counts of the schedule; mutable because the planner re-fits it during the run."""

    total: int
    warmup: int
    cap: int  # the most steps the plan may grow to
    decay_from: int = -1  # step the current linear decay starts at (-1: the end of warm-up)
    decay_factor: float = 1.0  # learning-rate factor at ``decay_from``
    fitted: bool = False  # fitted to the budget at least once
    replans: int = 0  # re-fits that changed the total

    def to_dict(self) -> dict[str, int | float | bool]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, int | float | bool]) -> Plan:
        """Fields a checkpoint lacks (older formats) keep their defaults; ``cap`` defaults to ``total``."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("cap", values["total"])
        return cls(**values)  # type: ignore[arg-type]


def warmup_steps(warmup_fraction: float, total: int) -> int:
    return max(1, round(warmup_fraction * total))


def lr_factor(step: int, plan: Plan) -> float:
    """Linear warm-up to the peak, then linear decay to zero at ``plan.total``."""
    if step < plan.warmup:
        return (step + 1) / plan.warmup
    start = plan.warmup if plan.decay_from < 0 else plan.decay_from
    return max(0.0, plan.decay_factor * (plan.total - step) / max(1, plan.total - start))


def set_total(plan: Plan, step: int, total: int) -> None:
    """Move the end of the plan to ``total`` with the learning rate continuous at ``step``
    after warm-up; a shrink during warm-up shortens the warm-up in proportion (a steeper ramp)."""
    if step < plan.warmup and total < plan.total:
        plan.warmup = max(step + 1, round(plan.warmup * total / plan.total))
    if step >= plan.warmup:
        plan.decay_factor, plan.decay_from = lr_factor(step, plan), step
    else:  # still warming up: the decay will start from the peak at the end of warm-up
        plan.decay_factor, plan.decay_from = 1.0, -1
    plan.total = total


class Planner:
    """Fits ``plan`` to ``deadline`` from the step times it is shown (any monotonic clock)."""

    def __init__(self, plan: Plan, deadline: float, first_step: int, started: float) -> None:
        self.plan, self.deadline, self.first_step = plan, deadline, first_step
        self.times: deque[tuple[int, float]] = deque([(first_step, started)], maxlen=SPEED_WINDOW + 1)
        self.last_fit = first_step
        self.seconds_per_step = float("nan")

    def after_step(self, step: int, now: float, epoch_end: bool) -> str | None:
        """Record that ``step`` steps are done at ``now``; re-fit when due. Returns a message when
        the plan changed."""
        self.times.append((step, now))
        old_step, old_time = self.times[0]
        if step > old_step:
            self.seconds_per_step = (now - old_time) / (step - old_step)
        done = step - self.first_step
        since = step - self.last_fit
        due = done >= CALIBRATION_STEPS and (
            not self.plan.fitted or (epoch_end and since >= MIN_REFIT_GAP) or since >= REPLAN_EVERY
        )
        return self.refit(step, now) if due and step < self.plan.total else None

    def refit(self, step: int, now: float) -> str | None:
        plan, rate = self.plan, self.seconds_per_step
        plan.fitted, self.last_fit = True, step
        affordable = step + int(TIME_SHARE * max(0.0, self.deadline - now) / max(rate, 1e-9))
        target = max(step + 1, min(plan.cap, affordable))
        if target == plan.total or abs(target - plan.total) < MIN_CHANGE * max(1, plan.total - step):
            return None
        old = plan.total
        set_total(plan, step, target)
        plan.replans += 1
        return f"at {rate:.2f} s/step the budget holds about {target} steps (was {old}): schedule re-fitted"

    def projected_end(self, step: int, now: float) -> float:
        """When the plan's last step should land, at the recent speed (clock of ``now``)."""
        rate = self.seconds_per_step
        return now + max(0, self.plan.total - step) * (rate if rate == rate else 0.0)
