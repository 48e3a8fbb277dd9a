"""The serving runtime: loaded specialists, shared encoders, batching, hot load and rollback.

This is the :class:`appliance.api.backend.Backend` that the gRPC servicers call. It lives in the
process that holds the encoders, so a request crosses no process boundary on the hot path; Ray
Serve places and supervises that process (see ``appliance.serve.app``).

- Specialists built on the same encoder share one ONNX Runtime session and one batcher; their
  heads are packed into one head bank and applied in one call per batch (the fused Triton kernel
  on CUDA, the reference on CPU).
- ``load_model`` verifies, opens and warms a version off the event loop, then swaps it in with
  one assignment; requests already running finish on the version they started with. A version
  that fails to load leaves the old one serving.
- Up to ``max_loaded_models`` specialists stay loaded; past that the least recently used one is
  unloaded (multiplexing many specialists on one replica). A published model that is not loaded
  is loaded on first use when ``load_on_demand`` is set.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from appliance.engines.encoder import EncoderConfig, OnnxEncoder, cores, l2_normalize
from appliance.engines.specialist import Specialist, load_specialist
from appliance.errors import ApplianceError, InvalidArgument, NotFound, Unavailable
from appliance.serve.batcher import Batcher, BatchPolicy, BatchStats, Item
from appliance.serve.metrics import ServingMetrics
from appliance.store import ModelStore, parse_ref
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

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeSettings:
    models: tuple[str, ...] = ()  # loaded and warmed before the server reports SERVING
    limits: Limits = field(default_factory=Limits)
    batch: BatchPolicy = field(default_factory=BatchPolicy)
    # 0: one ORT thread per batch and one batch in flight per core. Short texts make small GEMMs,
    # where threads of one call spend more time meeting than computing (bench/PERF.md).
    intra_op_threads: int = 0
    max_loaded_models: int = 64
    load_on_demand: bool = True
    versions_kept: int = 2  # the serving version and the one before it, for rollback


@dataclass(frozen=True)
class SpecialistAnswer:
    """The specialist's view of one text, before routing."""

    top: list[tuple[str, float]]
    probs: np.ndarray | None
    truncated: bool
    core_seconds: float
    latency_ms: float


@dataclass
class Loaded:
    specialist: Specialist
    loaded_at: float = field(default_factory=time.time)

    @property
    def key(self) -> tuple[str, int]:
        return (self.specialist.name, self.specialist.version)


@dataclass(frozen=True)
class _Row:
    model: Loaded
    k: int
    want_probs: bool


@dataclass(frozen=True)
class _RowResult:
    ids: np.ndarray
    scores: np.ndarray
    probs: np.ndarray | None
    core_seconds: float


def head_device() -> str:
    """Where head banks live: the GPU when there is one (the fused kernel runs there)."""
    import torch

    from kernels.dispatch import kernel_mode

    return "cuda" if torch.cuda.is_available() and kernel_mode() != "reference" else "cpu"


class HeadTable:
    """An immutable head bank over every loaded specialist of one encoder."""

    def __init__(self, models: Sequence[Loaded]) -> None:
        from kernels import HeadBank

        self.slots = {m.key: i for i, m in enumerate(models)}
        self.bank = (
            HeadBank.from_heads(
                [(m.specialist.head.weight, m.specialist.head.bias) for m in models], device=head_device()
            )
            if models
            else None
        )

    def apply(
        self, pooled: np.ndarray, rows: Sequence[_Row]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        from kernels.dispatch import pooled_topk_numpy

        k = max(r.k for r in rows)
        want = any(r.want_probs for r in rows)
        if self.bank is not None and all(r.model.key in self.slots for r in rows):
            index = np.array([self.slots[r.model.key] for r in rows], dtype=np.int64)
            out = pooled_topk_numpy(pooled, index, self.bank, k, return_probs=want)
            return out[0], out[1], (out[2] if want else None)
        # A row whose model was swapped out while it waited: score it against its own head.
        ids = np.full((len(rows), k), -1, dtype=np.int64)
        scores = np.zeros((len(rows), k), dtype=np.float32)
        width = max(len(r.model.specialist.labels) for r in rows)
        full = np.zeros((len(rows), width), dtype=np.float32) if want else None
        for i, row in enumerate(rows):
            p = row.model.specialist.head.probs(l2_normalize(pooled[i : i + 1]))[0]
            order = np.argsort(-p, kind="stable")[:k]
            ids[i, : len(order)] = order
            scores[i, : len(order)] = p[order]
            if full is not None:
                full[i, : len(p)] = p
        return ids, scores, full


class EncoderLane:
    """One shared encoder: its session, its batcher and the heads that use it."""

    def __init__(
        self, encoder_id: str, encoder: OnnxEncoder, policy: BatchPolicy, metrics: ServingMetrics
    ) -> None:
        self.encoder_id = encoder_id
        self.encoder = encoder
        self.threads = encoder.session.get_session_options().intra_op_num_threads or 1
        self.heads = HeadTable([])
        self._metrics = metrics
        label = encoder_id[:12]
        self.batcher: Batcher[_RowResult] = Batcher(
            self._run, policy, name=f"enc-{label}", on_batch=self._observe
        )

    def _run(self, items: Sequence[Item]) -> list[_RowResult]:
        started = time.perf_counter()
        pooled = self.encoder.run_padded([item.tokens for item in items])
        rows: list[_Row] = [item.payload for item in items]
        ids, scores, full = self.heads.apply(pooled, rows)
        wall = time.perf_counter() - started
        total = sum(item.length for item in items)
        # Each text is charged its share of the batch's core time, by token count.
        return [
            _RowResult(
                ids[i],
                scores[i],
                None if full is None else full[i],
                wall * self.threads * item.length / total,
            )
            for i, item in enumerate(items)
        ]

    def _observe(self, stats: BatchStats, depth: int) -> None:
        label = self.encoder_id[:12]
        self._metrics.batch_rows.labels(label).observe(stats.rows)
        self._metrics.batch_tokens.labels(label).inc(stats.real_tokens)
        self._metrics.batch_padding.labels(label).inc(stats.padded_tokens - stats.real_tokens)
        self._metrics.queue_depth.labels(label).set(depth)


class ServingRuntime:
    def __init__(
        self,
        settings: RuntimeSettings,
        store: ModelStore | None = None,
        metrics: ServingMetrics | None = None,
        router: Any = None,
    ) -> None:
        self.settings = settings
        self.store = store or ModelStore()
        self.metrics = metrics or ServingMetrics()
        self.router = router  # appliance.router.cascade.Cascade, or None for specialist-only
        self._serving: dict[str, Loaded] = {}  # name -> the version answering "NAME"
        self._versions: OrderedDict[tuple[str, int], Loaded] = OrderedDict()  # LRU order
        self._lanes: dict[str, EncoderLane] = {}
        self._load_lock = asyncio.Lock()
        self._io_lock = threading.Lock()
        self.started = False
        self.draining = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load the configured models. One that fails is logged and left out: the server stays
        NOT_SERVING until a later LoadModel brings it in, instead of crash-looping."""
        self.started = True
        for ref in self.settings.models:
            try:
                await self.load_model(ref)
            except ApplianceError as exc:
                log.error("could not load %s at start: %s", ref, exc.message)

    async def close(self) -> None:
        self.draining = True
        for lane in list(self._lanes.values()):
            await lane.batcher.close()
        if self.router is not None:
            await self.router.close()

    def is_ready(self, model: str | None = None) -> bool:
        if not self.started or self.draining:
            return False
        if model is None:
            return all(parse_ref(ref)[0] in self._serving for ref in self.settings.models)
        try:
            name, version = parse_ref(model)
        except ApplianceError:
            return False
        loaded = self._lookup(name, version)
        return loaded is not None

    # ------------------------------------------------------------------ model management
    def _batch_policy(self) -> BatchPolicy:
        policy = self.settings.batch
        if self.settings.intra_op_threads == 0:
            return replace(policy, concurrent_batches=max(policy.concurrent_batches, cores()))
        return policy

    def _open(self, ref: str) -> Specialist:
        config = EncoderConfig(
            max_batch_texts=self.settings.batch.max_batch_texts,
            max_batch_tokens=self.settings.batch.max_batch_tokens,
            intra_op_threads=self.settings.intra_op_threads or 1,
        )
        specialist = load_specialist(ref, self.store, config)
        lane = self._lanes.get(specialist.manifest.encoder_id)
        if lane is not None:  # share the open session instead of a second copy
            specialist = Specialist(specialist.manifest, specialist.head, lane.encoder)
        # Warm-up: one real text through encoder and head, so the first request pays nothing.
        specialist.probs(["warm up"])
        return specialist

    async def load_model(self, model: str) -> tuple[ModelDescription, int]:
        name, _ = parse_ref(model)
        async with self._load_lock:
            previous = self._serving.get(name)
            specialist = await asyncio.to_thread(self._open, model)  # raises: the old one keeps serving
            if self.router is not None:
                await self.router.check_model(specialist)
            loaded = Loaded(specialist)
            self._install(loaded)
            # one text through the shared batcher and head bank, so the first caller pays nothing
            await self._specialist_answers(loaded, ["warm up"], 1, True, None)
            log.info("serving %s:%s", name, specialist.version)
            return self._describe(loaded), (previous.specialist.version if previous else 0)

    def _install(self, loaded: Loaded) -> None:
        spec = loaded.specialist
        encoder_id = spec.manifest.encoder_id
        if encoder_id not in self._lanes:
            lane = EncoderLane(encoder_id, spec.encoder, self._batch_policy(), self.metrics)
            lane.batcher.start()
            self._lanes[encoder_id] = lane
        self._versions[loaded.key] = loaded
        self._serving[spec.name] = loaded
        self.metrics.model_version.labels(spec.name, str(spec.version)).set(1)
        # keep the newest `versions_kept` versions of this name, and at most max_loaded_models
        mine = sorted(v for (n, v) in self._versions if n == spec.name)
        for v in mine[: -self.settings.versions_kept]:
            self._drop((spec.name, v))
        while len(self._versions) > self.settings.max_loaded_models:
            oldest = next(k for k in self._versions if k != loaded.key)
            self._drop(oldest)
        self._rebuild_heads()

    def _drop(self, key: tuple[str, int]) -> None:
        gone = self._versions.pop(key, None)
        if gone is None:
            return
        self.metrics.model_version.labels(key[0], str(key[1])).set(0)
        if self._serving.get(key[0]) is gone:
            rest = sorted(v for (n, v) in self._versions if n == key[0])
            if rest:
                self._serving[key[0]] = self._versions[(key[0], rest[-1])]
            else:
                del self._serving[key[0]]

    def _rebuild_heads(self) -> None:
        for encoder_id, lane in list(self._lanes.items()):
            users = [m for m in self._versions.values() if m.specialist.manifest.encoder_id == encoder_id]
            lane.heads = HeadTable(users)

    async def unload_model(self, model: str) -> int:
        name, version = parse_ref(model)
        async with self._load_lock:
            keys = [k for k in self._versions if k[0] == name and (version is None or k[1] == version)]
            if not keys:
                raise NotFound(f"model {model!r} is not loaded")
            for key in keys:
                self._drop(key)
            self._rebuild_heads()
            return max(k[1] for k in keys)

    def _lookup(self, name: str, version: int | None) -> Loaded | None:
        """The loaded version asked for: the serving one for a bare name."""
        return self._serving.get(name) if version is None else self._versions.get((name, version))

    async def _resolve(self, model: str) -> Loaded:
        name, version = parse_ref(model)
        loaded = self._lookup(name, version)
        if loaded is None:
            published = self.store.versions(name)
            if not published or (version is not None and version not in published):
                what = f"version {version} of {name!r}" if version else f"model {name!r}"
                raise NotFound(f"{what} is not published on this appliance")
            if not self.settings.load_on_demand:
                raise NotFound(f"model {model!r} is published but not loaded (use LoadModel)")
            await self.load_model(model)
            loaded = self._lookup(name, version)
            assert loaded is not None  # load_model just installed it
        self._versions.move_to_end(loaded.key)
        return loaded

    # ------------------------------------------------------------------ descriptions
    def _limits(self, spec: Specialist) -> Limits:
        lim = self.settings.limits
        return Limits(lim.max_texts_per_call, lim.max_text_bytes, spec.encoder.config.max_length)

    def _describe(self, loaded: Loaded) -> ModelDescription:
        spec = loaded.specialist
        return self._description(spec.meta, spec.version, self._limits(spec), loaded=True)

    def _description(
        self, meta: dict[str, Any], version: int, limits: Limits, loaded: bool
    ) -> ModelDescription:
        """A model as its manifest describes it; ``version`` 0 for one that is not loaded."""
        calibration = meta.get("calibration", {})
        return ModelDescription(
            name=str(meta["name"]),
            version=version,
            kind=str(meta.get("kind", "classifier")),
            labels=list(meta.get("labels", [])),
            metrics={k: float(v) for k, v in meta.get("metrics", {}).items() if isinstance(v, int | float)},
            threshold=float(calibration.get("threshold", 0.0)),
            coverage_at_threshold=float(calibration.get("coverage", 0.0)),
            precision_at_threshold=float(calibration.get("precision", 0.0)),
            precision=str(meta.get("precision", "")),
            limits=limits,
            default_policy=Policy(meta.get("default_policy", "cascade")),
            encoder_id=str(meta.get("encoder", {}).get("id", "")),
            created_at=str(meta.get("created_at", "")),
            loaded=loaded,
            available_versions=self.store.versions(str(meta["name"])),
        )

    def describe(self, model: str) -> ModelDescription:
        name, version = parse_ref(model)
        loaded = self._lookup(name, version)
        if loaded is None:
            if not self.store.versions(name):
                raise NotFound(f"model {model!r} is not published on this appliance")
            raise NotFound(f"model {model!r} is published but not loaded")
        return self._describe(loaded)

    def list_models(self) -> list[ModelDescription]:
        out = [self._describe(m) for m in sorted(self._serving.values(), key=lambda m: m.key)]
        loaded = {d.name for d in out}
        for name in self.store.names():
            versions = self.store.versions(name)
            if name not in loaded and versions:
                meta = self.store.load(f"{name}:{versions[-1]}", verify=False).data
                out.append(self._description(meta, 0, self.settings.limits, loaded=False))
        return out

    # ------------------------------------------------------------------ inference
    def _check_texts(self, texts: Sequence[str]) -> None:
        lim = self.settings.limits
        if not texts:
            raise InvalidArgument(f"no texts: send between 1 and {lim.max_texts_per_call} texts per call")
        if len(texts) > lim.max_texts_per_call:
            raise InvalidArgument(f"{len(texts)} texts in one call; the limit is {lim.max_texts_per_call}")
        for i, text in enumerate(texts):
            size = len(text.encode("utf-8", "surrogatepass"))
            if size > lim.max_text_bytes:
                raise InvalidArgument(f"text {i} is {size} bytes; the limit is {lim.max_text_bytes} bytes")
            if not text.strip():
                raise InvalidArgument(f"text {i} is empty: every text needs at least one non-space character")

    async def _specialist_answers(
        self, loaded: Loaded, texts: Sequence[str], k: int, want_probs: bool, timeout: float | None
    ) -> list[SpecialistAnswer]:
        if self.draining:
            raise Unavailable("the server is shutting down")
        started = time.perf_counter()
        spec = loaded.specialist
        lane = self._lanes[spec.manifest.encoder_id]
        tokenized = spec.encoder.tokenize(texts)
        deadline = None if timeout is None else time.monotonic() + timeout
        row = _Row(loaded, k, want_probs)
        results = await lane.batcher.submit([(ids, row) for ids in tokenized.ids], deadline)
        latency_ms = 1000.0 * (time.perf_counter() - started)
        labels = spec.labels
        answers = []
        for result, truncated in zip(results, tokenized.truncated, strict=True):
            top = [
                (labels[int(i)], float(s))
                for i, s in zip(result.ids[:k], result.scores[:k], strict=True)
                if i >= 0
            ]
            probs = None if result.probs is None else result.probs[: len(labels)]
            answers.append(SpecialistAnswer(top, probs, truncated, result.core_seconds, latency_ms))
        return answers

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
    ) -> ClassifyOutcome:
        self._check_texts(texts)
        loaded = await self._resolve(model)
        spec = loaded.specialist
        k = min(max(top_k, 1), len(spec.labels))
        answers = await self._specialist_answers(loaded, texts, k, want_probs, timeout)
        if self.router is not None:
            decisions = await self.router.decide(
                spec, answers, policy, allow_fallback=allow_fallback, request_id=request_id, texts=list(texts)
            )
        else:
            decisions = [_specialist_decision(a) for a in answers]
        return ClassifyOutcome(spec.name, spec.version, spec.precision, spec.labels, decisions)

    async def embed(self, model: str, texts: Sequence[str], timeout: float | None = None) -> EmbedOutcome:
        self._check_texts(texts)
        loaded = await self._resolve(model)
        spec = loaded.specialist
        # Embeddings skip the head bank: one session call on the caller's texts, off the loop.
        vectors, truncated = await asyncio.wait_for(
            asyncio.to_thread(spec.encoder.embed, list(texts)), timeout
        )
        return EmbedOutcome(spec.name, spec.version, vectors, truncated)


def _specialist_decision(answer: SpecialistAnswer) -> Decision:
    label, confidence = answer.top[0]
    return Decision(
        label=label,
        confidence=confidence,
        top=answer.top,
        truncated=answer.truncated,
        route=Route.SPECIALIST,
        latency_ms=answer.latency_ms,
        cost=Cost(core_seconds=answer.core_seconds),
        probs=answer.probs,
    )
