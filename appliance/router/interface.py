"""What the serving runtime calls on its router (:class:`appliance.router.cascade.Cascade`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from appliance.types import Decision, Policy, SpecialistAnswer

if TYPE_CHECKING:
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

    async def close(self) -> None:
        """Write what is still buffered; called once, at shutdown."""
        ...
