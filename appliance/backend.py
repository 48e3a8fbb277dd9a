"""The interface every API front end depends on.

The ``appliance.v1`` servicers and the KServe v2 servicer call only this protocol, never an
engine directly, so the same bad input gets the same status on both APIs. Methods raise
:class:`appliance.errors.ApplianceError` subclasses for caller mistakes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from appliance.serve.statistics import ModelCounters, ModelKey
from appliance.types import ClassifyOutcome, EmbedOutcome, ExtractOutcome, Limits, ModelDescription, Policy


class Backend(Protocol):
    @property
    def limits(self) -> Limits:
        """Texts per call and bytes per text; a front end that must decode a request's texts
        itself (KServe) checks these first, so an oversized request costs it no decoding."""
        ...

    async def classify(
        self,
        model: str,
        texts: Sequence[str],
        top_k: int = 1,
        policy: Policy | None = None,
        timeout: float | None = None,
        want_probs: bool = False,
        allow_fallback: bool = False,
        request_id: str = "",
        generalist: str = "",
    ) -> ClassifyOutcome:
        """Classify ``texts`` with ``model`` ("NAME" or "NAME:VERSION").

        ``allow_fallback``: when the policy needs the generalist and none is configured, answer
        with the specialist instead of failing with FAILED_PRECONDITION. ``generalist``: the one
        escalations go to ("": the model's setting, else the default).
        """
        ...

    async def extract(
        self,
        model: str,
        texts: Sequence[str],
        requested_slots: Sequence[Sequence[str]] = (),
        policy: Policy | None = None,
        timeout: float | None = None,
        allow_fallback: bool = False,
        request_id: str = "",
        classify_model: str = "",
        top_k: int = 1,
    ) -> ExtractOutcome:
        """Spans found in ``texts`` by the span extractor ``model``.

        ``requested_slots``: empty, or one list per text (the dialogue's requested slots).
        ``classify_model``: also classify the texts with that classifier (one encoder pass per
        text when both share an encoder). Asking a classifier to extract, or an extractor to
        classify, is InvalidArgument naming the model's kind.
        """
        ...

    async def embed(self, model: str, texts: Sequence[str], timeout: float | None = None) -> EmbedOutcome: ...

    def list_models(self) -> list[ModelDescription]: ...

    def statistics_of(self, model: str = "") -> list[tuple[ModelKey, ModelCounters]]:
        """Cumulative inference statistics of the loaded versions of ``model`` ("" for every model,
        "NAME" for each loaded version, "NAME:VERSION" for one); NotFound when none is loaded."""
        ...

    def describe(self, model: str) -> ModelDescription:
        """Raises NotFound for an unknown or unloaded model."""
        ...

    async def load_model(self, model: str) -> tuple[ModelDescription, int]:
        """Load or hot-swap; returns the new description and the previous version (0 if none)."""
        ...

    async def unload_model(self, model: str) -> int: ...

    def is_ready(self, model: str | None = None) -> bool:
        """True when the named model (or, with None, every configured model) is warm."""
        ...

    async def close(self) -> None:
        """Stop taking work and finish what is queued; called once, when the server stops."""
        ...
