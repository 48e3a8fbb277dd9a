"""The generalist's contract: what the router and the Generate API may call on it.

Three things implement :class:`Generalist`: the in-process vLLM engine
(``appliance.engines.generalist.GeneralistEngine``), the client of its Ray Serve deployment
(``appliance.serve.generalist.GeneralistClient``) and the tests' stand-ins. Callers depend on
this protocol only, so they never probe for attributes.

Every method raises :class:`appliance.errors.ApplianceError` subclasses: ``InvalidArgument`` for
a request the generalist cannot take, ``ResourceExhausted`` when it is saturated,
``Unavailable`` when it is down.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from appliance.types import Cost

DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class GenerationChunk:
    """One streamed piece of a generation; the last one has ``finished=True`` and the usage."""

    text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS or a stop string) | "length" | "abort"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_seconds: float = 0.0  # wall time from submission to the last token
    cost: Cost | None = None  # on the last chunk, when the generalist is priced (served, not in-process)


@dataclass(frozen=True)
class Demonstration:
    """A labelled example shown to the generalist before the text it classifies."""

    text: str
    label: str


@dataclass(frozen=True)
class ZeroShotResult:
    """A label chosen by the generalist.

    ``confidence`` is exp(sum of the generated tokens' log-probabilities), the end-of-sequence
    token included. vLLM applies the structured-output mask before it computes log-probabilities,
    so each term is conditioned on "the output is still a prefix of some label": the confidence
    is the probability of this exact token path under the label-constrained distribution. It is
    in (0, 1], and a lower bound on the label's probability when a label can be spelled by
    several token paths.
    """

    label: str
    confidence: float
    prompt_tokens: int
    completion_tokens: int
    engine_seconds: float


@dataclass(frozen=True)
class SpanClaim:
    """A field as the generalist states it: a slot and the words it copied from the text.

    It names no offsets: a language model copies words well and counts characters badly, so the
    router finds the words in the text itself (:func:`appliance.router.span_cascade.place_claims`)
    and drops any claim that is not there.
    """

    label: str
    text: str


@dataclass(frozen=True)
class SpanAnswer:
    """The fields the generalist found in one text.

    ``confidence`` is the probability of the whole answer under the schema-constrained
    distribution (as :class:`ZeroShotResult`'s, over every generated token); each of its spans
    carries it.
    """

    spans: list[SpanClaim]
    confidence: float
    prompt_tokens: int
    completion_tokens: int
    engine_seconds: float


@dataclass(frozen=True)
class Placement:
    """What the generalist's engine holds while it works, so that its time can be priced."""

    accelerator: bool = False  # on GPUs (accelerator-seconds), else on CPU cores (core-seconds)
    units: int | None = None  # GPUs or cores it holds; None: all that the box's cost model counts


class Generalist(Protocol):
    """A local LLM that classifies under a label constraint, extracts fields under a JSON schema and
    streams generations."""

    @property
    def ready(self) -> bool:
        """True when it can take requests now (cheap: read by health checks)."""
        ...

    @property
    def placement(self) -> Placement: ...

    async def check_health(self) -> None:
        """Raise ``Unavailable`` unless the engine is up."""
        ...

    async def check_label_set(
        self, labels: Sequence[str], descriptions: Mapping[str, str] | None = None
    ) -> None:
        """Raise ``InvalidArgument`` when zero-shot classification over ``labels`` cannot work
        (for instance, the prompt for this many labels does not fit the window)."""
        ...

    async def classify(
        self,
        text: str,
        labels: Sequence[str],
        descriptions: Mapping[str, str] | None = None,
        request_id: str | None = None,
        demonstrations: Sequence[Demonstration] = (),
    ) -> ZeroShotResult:
        """Exactly one of ``labels`` for ``text``; ``demonstrations`` (labelled examples) go in the
        prompt before it."""
        ...

    async def extract(
        self,
        text: str,
        labels: Sequence[str],
        descriptions: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> SpanAnswer:
        """The fields of ``text`` whose slot is one of ``labels`` (output constrained by a JSON
        schema that names them)."""
        ...

    def generate(
        self,
        prompt: str | None = None,
        messages: Sequence[Mapping[str, str]] | None = None,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        """Stream a completion of ``prompt`` or of chat ``messages`` (exactly one of them).

        ``max_tokens`` None means :data:`DEFAULT_MAX_TOKENS`.
        """
        ...
