"""Stand-ins for protocol tests: a keyword-classifier Backend, and a real gRPC server to host it.

:class:`KeywordBackend` implements :class:`appliance.backend.Backend` for real (validation,
errors, readiness) with a deterministic keyword classifier over four labels, so the gRPC front
ends and the load generator can be tested against a real server without a trained model. The
real backend and its engines are tested in their own suites.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterator, Sequence

import grpc
import numpy as np

from appliance.backend import Backend
from appliance.errors import InvalidArgument, NotFound
from appliance.store import parse_ref
from appliance.types import (
    ClassifyOutcome,
    Cost,
    Decision,
    EmbedOutcome,
    Limits,
    ModelDescription,
    Policy,
    Route,
)

LABELS = ["card_arrival", "exchange_rate", "lost_or_stolen_card", "other"]
KEYWORDS = {
    "card_arrival": ("arrive", "arrival", "received", "delivery"),
    "exchange_rate": ("exchange", "rate", "currency"),
    "lost_or_stolen_card": ("lost", "stolen", "missing"),
}
MODEL = "intents"
VERSION = 3
LIMITS = Limits(max_texts_per_call=64, max_text_bytes=1024, max_input_tokens=32)


def keyword_probs(text: str) -> np.ndarray:
    """One vote per keyword hit, plus one for "other" when nothing matched; normalised."""
    words = text.lower()
    votes = np.array([sum(k in words for k in KEYWORDS.get(label, ())) for label in LABELS], dtype=np.float32)
    if votes.sum() == 0:
        votes[LABELS.index("other")] = 1.0
    smoothed = votes + 0.1
    return smoothed / smoothed.sum()


class KeywordBackend(Backend):
    """Serves one classifier, ``intents`` version 3; ``warm`` says whether it is ready."""

    limits = LIMITS

    def __init__(self, warm: bool = True) -> None:
        self.warm = warm
        self.calls: list[tuple[str, list[str], float | None]] = []  # (model, texts, timeout)

    def _check(self, model: str, texts: Sequence[str]) -> None:
        name, version = parse_ref(model)  # the store's own rules for names and versions
        if name != MODEL or (version is not None and version != VERSION):
            raise NotFound(f"model {model!r} is not loaded")
        if not texts:
            raise InvalidArgument("no texts given")
        if len(texts) > LIMITS.max_texts_per_call:
            raise InvalidArgument(
                f"{len(texts)} texts exceed the limit of {LIMITS.max_texts_per_call} per call"
            )
        for i, text in enumerate(texts):
            if len(text.encode()) > LIMITS.max_text_bytes:
                raise InvalidArgument(f"text {i} is longer than {LIMITS.max_text_bytes} bytes")

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
        self._check(model, texts)
        self.calls.append((model, list(texts), timeout))
        decisions = []
        for text in texts:
            probs = keyword_probs(text)
            order = np.argsort(-probs, kind="stable")[: max(top_k, 1)]
            top = [(LABELS[i], float(probs[i])) for i in order]
            decisions.append(
                Decision(
                    label=top[0][0],
                    confidence=top[0][1],
                    top=top,
                    truncated=len(text.split()) > LIMITS.max_input_tokens,
                    route=Route.SPECIALIST,
                    latency_ms=0.0,
                    cost=Cost(),
                    probs=probs if want_probs else None,
                )
            )
        return ClassifyOutcome(
            model=MODEL, version=VERSION, precision="fp32", labels=LABELS, decisions=decisions
        )

    async def embed(self, model: str, texts: Sequence[str], timeout: float | None = None) -> EmbedOutcome:
        self._check(model, texts)
        vectors = np.zeros((len(texts), 16), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():  # hashed bag of words
                vectors[row, hashlib.sha256(word.encode()).digest()[0] % 16] += 1.0
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.where(norms == 0, 1.0, norms)
        return EmbedOutcome(model=MODEL, version=VERSION, vectors=vectors, truncated=[False] * len(texts))

    def _description(self) -> ModelDescription:
        return ModelDescription(
            name=MODEL,
            version=VERSION,
            kind="classifier",
            labels=list(LABELS),
            metrics={"accuracy": 1.0},
            threshold=0.5,
            coverage_at_threshold=1.0,
            precision_at_threshold=1.0,
            precision="fp32",
            limits=LIMITS,
            default_policy=Policy.SPECIALIST_ONLY,
            encoder_id="keywords",
            created_at="2024-01-01T00:00:00Z",
            loaded=True,
            available_versions=[1, VERSION],
        )

    def list_models(self) -> list[ModelDescription]:
        return [self._description()]

    def describe(self, model: str) -> ModelDescription:
        if model.partition(":")[0] != MODEL:
            raise NotFound(f"model {model!r} is not loaded")
        return self._description()

    async def load_model(self, model: str) -> tuple[ModelDescription, int]:
        return self.describe(model), VERSION

    async def unload_model(self, model: str) -> int:
        self.describe(model)
        return VERSION

    def is_ready(self, model: str | None = None) -> bool:
        return self.warm and (model is None or model.partition(":")[0] == MODEL)

    async def close(self) -> None:
        self.warm = False


@contextlib.contextmanager
def serve_in_thread(register: Callable[[grpc.aio.Server], None]) -> Iterator[int]:
    """Run a real ``grpc.aio`` server on 127.0.0.1 (port 0) in a thread; yields the bound port.

    ``register`` adds the servicers. The server lives on its own event loop so that tests can use
    blocking clients (``tritonclient.grpc``, subprocesses) from the main thread.
    """
    loop = asyncio.new_event_loop()
    started = threading.Event()
    state: dict[str, object] = {}

    async def start() -> None:
        server = grpc.aio.server()
        register(server)
        state["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        state["server"] = server

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        except BaseException as exc:
            state["error"] = exc
            return
        finally:
            started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="grpc-test-server", daemon=True)
    thread.start()
    started.wait()
    if "error" in state:
        raise RuntimeError("test server failed to start") from state["error"]  # type: ignore[misc]
    try:
        yield state["port"]  # type: ignore[misc]
    finally:
        server = state["server"]
        asyncio.run_coroutine_threadsafe(server.stop(grace=None), loop).result(timeout=10)  # type: ignore[attr-defined]
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
