"""Several generalists, by name: which one a model's escalations go to, and what its time costs.

An appliance may serve several local LLMs (``appliance serve --generalist NAME=PATH``, repeated,
or the Serve config's ``generalists:`` list), each its own vLLM deployment with its own replicas
and price. The cascade does not care what each one is, only what it costs and how well it does.

Which generalist a text escalates to, first match wins:

1. the request names one (``ClassifyRequest.generalist``); an unknown name is INVALID_ARGUMENT;
2. the model's escalation setting names one (the Serve config's ``escalation:`` section);
3. the one named ``default`` (what the single ``generalist:`` form, or a bare path, becomes);
4. the first one configured.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from appliance.engines.generalist_api import Generalist
from appliance.engines.generalist_args import DEFAULT_NAME, NAME_PATTERN
from appliance.errors import InvalidArgument
from appliance.router.cost import CostModel, generalist_units

DEFAULT_GENERALIST = DEFAULT_NAME
_NAME = re.compile(NAME_PATTERN)
MAX_DEMONSTRATIONS = 32


def check_generalist_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"generalist name {name!r} must be 1-32 characters of a-z, 0-9, '_' or '-', starting with a "
            "letter or digit"
        )
    return name


@dataclass(frozen=True)
class ModelEscalation:
    """A model's cascade settings: the generalist it escalates to and the demonstrations it sends.

    ``demonstrations`` is k: the k nearest labelled examples of the specialist's own training set
    (its demonstration index, :mod:`appliance.router.retrieval`) added to the generalist's prompt.
    0 leaves the prompt as it is.
    """

    generalist: str | None = None
    demonstrations: int = 0

    def __post_init__(self) -> None:
        if self.generalist is not None:
            check_generalist_name(self.generalist)
        if not 0 <= self.demonstrations <= MAX_DEMONSTRATIONS:
            raise InvalidArgument(
                f"demonstrations must lie in [0, {MAX_DEMONSTRATIONS}], got {self.demonstrations}"
            )


@dataclass(frozen=True)
class PricedGeneralist:
    name: str
    generalist: Generalist
    cost: CostModel  # how its engine time is priced (its own price per hour, or the box's)


class GeneralistPool:
    """The configured generalists by name (an empty pool: no generalist on this appliance)."""

    def __init__(self, members: Mapping[str, Generalist], costs: Mapping[str, CostModel], box: CostModel):
        self._members: dict[str, PricedGeneralist] = {}
        for name, generalist in members.items():
            check_generalist_name(name)
            cost = costs.get(name, box)
            generalist_units(cost, generalist.placement)  # a placement its cost model cannot price fails now
            self._members[name] = PricedGeneralist(name, generalist, cost)

    @classmethod
    def of(
        cls,
        generalist: Generalist | Mapping[str, Generalist] | None,
        box: CostModel,
        costs: Mapping[str, CostModel] | None = None,
    ) -> GeneralistPool:
        """A pool from one generalist (named ``default``), a mapping of them, or None (empty)."""
        if generalist is None:
            members: Mapping[str, Generalist] = {}
        elif isinstance(generalist, Mapping):
            members = generalist
        else:
            members = {DEFAULT_GENERALIST: generalist}
        return cls(members, costs or {}, box)

    def __bool__(self) -> bool:
        return bool(self._members)

    @property
    def names(self) -> list[str]:
        return list(self._members)

    @property
    def default_name(self) -> str | None:
        if DEFAULT_GENERALIST in self._members:
            return DEFAULT_GENERALIST
        return next(iter(self._members), None)

    def members(self) -> list[PricedGeneralist]:
        return list(self._members.values())

    def choose(self, requested: str | None, setting: ModelEscalation | None) -> PricedGeneralist | None:
        """The generalist for a request (see the module docstring); None when the pool is empty.

        A requested name that is not configured is InvalidArgument; a model setting that names an
        absent one is too (the configuration is checked at start, so this is a stale setting).
        """
        if not self._members:
            return None  # the caller reports "no generalist is configured", or falls back
        for name, source in (
            (requested or None, "the request"),
            (setting and setting.generalist, "the model"),
        ):
            if name:
                got = self._members.get(name)
                if got is None:
                    known = ", ".join(self._members) or "none"
                    raise InvalidArgument(
                        f"{source} names generalist {name!r}, which is not configured; known: {known}"
                    )
                return got
        default = self.default_name
        return None if default is None else self._members[default]
