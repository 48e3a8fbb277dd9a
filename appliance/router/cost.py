"""What a decision cost: measured compute time, priced at the box's hourly rate.

The unit of work is the *core-second* (one CPU core busy for one second) or the
*accelerator-second* (one GPU busy for one second). Each route measures its own:

- the specialist: a batch that ran ``wall`` seconds on ``threads`` intra-op threads held
  ``wall * threads`` core-seconds; each text is charged its share by token count (:func:`share`);
- the generalist: the engine seconds a request kept it busy, times the units the engine holds
  (its cores on a CPU box, its GPUs on a GPU box); :func:`price_generalist` is the one place
  that prices them, for escalated texts (see the cascade) and for generations alike.

Pricing splits the box's hourly price evenly over the units that do the work:

- a CPU box (``accelerators=0``): over its cores, so a core-second costs
  ``price_per_hour / 3600 / cores``;
- a GPU box: over its accelerators. Core-seconds there ride free by default (``cpu_share=0``):
  the accelerators dominate the price of such a box, and the specialist's CPU work uses cores that
  the GPU work leaves idle. Set ``cpu_share`` (0..1) to charge that fraction of the hourly price
  to the cores instead, split evenly over them; the rest goes to the accelerators.

The default price, 2.0 USD per hour, is a round placeholder of the order of an on-demand
mid-size server; set the box's real amortised cost (hardware, power, hosting) in its config.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from appliance.engines.generalist_api import Placement
from appliance.errors import InvalidArgument
from appliance.types import Cost

DEFAULT_PRICE_PER_HOUR = 2.0
DEFAULT_CURRENCY = "USD"
SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class CostModel:
    price_per_hour: float = DEFAULT_PRICE_PER_HOUR
    currency: str = DEFAULT_CURRENCY
    cores: int = os.cpu_count() or 1
    accelerators: int = 0
    # Fraction of the hourly price charged to CPU cores on a GPU box; None means 0 there.
    # On a CPU box the cores carry the whole price, whatever this says.
    cpu_share: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.price_per_hour) and self.price_per_hour >= 0):
            raise InvalidArgument(f"price_per_hour must be a finite number >= 0, got {self.price_per_hour}")
        if not self.currency or not self.currency.strip():
            raise InvalidArgument("currency must be a non-empty code such as USD")
        if self.cores < 1:
            raise InvalidArgument(f"cores must be at least 1, got {self.cores}")
        if self.accelerators < 0:
            raise InvalidArgument(f"accelerators must be 0 or more, got {self.accelerators}")
        if self.cpu_share is not None and not 0.0 <= self.cpu_share <= 1.0:
            raise InvalidArgument(f"cpu_share must lie in [0, 1], got {self.cpu_share}")
        if self.accelerators == 0 and self.cpu_share not in (None, 1.0):
            raise InvalidArgument(
                "cpu_share applies only to a box with accelerators; a CPU box's cores carry all"
            )

    @property
    def effective_cpu_share(self) -> float:
        if self.accelerators == 0:
            return 1.0
        return 0.0 if self.cpu_share is None else self.cpu_share

    @property
    def price_per_core_second(self) -> float:
        return self.price_per_hour * self.effective_cpu_share / SECONDS_PER_HOUR / self.cores

    @property
    def price_per_accelerator_second(self) -> float:
        if self.accelerators == 0:
            return 0.0
        return self.price_per_hour * (1.0 - self.effective_cpu_share) / SECONDS_PER_HOUR / self.accelerators

    def price(self, core_seconds: float, accelerator_seconds: float = 0.0) -> Cost:
        if core_seconds < 0 or accelerator_seconds < 0:
            raise InvalidArgument(
                f"compute time cannot be negative: {core_seconds} core-s, {accelerator_seconds} accelerator-s"
            )
        if accelerator_seconds > 0 and self.accelerators == 0:
            raise InvalidArgument("accelerator-seconds were measured, but the cost model has no accelerators")
        amount = (
            core_seconds * self.price_per_core_second
            + accelerator_seconds * self.price_per_accelerator_second
        )
        return Cost(
            core_seconds=core_seconds,
            accelerator_seconds=accelerator_seconds,
            price=amount,
            currency=self.currency,
        )


def generalist_units(cost: CostModel, placement: Placement) -> int:
    """The cores or accelerators the generalist's engine holds, as the cost model counts them."""
    if placement.accelerator and cost.accelerators == 0:
        raise InvalidArgument("the generalist runs on an accelerator, but the cost model counts none")
    if placement.units is not None:
        if placement.units < 1:
            raise InvalidArgument(f"the generalist must hold at least one unit, got {placement.units}")
        return placement.units
    return cost.accelerators if placement.accelerator else cost.cores


def price_generalist(
    cost: CostModel, placement: Placement, engine_seconds: float, core_seconds: float = 0.0
) -> Cost:
    """The price of ``engine_seconds`` of the generalist's time, every unit it holds charged.

    ``core_seconds`` is other CPU work spent on the same answer (the specialist's, for a text the
    cascade escalated): both were spent, so both are charged.
    """
    busy = engine_seconds * generalist_units(cost, placement)
    if placement.accelerator:
        return cost.price(core_seconds, busy)
    return cost.price(core_seconds + busy, 0.0)


def share(wall_seconds: float, threads: int, tokens_per_text: Sequence[int]) -> list[float]:
    """Split a batch's ``wall_seconds * threads`` unit-seconds over its texts, by token count.

    The parts add up to the total (the last part takes the rounding remainder). A batch whose
    texts all have zero tokens is split evenly.
    """
    if wall_seconds < 0 or not math.isfinite(wall_seconds):
        raise InvalidArgument(f"wall_seconds must be a finite number >= 0, got {wall_seconds}")
    if threads < 1:
        raise InvalidArgument(f"threads must be at least 1, got {threads}")
    if any(t < 0 for t in tokens_per_text):
        raise InvalidArgument("token counts cannot be negative")
    n = len(tokens_per_text)
    if n == 0:
        return []
    total = wall_seconds * threads
    tokens = sum(tokens_per_text)
    weights = [t / tokens for t in tokens_per_text] if tokens else [1.0 / n] * n
    parts = [total * w for w in weights[:-1]]
    parts.append(max(0.0, total - math.fsum(parts)))
    return parts


def engine_shares(
    spans: Sequence[tuple[float, float]], engine_seconds: Sequence[float], tokens: Sequence[int]
) -> list[float]:
    """Each of one call's concurrent generalist requests' part of the engine's time.

    The engine batches them, so together they cost the span from the first start to the last end
    (``spans``: (start, end) per request), capped at the sum of the engine's own per-request
    times; that is split by tokens.
    """
    if not spans:
        return []
    wall = max(end for _, end in spans) - min(start for start, _ in spans)
    busy = min(wall, sum(max(0.0, s) for s in engine_seconds))
    return share(max(0.0, busy), 1, tokens)
