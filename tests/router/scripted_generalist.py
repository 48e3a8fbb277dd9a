"""A deterministic in-process stand-in for the generalist, for unit tests of routing logic only.

It is not a language model: it answers from a script (text -> label), with fixed confidence,
token counts and engine time, so that routing, cost and record-keeping can be checked exactly.
It implements :class:`appliance.engines.generalist_api.Generalist`; the real vLLM engine behind
the same interface is tested in tests/generalist, and with the cascade in test_router_with_vllm.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

from appliance.engines.generalist_api import (
    DEFAULT_MAX_TOKENS,
    Demonstration,
    Generalist,
    GenerationChunk,
    Placement,
    ZeroShotResult,
)
from appliance.errors import ApplianceError, InvalidArgument


@dataclass
class ScriptedGeneralist(Generalist):
    """Answers ``script[text]`` (else the last label); raises ``fail_with`` for texts in ``failing``.

    ``check_error``, when set, is what the label-set check raises for any label set. ``gate``, when
    set, holds every answer until the test sets it, so that calls stay waiting for the generalist.
    """

    script: dict[str, str] = field(default_factory=dict)
    confidence: float = 0.75
    engine_seconds: float = 0.5
    completion_tokens: int = 2
    max_labels: int = 100
    fail_with: ApplianceError | None = None
    failing: set[str] = field(default_factory=set)
    check_error: ApplianceError | None = None
    accelerator: bool = False
    units: int | None = None
    calls: list[str] = field(default_factory=list)
    checked: list[tuple[list[str], dict[str, str]]] = field(default_factory=list)
    shown: dict[str, list[Demonstration]] = field(default_factory=dict)  # demonstrations per text
    in_flight: int = 0
    most_in_flight: int = 0
    gate: asyncio.Event | None = None

    @property
    def ready(self) -> bool:
        return True

    @property
    def placement(self) -> Placement:
        return Placement(accelerator=self.accelerator, units=self.units)

    @staticmethod
    def prompt_tokens(text: str) -> int:
        return 10 + len(text.split())

    async def check_health(self) -> None:
        return None

    async def check_label_set(
        self, labels: Sequence[str], descriptions: Mapping[str, str] | None = None
    ) -> None:
        self.checked.append((list(labels), dict(descriptions or {})))
        if self.check_error is not None:
            raise self.check_error
        if len(labels) > self.max_labels:
            raise InvalidArgument(f"{len(labels)} labels do not fit; at most {self.max_labels}")

    async def classify(
        self,
        text: str,
        labels: Sequence[str],
        descriptions: Mapping[str, str] | None = None,
        request_id: str | None = None,
        demonstrations: Sequence[Demonstration] = (),
    ) -> ZeroShotResult:
        self.calls.append(text)
        self.shown[text] = list(demonstrations)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            # Yield a few times, as a real call would, so that concurrent calls overlap.
            for _ in range(3):
                await asyncio.sleep(0)
            if self.gate is not None:
                await self.gate.wait()
            if text in self.failing and self.fail_with is not None:
                raise self.fail_with
            return ZeroShotResult(
                label=self.script.get(text, labels[-1]),
                confidence=self.confidence,
                prompt_tokens=self.prompt_tokens(text),
                completion_tokens=self.completion_tokens,
                engine_seconds=self.engine_seconds,
            )
        finally:
            self.in_flight -= 1

    async def generate(
        self,
        prompt: str | None = None,
        messages: Sequence[Mapping[str, str]] | None = None,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        """Echoes the prompt's words (or the last message's), one chunk each, up to ``max_tokens``."""
        source = prompt if prompt is not None else (messages or [{"content": ""}])[-1]["content"]
        words = source.split()[: max_tokens or DEFAULT_MAX_TOKENS]
        for word in words:
            await asyncio.sleep(0)
            yield GenerationChunk(text=f"{word} ")
        yield GenerationChunk(
            text="",
            finished=True,
            finish_reason="stop",
            prompt_tokens=self.prompt_tokens(source),
            completion_tokens=len(words),
            engine_seconds=self.engine_seconds,
        )
