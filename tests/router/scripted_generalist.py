"""A deterministic in-process stand-in for the generalist, for unit tests of routing logic only.

It is not a language model: it answers from a script (text -> label), with fixed confidence,
token counts and engine time, so that routing, cost and record-keeping can be checked exactly.
The real vLLM engine behind the same interface is tested in tests/generalist, and with the
cascade in test_router_with_vllm.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from appliance.errors import ApplianceError, InvalidArgument


@dataclass(frozen=True)
class ScriptedAnswer:
    label: str
    confidence: float
    prompt_tokens: int
    completion_tokens: int
    engine_seconds: float


@dataclass
class ScriptedGeneralist:
    """Answers ``script[text]`` (else the last label); raises ``fail_with`` for texts in ``failing``."""

    script: dict[str, str] = field(default_factory=dict)
    confidence: float = 0.75
    engine_seconds: float = 0.5
    completion_tokens: int = 2
    max_labels: int = 100
    fail_with: ApplianceError | None = None
    failing: set[str] = field(default_factory=set)
    accelerator: bool = False
    units: int | None = None
    calls: list[str] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0

    @staticmethod
    def prompt_tokens(text: str) -> int:
        return 10 + len(text.split())

    async def classify(
        self, text: str, labels: Sequence[str], descriptions: Mapping[str, str] | None
    ) -> ScriptedAnswer:
        self.calls.append(text)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            # Yield a few times, as a real call would, so that concurrent calls overlap.
            for _ in range(3):
                await asyncio.sleep(0)
            if text in self.failing and self.fail_with is not None:
                raise self.fail_with
            return ScriptedAnswer(
                label=self.script.get(text, labels[-1]),
                confidence=self.confidence,
                prompt_tokens=self.prompt_tokens(text),
                completion_tokens=self.completion_tokens,
                engine_seconds=self.engine_seconds,
            )
        finally:
            self.in_flight -= 1

    def check_label_set(self, labels: Sequence[str], descriptions: Mapping[str, str] | None) -> None:
        if len(labels) > self.max_labels:
            raise InvalidArgument(f"{len(labels)} labels do not fit; at most {self.max_labels}")
