"""The promotion gate's rule: its settings and the sentence that states them.

The model card states the defaults and :mod:`appliance.loop.gate` applies them; the rule lives
here, beside the card, so that the factory never imports the loop (the loop scores versions with
the factory's evaluation functions).
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.errors import InvalidArgument


@dataclass(frozen=True)
class GateConfig:
    """The gate's rule; the defaults are stated in the model card and ``appliance gate --help``."""

    max_accuracy_drop_points: float = 0.2
    min_coverage_gain_points: float = 0.0
    target_precision: float = 0.99
    alpha: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 < self.target_precision <= 1.0:
            raise InvalidArgument(f"target precision {self.target_precision}: must be in (0, 1]")
        if not 0.0 < self.alpha < 1.0:
            raise InvalidArgument(f"alpha {self.alpha}: must be in (0, 1)")


def describe(config: GateConfig) -> str:
    """The rule in one sentence, as the model card and ``appliance gate --help`` state it."""
    return (
        f"on the golden set, accuracy at most {config.max_accuracy_drop_points:g} points below the "
        "champion's, "
        f"coverage at precision {config.target_precision:g} at least the champion's"
        + (f" {config.min_coverage_gain_points:+g} points" if config.min_coverage_gain_points else "")
        + f", and McNemar's paired test (mid-p < {config.alpha:g}) not finding it worse"
    )
