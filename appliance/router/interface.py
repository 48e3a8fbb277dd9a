"""What the serving runtime calls on its router (:class:`appliance.router.cascade.Cascade`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from appliance.types import Decision, Extraction, Policy, SpecialistAnswer

if TYPE_CHECKING:
    from appliance.engines.extractor import Extractor
    from appliance.engines.specialist import Specialist


class Router(Protocol):
    async def check_model(self, model: Specialist) -> None:
        """At load: raise ``FailedPrecondition`` when this model cannot be served as configured."""
        ...

    async def decide(
        self,
        model: Specialist,
        answers: Sequence[SpecialistAnswer],
        policy: Policy | str | None,
        allow_fallback: bool = False,
        request_id: str = "",
        texts: Sequence[str] = (),
        generalist: str | None = None,
    ) -> list[Decision]:
        """One decision per text, in order, from the specialist's answers; ``generalist`` names the
        one escalations go to (None: the model's setting, else the default)."""
        ...

    async def decide_spans(
        self,
        model: Extractor,
        extractions: Sequence[Extraction],
        policy: Policy | str | None,
        allow_fallback: bool = False,
        request_id: str = "",
        texts: Sequence[str] = (),
    ) -> list[Extraction]:
        """One extraction per text, in order, from the extractor's (its spans on the specialist's
        route, costs not yet priced)."""
        ...

    async def close(self) -> None:
        """Write what is still buffered; called once, at shutdown."""
        ...
