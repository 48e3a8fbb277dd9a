"""Plain data types shared by the engines, the router and every API front end.

The gRPC servicers (``appliance.v1`` and KServe v2) translate these to and from protobuf; nothing
below the API layer imports generated code.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np


class Policy(enum.Enum):
    SPECIALIST_ONLY = "specialist_only"
    CASCADE = "cascade"
    GENERALIST_ONLY = "generalist_only"


class Route(enum.Enum):
    SPECIALIST = "specialist"
    GENERALIST = "generalist"


@dataclass(frozen=True)
class Cost:
    core_seconds: float = 0.0
    accelerator_seconds: float = 0.0
    price: float = 0.0
    currency: str = "USD"


@dataclass(frozen=True)
class SpecialistAnswer:
    """The specialist's view of one text, before routing."""

    top: list[tuple[str, float]]  # best first
    probs: np.ndarray | None  # the full distribution, in label order, when asked for
    truncated: bool
    core_seconds: float  # this text's share of its batch's core time
    latency_ms: float
    # The model's out-of-scope label when the top probability is below its rejection threshold:
    # the answer is that label, from the specialist, never escalated.
    rejected_as: str | None = None


@dataclass(frozen=True)
class Decision:
    """One text's answer."""

    label: str
    confidence: float
    top: list[tuple[str, float]]  # the specialist's top-k, best first
    truncated: bool
    route: Route
    latency_ms: float
    cost: Cost
    probs: np.ndarray | None = None  # the specialist's full distribution, in label order
    escalation_id: str = ""
    fallback: bool = False  # the policy needed the generalist, none was configured, the specialist answered


@dataclass(frozen=True)
class ClassifyOutcome:
    model: str
    version: int
    precision: str  # "int8" | "fp32"
    labels: list[str]
    decisions: list[Decision]


@dataclass(frozen=True)
class ExtractedSpan:
    """One field found in a text. Offsets are characters (code points) of the text as sent, end
    exclusive, so ``text == source[start:end]``."""

    label: str
    start: int
    end: int
    text: str
    confidence: float
    route: Route = Route.SPECIALIST


@dataclass(frozen=True)
class Extraction:
    """One text's spans."""

    spans: list[ExtractedSpan]  # in text order
    truncated: bool
    latency_ms: float
    cost: Cost
    escalation_id: str = ""
    fallback: bool = False
    # Spans the generalist claimed that are not in the text as sent: dropped, never answered.
    dropped_generalist_spans: int = 0


@dataclass(frozen=True)
class ExtractOutcome:
    model: str
    version: int
    precision: str
    labels: list[str]  # the extractor's slot names
    extractions: list[Extraction]
    classified: ClassifyOutcome | None = None  # when the call also named a classifier


@dataclass(frozen=True)
class EmbedOutcome:
    model: str
    version: int
    vectors: np.ndarray  # [n, dim] float32, L2-normalised
    truncated: list[bool]


@dataclass(frozen=True)
class Limits:
    max_texts_per_call: int = 256
    max_text_bytes: int = 64 * 1024
    max_input_tokens: int = 256


@dataclass(frozen=True)
class ModelDescription:
    name: str
    version: int
    kind: str  # "classifier" | "span_extractor"
    labels: list[str]
    metrics: dict[str, float]
    threshold: float
    coverage_at_threshold: float
    precision_at_threshold: float
    precision: str
    limits: Limits
    default_policy: Policy
    encoder_id: str
    created_at: str
    loaded: bool
    available_versions: list[int] = field(default_factory=list)
