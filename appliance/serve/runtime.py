"""The serving runtime: loaded specialists, shared encoders, batching, hot load and rollback.

This is the :class:`appliance.backend.Backend` that the gRPC servicers call. It lives in the
process that holds the encoders, so a request crosses no process boundary on the hot path; Ray
Serve places and supervises that process (see ``appliance.serve.app``).

- Specialists built on the same encoder share one ONNX Runtime session and one batcher; their
  heads are packed into one head bank and applied in one call per batch (the fused Triton kernel
  on CUDA, the reference on CPU).
- ``load_model`` verifies, opens and warms a version off the event loop, then swaps it in with
  one assignment; requests already running finish on the version they started with. A version
  that fails to load leaves the old one serving.
- Only ``load_model`` (AdminService.LoadModel) chooses the version a bare ``NAME`` gets; the
  choice is recorded in the store, so a restart serves it again (or, if it no longer verifies,
  the newest version that does). A request for ``NAME:VERSION`` is answered by that version
  without changing what bare callers get.
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

import numpy as np

from appliance.artifact.manifest import SpecialistManifest
from appliance.artifact.maths import l2_normalize
from appliance.artifact.rejection import Rejection
from appliance.artifact.spans import Encoded, Span
from appliance.batching import BatchSettings
from appliance.engines.encoder import EncoderConfig, OnnxEncoder, Tokenized, cores
from appliance.engines.extractor import Extractor, Served, load_served
from appliance.engines.specialist import Specialist, require_self_check
from appliance.errors import ApplianceError, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from appliance.loop.choices import ShadowChoice
from appliance.loop.follow import DEFAULT_INTERVAL_S, ChoiceFollower
from appliance.loop.shadow import DEFAULT_QUEUE, ShadowRunner, ShadowStore, shadow_db
from appliance.router.interface import Router
from appliance.serve.batcher import Batcher, BatchStats, Item
from appliance.serve.metrics import ServingMetrics
from appliance.serve.statistics import InferenceStatistics, ModelCounters, ModelKey, current_request
from appliance.store import ModelStore, parse_ref
from appliance.types import (
    ClassifyOutcome,
    Cost,
    Decision,
    EmbedOutcome,
    ExtractedSpan,
    Extraction,
    ExtractOutcome,
    Limits,
    ModelDescription,
    Policy,
    Route,
    SpecialistAnswer,
)

log = logging.getLogger(__name__)

# A window token is rarely more than a few characters of text; 32 keeps every token a real text
# could put in the window while bounding the tokenizer's work per text (tokenize_window).
CHARS_PER_TOKEN = 32
# Up to this many characters a call is tokenized on the event loop (16 us for a 42-character
# text, ~120 us at the bound), beyond it on a worker thread: the hop alone costs ~55 us of CPU.
INLINE_TOKENIZE_CHARS = 512
MAX_REQUESTED_SLOTS = 16  # per text; Restaurant8k asks for at most a few
MAX_SLOT_CHARS = 64


@dataclass(frozen=True)
class RuntimeSettings:
    models: tuple[str, ...] = ()  # loaded and warmed before the server reports SERVING
    limits: Limits = field(default_factory=Limits)
    batch: BatchSettings = field(default_factory=BatchSettings)
    # 0: one ORT thread per batch and one batch in flight per core. Short texts make small GEMMs,
    # where threads of one call spend more time meeting than computing (bench/PERF.md).
    intra_op_threads: int = 0
    # Cores this process's batches may keep busy (with intra_op_threads 0: batches in flight);
    # 0: its whole CPU set. Several ingress processes on a node each take their share.
    cores: int = 0
    max_loaded_models: int = 64
    load_on_demand: bool = True
    versions_kept: int = 2  # the serving version and the one before it, for rollback
    # How often the recorded serving and shadow choices are read (every replica follows them); 0: never.
    follow_interval_s: float = DEFAULT_INTERVAL_S
    shadow_queue: int = DEFAULT_QUEUE  # requests waiting for the shadow challenger; past it, dropped


@dataclass
class Loaded:
    specialist: Served  # a classifier or a span extractor
    loaded_at: float = field(default_factory=time.time)

    @property
    def key(self) -> tuple[str, int]:
        return (self.specialist.name, self.specialist.version)

    @property
    def classifier(self) -> Specialist:
        """The model as a classifier; InvalidArgument naming its kind when it is not one."""
        if not isinstance(self.specialist, Specialist):
            raise InvalidArgument(_wrong_kind(self.specialist, "Classify", "Extract"))
        return self.specialist

    @property
    def extractor(self) -> Extractor:
        if not isinstance(self.specialist, Extractor):
            raise InvalidArgument(_wrong_kind(self.specialist, "Extract", "Classify"))
        return self.specialist


def _wrong_kind(model: Served, asked: str, use: str) -> str:
    return f"model {model.spec.ref!r} is a {model.spec.kind}, which does not answer {asked}; use {use}"


@dataclass(frozen=True)
class _Row:
    model: Loaded
    k: int
    want_probs: bool


@dataclass(frozen=True)
class _SpanRow:
    extractor: Extractor
    text: str
    encoded: Encoded


@dataclass(frozen=True)
class _Work:
    """What one encoder row is for: a head's top-k, spans, both from one pass, or neither (embed)."""

    classify: _Row | None = None
    extract: _SpanRow | None = None


@dataclass(frozen=True)
class _RowResult:
    """A classify row's top-k from its head, an extract row's spans, or an embed row's
    L2-normalised pooled vector."""

    ids: np.ndarray  # empty for a row without a classifier
    scores: np.ndarray
    probs: np.ndarray | None
    vector: np.ndarray | None  # only for an embed row
    core_seconds: float
    spans: list[Span] | None = None  # only for an extract row
    similarity: float | None = None  # nearest-reference similarity, for an out-of-scope score that uses it


_NO_HEAD = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32), None)


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
                [(m.classifier.head.weight, m.classifier.head.bias) for m in models], device=head_device()
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
            p = row.model.classifier.head.probs(l2_normalize(pooled[i : i + 1]))[0]
            order = np.argsort(-p, kind="stable")[:k]
            ids[i, : len(order)] = order
            scores[i, : len(order)] = p[order]
            if full is not None:
                full[i, : len(p)] = p
        return ids, scores, full


class EncoderLane:
    """One shared encoder: its session, its batcher and the heads that use it."""

    def __init__(
        self,
        encoder_id: str,
        encoder: OnnxEncoder,
        policy: BatchSettings,
        metrics: ServingMetrics,
        statistics: InferenceStatistics | None = None,
    ) -> None:
        self.encoder_id = encoder_id
        self.encoder = encoder
        self.threads = encoder.session.get_session_options().intra_op_num_threads or 1
        self.heads = HeadTable([])
        self._metrics = metrics
        self._statistics = statistics or InferenceStatistics()
        label = encoder_id[:12]
        self.batcher: Batcher[_RowResult] = Batcher(
            self._run, policy, name=f"enc-{label}", on_batch=self._observe
        )

    def _run(self, items: Sequence[Item]) -> list[_RowResult]:
        """One session call over the batch (a ``_Work`` payload per row): classify rows go on
        through the head bank, extract rows through their token head and span decoding (the
        same call fetches the token states), embed rows come back as normalised pooled vectors."""
        started = time.perf_counter()
        work: list[_Work] = [item.payload for item in items]
        rows = [item.tokens for item in items]
        states: list[np.ndarray] | None = None
        if any(w.extract is not None for w in work):
            pooled, states = self.encoder.run_pooled_and_states(rows)
        else:
            pooled = self.encoder.run_padded(rows)
        headed = [i for i, w in enumerate(work) if w.classify is not None]
        embedded = [i for i, w in enumerate(work) if w.classify is None and w.extract is None]
        outputs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
        if headed:
            classify_rows = [row for i in headed if (row := work[i].classify) is not None]
            ids, scores, full = self.heads.apply(pooled[headed], classify_rows)
            for j, i in enumerate(headed):
                outputs[i] = (ids[j], scores[j], None if full is None else full[j])
        similarity = _similarities(pooled, work, headed)
        spans: dict[int, list[Span]] = {}
        for i, w in enumerate(work):
            if w.extract is not None and states is not None:
                spans[i] = w.extract.extractor.decode(states[i], w.extract.encoded, w.extract.text)
        vectors = dict(zip(embedded, l2_normalize(pooled[embedded]), strict=True)) if embedded else {}
        wall = time.perf_counter() - started
        total = sum(item.length for item in items)
        # Each text is charged its share of the batch's core time, by token count.
        return [
            _RowResult(
                *outputs.get(i, _NO_HEAD),
                vectors.get(i),
                wall * self.threads * item.length / total,
                spans.get(i),
                similarity.get(i),
            )
            for i, item in enumerate(items)
        ]

    def _observe(self, stats: BatchStats, depth: int) -> None:
        label = self.encoder_id[:12]
        self._metrics.batch_rows.labels(label).observe(stats.rows)
        self._metrics.batch_tokens.labels(label).inc(stats.real_tokens)
        self._metrics.batch_padding.labels(label).inc(stats.padded_tokens - stats.real_tokens)
        self._metrics.queue_depth.labels(label).set(depth)
        self._statistics.executed(_row_models(stats.payloads))


def _row_models(payloads: Sequence[_Work]) -> list[ModelKey]:
    """The model versions a batch's rows ran for (embed rows run for none)."""
    keys: list[ModelKey] = []
    for work in payloads:
        if work.classify is not None:
            keys.append(work.classify.model.key)
        if work.extract is not None:
            keys.append((work.extract.extractor.name, work.extract.extractor.version))
    return keys


class ServingRuntime:
    def __init__(
        self,
        settings: RuntimeSettings,
        store: ModelStore | None = None,
        metrics: ServingMetrics | None = None,
        router: Router | None = None,
    ) -> None:
        self.settings = settings
        self.store = store or ModelStore()
        self.metrics = metrics or ServingMetrics()
        self.statistics = InferenceStatistics()  # per model version, for KServe ModelStatistics
        self.router = router  # None: specialist-only
        # name -> the version answering a bare "NAME": only LoadModel (an admin) or the durable
        # choice read at start sets it; a pinned "NAME:VERSION" request never does.
        self._serving: dict[str, int] = {}
        self._versions: OrderedDict[tuple[str, int], Loaded] = OrderedDict()  # LRU order
        self._lanes: dict[str, EncoderLane] = {}
        self._load_lock = asyncio.Lock()
        self._io_lock = threading.Lock()
        self.started = False
        self.draining = False
        self.start_errors: dict[str, str] = {}  # configured ref -> why it did not load at start
        # The challenger in shadow, and the watcher that keeps this replica on the recorded choices.
        self.shadow = ShadowRunner(self, ShadowStore(shadow_db(self.store.home)), settings.shadow_queue)
        self._follower = ChoiceFollower(self, self.store, settings.follow_interval_s)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load the configured models. One that fails is logged and left out: the server stays
        NOT_SERVING until a later LoadModel brings it in, instead of crash-looping."""
        self.started = True
        for ref in self.settings.models:
            try:
                name, version = parse_ref(ref)
                async with self._load_lock:
                    # a configured NAME:VERSION is the operator's choice; a bare NAME the recorded one
                    loading = self._bring_in(name, version) if version else self._bring_in_serving(name)
                    loaded = await loading
                    self._serving[name] = loaded.specialist.version
                    log.info("serving %s:%s", name, loaded.specialist.version)
            except ApplianceError as exc:
                log.error("could not load %s at start: %s", ref, exc.message)
                self.start_errors[ref] = exc.message
        if self.settings.follow_interval_s > 0:
            self._follower.start()

    async def close(self) -> None:
        self.draining = True
        await self._follower.close()
        await self.shadow.close()
        for lane in list(self._lanes.values()):
            await lane.batcher.close()
        if self.router is not None:
            await self.router.close()

    def waiting(self) -> dict[str, str]:
        """What each configured model that is not serving yet waits for; empty once all serve."""
        reasons: dict[str, str] = {}
        for ref in self.settings.models:
            if self.is_ready(ref):
                continue
            try:
                name, version = parse_ref(ref)
                published = self.store.versions(name)
            except ApplianceError as exc:
                reasons[ref] = exc.message
                continue
            if not published or (version is not None and version not in published):
                reasons[ref] = f"not published in {self.store.models_root} (train it or import a bundle)"
            elif ref in self.start_errors:
                reasons[ref] = f"did not load at start ({self.start_errors[ref]}); load it with LoadModel"
            else:
                reasons[ref] = "loading"
        return reasons

    def is_ready(self, model: str | None = None) -> bool:
        if not self.started or self.draining:
            return False
        if model is None:
            return all(self._lookup(parse_ref(ref)[0], None) is not None for ref in self.settings.models)
        try:
            name, version = parse_ref(model)
        except ApplianceError:
            return False
        loaded = self._lookup(name, version)
        return loaded is not None

    # ------------------------------------------------------------------ model management
    def _batch_policy(self) -> BatchSettings:
        policy = self.settings.batch
        if self.settings.intra_op_threads == 0:
            budget = self.settings.cores or cores()
            return policy.model_copy(update={"concurrent_batches": max(policy.concurrent_batches, budget)})
        return policy

    def _open(self, ref: str) -> Served:
        threads = self.settings.intra_op_threads or 1
        config = EncoderConfig(batch=self.settings.batch, intra_op_threads=threads)
        model = load_served(ref, self.store, config)
        lane = self._lanes.get(model.manifest.encoder_id)
        if lane is not None:  # share the open session instead of a second copy
            model = replace(model, encoder=lane.encoder)
        # Warm-up: real texts through encoder and head, so the first request pays nothing. A
        # classifier runs its self-check set, on this CPU, and is refused if its labels stray.
        if isinstance(model, Extractor):
            model.warm_up()
        else:
            model.probs(["warm up"])
            require_self_check(model)
        return model

    async def load_model(self, model: str) -> tuple[ModelDescription, int]:
        """AdminService.LoadModel: make ``model`` (a bare name: its newest version) the version bare
        callers get, here and, through the store's record, after a restart."""
        name, version = self.store.resolve(model)
        async with self._load_lock:
            previous = self._serving.get(name, 0)
            loaded = await self._bring_in(name, version)  # raises: the old one keeps serving
            try:
                await asyncio.to_thread(self.store.set_serving_version, name, version)
            except OSError as exc:
                raise FailedPrecondition(
                    f"could not record {name}:{version} as the serving version: {exc}"
                ) from exc
            self._serving[name] = version
            log.info("serving %s:%s (was %s)", name, version, previous or "none")
            return self._describe(loaded), previous

    async def _bring_in(self, name: str, version: int) -> Loaded:
        """Verify, open and warm one version and add it to the loaded ones; what a bare name gets
        is left as it was."""
        specialist = await asyncio.to_thread(self._open, f"{name}:{version}")
        if self.router is not None and isinstance(specialist, Specialist):
            await self.router.check_model(specialist)
        loaded = Loaded(specialist)
        self._install(loaded)
        # one text through the shared batcher and head bank, so the first caller pays nothing
        if isinstance(specialist, Extractor):
            await self._batched_spans(specialist, ["warm up"], (), None, None)
        else:
            await self._specialist_answers(loaded, ["warm up"], 1, True, None)
        return loaded

    async def _bring_in_serving(self, name: str) -> Loaded:
        """Bring in the version a bare ``name`` gets: the chosen one (this process's, else the
        store's record, else the newest). One that fails to load gives way to the newest other
        version that loads, so a tampered upgrade leaves the previous good version serving."""
        published = self.store.versions(name)
        if not published:
            raise NotFound(f"model {name!r} is not published on this appliance")
        chosen = self._serving.get(name) or self.store.serving_version(name)
        wanted = chosen if chosen in published else published[-1]
        errors: list[ApplianceError] = []
        for version in [wanted, *(v for v in reversed(published) if v != wanted)]:
            try:
                loaded = await self._bring_in(name, version)
            except ApplianceError as exc:
                log.error("%s:%s cannot serve: %s", name, version, exc.message)
                errors.append(exc)
                continue
            if version != wanted:
                log.warning("serving %s:%s instead of %s:%s, which failed", name, version, name, wanted)
            return loaded
        raise errors[0]

    def _install(self, loaded: Loaded) -> None:
        spec = loaded.specialist
        encoder_id = spec.manifest.encoder_id
        if encoder_id not in self._lanes:
            lane = EncoderLane(encoder_id, spec.encoder, self._batch_policy(), self.metrics, self.statistics)
            lane.batcher.start()
            self._lanes[encoder_id] = lane
        self._versions[loaded.key] = loaded
        self.metrics.model_loaded(spec.name, spec.version)
        # Never evict the version just installed nor the serving one of its name: the caller is
        # about to use the first, bare callers the second. Past `versions_kept` versions of this
        # name, and past max_loaded_models in all, the least recently used others go.
        keep = {loaded.key, (spec.name, self._serving.get(spec.name, 0))}
        room = max(self.settings.versions_kept - len(keep & self._versions.keys()), 0)
        others = [k for k in self._versions if k[0] == spec.name and k not in keep]
        for key in others[: max(len(others) - room, 0)]:
            self._drop(key)
        evictable = [k for k in self._versions if k not in keep]
        for key in evictable[: max(len(self._versions) - self.settings.max_loaded_models, 0)]:
            self._drop(key)
        self._rebuild_heads()

    def _drop(self, key: tuple[str, int]) -> None:
        """Unload one version. What a bare name gets stays chosen: a dropped serving version is
        loaded again on demand."""
        if self._versions.pop(key, None) is not None:
            self.metrics.model_unloaded(*key)

    def _rebuild_heads(self) -> None:
        for encoder_id, lane in list(self._lanes.items()):
            users = [
                m
                for m in self._versions.values()
                if m.specialist.manifest.encoder_id == encoder_id and isinstance(m.specialist, Specialist)
            ]
            lane.heads = HeadTable(users)

    async def unload_model(self, model: str) -> int:
        """AdminService.UnloadModel: frees memory only. The serving choice stays, so a later bare
        call loads the chosen version again (with ``load_on_demand``); LoadModel rolls back."""
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
        if version is None:
            version = self._serving.get(name)
        return None if version is None else self._versions.get((name, version))

    async def _resolve(self, model: str) -> Loaded:
        name, version = parse_ref(model)
        loaded = self._lookup(name, version) or await self._load_on_demand(name, version)
        self._versions.move_to_end(loaded.key)  # no await since it was found or installed
        return loaded

    async def _load_on_demand(self, name: str, version: int | None) -> Loaded:
        """Load a published version a request asks for, without changing what a bare name gets."""
        published = self.store.versions(name)
        if not published or (version is not None and version not in published):
            what = f"version {version} of {name!r}" if version else f"model {name!r}"
            raise NotFound(f"{what} is not published on this appliance")
        if not self.settings.load_on_demand:
            ref = name if version is None else f"{name}:{version}"
            raise NotFound(f"model {ref!r} is published but not loaded (use LoadModel)")
        async with self._load_lock:
            loaded = self._lookup(name, version)  # another caller may have loaded it while we waited
            if loaded is not None:
                return loaded
            if version is not None:
                return await self._bring_in(name, version)
            loaded = await self._bring_in_serving(name)
            self._serving[name] = loaded.specialist.version
            return loaded

    # ------------------------------------------------------------------ the retraining loop's hooks
    def served_versions(self) -> dict[str, int]:
        return dict(self._serving)

    async def follow_serving(self, name: str, version: int) -> None:
        """Serve ``version`` for a bare ``name``, as recorded by another replica's LoadModel."""
        async with self._load_lock:
            if self._serving.get(name) == version:
                return
            if (name, version) not in self._versions:
                await self._bring_in(name, version)  # raises: the old one keeps serving
            self._serving[name] = version

    def follow_shadow(self, name: str, choice: ShadowChoice | None) -> None:
        self.shadow.set_choice(name, choice)

    async def shadow_answers(
        self, name: str, version: int, texts: Sequence[str]
    ) -> tuple[list[SpecialistAnswer], float]:
        """The challenger's answers for the shadow (loaded on first use), and its threshold."""
        loaded = await self._resolve(f"{name}:{version}")
        answers = await self._specialist_answers(loaded, texts, 1, False, None)
        return answers, loaded.classifier.threshold

    # ------------------------------------------------------------------ descriptions
    def _limits(self, spec: Served) -> Limits:
        lim = self.settings.limits
        return Limits(lim.max_texts_per_call, lim.max_text_bytes, spec.encoder.config.max_length)

    def _describe(self, loaded: Loaded) -> ModelDescription:
        spec = loaded.specialist
        return self._description(spec.spec, spec.version, self._limits(spec), loaded=True)

    def _description(
        self, manifest: SpecialistManifest, version: int, limits: Limits, loaded: bool
    ) -> ModelDescription:
        """A model as its manifest describes it; ``version`` 0 for one that is not loaded."""
        calibration = manifest.calibration
        return ModelDescription(
            name=manifest.name,
            version=version,
            kind=manifest.kind,
            labels=list(manifest.labels),
            metrics={k: float(v) for k, v in manifest.metrics.items()},
            threshold=calibration.threshold,
            coverage_at_threshold=calibration.coverage,
            precision_at_threshold=calibration.precision,
            precision=manifest.precision,
            limits=limits,
            default_policy=Policy(manifest.default_policy),
            encoder_id=manifest.encoder.id,
            created_at=manifest.created_at,
            loaded=loaded,
            available_versions=self.store.versions(manifest.name),
        )

    def statistics_of(self, model: str = "") -> list[tuple[ModelKey, ModelCounters]]:
        """The counters of the loaded versions of ``model`` ("" for every model, "NAME" for every
        loaded version of it, "NAME:VERSION" for one); NotFound when none is loaded."""
        name, version = parse_ref(model) if model else ("", None)
        keys = [k for k in self._versions if (not name or k[0] == name) and version in (None, k[1])]
        if name and not keys:
            raise NotFound(f"model {model!r} is not loaded")
        return [(key, self.statistics.snapshot(key)) for key in sorted(keys)]

    def describe(self, model: str) -> ModelDescription:
        name, version = parse_ref(model)
        loaded = self._lookup(name, version)
        if loaded is None:
            if not self.store.versions(name):
                raise NotFound(f"model {model!r} is not published on this appliance")
            raise NotFound(f"model {model!r} is published but not loaded")
        return self._describe(loaded)

    def list_models(self) -> list[ModelDescription]:
        serving = (self._lookup(name, None) for name in sorted(self._serving))
        out = [self._describe(m) for m in serving if m is not None]
        loaded = {d.name for d in out}
        for name in self.store.names():
            versions = self.store.versions(name)
            if name not in loaded and versions:
                manifest = self.store.load(f"{name}:{versions[-1]}", verify=False).spec
                out.append(self._description(manifest, 0, self.settings.limits, loaded=False))
        return out

    # ------------------------------------------------------------------ inference
    @property
    def limits(self) -> Limits:
        return self.settings.limits

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

    def _check_slots(self, texts: Sequence[str], requested_slots: Sequence[Sequence[str]]) -> None:
        if requested_slots and len(requested_slots) != len(texts):
            raise InvalidArgument(
                f"{len(texts)} texts but {len(requested_slots)} requested-slot lists: "
                "send none or one per text"
            )
        for i, slots in enumerate(requested_slots):
            if len(slots) > MAX_REQUESTED_SLOTS:
                raise InvalidArgument(
                    f"text {i} requests {len(slots)} slots; the limit is {MAX_REQUESTED_SLOTS}"
                )
            for slot in slots:
                if not slot.strip() or len(slot) > MAX_SLOT_CHARS:
                    raise InvalidArgument(
                        f"text {i} requests slot {slot[:MAX_SLOT_CHARS]!r}: slot names are 1 to "
                        f"{MAX_SLOT_CHARS} characters"
                    )

    def _lane(self, model: Served) -> EncoderLane:
        if self.draining:
            raise Unavailable("the server is shutting down")
        return self._lanes[model.manifest.encoder_id]

    async def _batched(
        self, spec: Served, texts: Sequence[str], row: _Row | None, timeout: float | None
    ) -> tuple[list[_RowResult], list[bool]]:
        """The texts through their encoder's batcher, each with ``row`` (``None``: no head), and
        their truncation flags."""
        lane = self._lane(spec)
        # A full call of long texts takes the tokenizer a while, and health checks and every other
        # RPC wait for the loop: off the loop. A short call costs the tokenizer less than the hop.
        began = time.monotonic()
        if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
            tokenized = tokenize_window(spec.encoder, texts)
        else:
            tokenized = await asyncio.to_thread(tokenize_window, spec.encoder, texts)
        if (timing := current_request()) is not None:
            timing.tokenized(time.monotonic() - began)
        deadline = None if timeout is None else time.monotonic() + timeout
        results = await lane.batcher.submit([(ids, _Work(classify=row)) for ids in tokenized.ids], deadline)
        return results, tokenized.truncated

    async def _batched_spans(
        self,
        extractor: Extractor,
        texts: Sequence[str],
        requested_slots: Sequence[Sequence[str]],
        row: _Row | None,
        timeout: float | None,
    ) -> tuple[list[_RowResult], list[bool]]:
        """The texts through the extractor's encoder lane as extract rows; with ``row``, each row
        is also scored by that classifier from the same encoder pass (its tokens must be the
        classifier's: same encoder, no requested-slot context)."""
        lane = self._lane(extractor)
        began = time.monotonic()
        encoded, truncated = await asyncio.to_thread(encode_window, extractor, texts, requested_slots)
        if (timing := current_request()) is not None:
            timing.tokenized(time.monotonic() - began)
        deadline = None if timeout is None else time.monotonic() + timeout
        items = [
            (enc.ids, _Work(classify=row, extract=_SpanRow(extractor, text, enc)))
            for text, enc in zip(texts, encoded, strict=True)
        ]
        return await lane.batcher.submit(items, deadline), truncated

    async def _specialist_answers(
        self, loaded: Loaded, texts: Sequence[str], k: int, want_probs: bool, timeout: float | None
    ) -> list[SpecialistAnswer]:
        started = time.perf_counter()
        spec = loaded.classifier
        results, truncation = await self._batched(spec, texts, _Row(loaded, k, want_probs), timeout)
        latency_ms = 1000.0 * (time.perf_counter() - started)
        return _answers(results, truncation, spec.labels, k, latency_ms, spec.rejection)

    async def _decide(
        self,
        loaded: Loaded,
        texts: Sequence[str],
        answers: list[SpecialistAnswer],
        policy: Policy | None,
        allow_fallback: bool,
        request_id: str,
        generalist: str = "",
    ) -> ClassifyOutcome:
        spec = loaded.classifier
        if self.router is not None:
            decisions = await self.router.decide(
                spec,
                answers,
                policy,
                allow_fallback=allow_fallback,
                request_id=request_id,
                texts=list(texts),
                generalist=generalist or None,
            )
        else:
            decisions = [_specialist_decision(a) for a in answers]
        return ClassifyOutcome(spec.name, spec.version, spec.precision, spec.labels, decisions)

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
        self._check_texts(texts)
        loaded = await self._resolve(model)
        with self.statistics.request(loaded.key, len(texts)):
            k = min(max(top_k, 1), len(loaded.classifier.labels))
            answers = await self._specialist_answers(loaded, texts, k, want_probs, timeout)
            outcome = await self._decide(
                loaded, texts, answers, policy, allow_fallback, request_id, generalist=generalist
            )
        if ":" not in model:  # the shadow challenger is compared with what bare callers get
            spec = loaded.specialist
            self.shadow.offer(spec.name, spec.version, texts, outcome.decisions, request_id)
        return outcome

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
        self._check_texts(texts)
        self._check_slots(texts, requested_slots)
        extractor = (await self._resolve(model)).extractor
        with self.statistics.request((extractor.name, extractor.version), len(texts)):
            return await self._extract(
                extractor,
                texts,
                requested_slots,
                policy,
                timeout,
                allow_fallback,
                request_id,
                classify_model,
                top_k,
            )

    async def _extract(
        self,
        extractor: Extractor,
        texts: Sequence[str],
        requested_slots: Sequence[Sequence[str]],
        policy: Policy | None,
        timeout: float | None,
        allow_fallback: bool,
        request_id: str,
        classify_model: str,
        top_k: int,
    ) -> ExtractOutcome:
        # Without a router there is no generalist: a policy that needs one is refused (or falls back) now.
        fallback = _extraction_route(policy, allow_fallback) if self.router is None else False
        classifier = await self._resolve(classify_model) if classify_model else None
        row = None
        if classifier is not None:
            k = min(max(top_k, 1), len(classifier.classifier.labels))
            row = _Row(classifier, k, False)
        context = extractor.info.uses_context and any(requested_slots)
        one_pass = row is not None and not context and _same_encoder(extractor, classifier)
        started = time.perf_counter()
        extracting = self._batched_spans(
            extractor, texts, requested_slots, row if one_pass else None, timeout
        )
        answers: list[SpecialistAnswer] | None = None
        if row is not None and not one_pass:  # a second encoder pass, side by side with the first
            classifying = self._specialist_answers(row.model, texts, row.k, False, timeout)
            (results, truncation), answers = await asyncio.gather(extracting, classifying)
        else:
            results, truncation = await extracting
        latency_ms = 1000.0 * (time.perf_counter() - started)
        if row is not None and answers is None:
            head = row.model.classifier
            answers = _answers(results, truncation, head.labels, row.k, latency_ms, head.rejection)
        classified = None
        if classifier is not None and answers is not None:
            classified = await self._decide(classifier, texts, answers, policy, allow_fallback, request_id)
        extractions = [
            Extraction(
                spans=[ExtractedSpan(s.label, s.start, s.end, s.text, s.confidence) for s in r.spans or []],
                truncated=truncated,
                latency_ms=latency_ms,
                cost=Cost(core_seconds=r.core_seconds),
                fallback=fallback,
            )
            for r, truncated in zip(results, truncation, strict=True)
        ]
        if self.router is not None:  # the span cascade: uncertain texts' spans from the generalist
            extractions = await self.router.decide_spans(
                extractor, extractions, policy, allow_fallback, request_id, texts
            )
        return ExtractOutcome(
            extractor.name, extractor.version, extractor.precision, extractor.labels, extractions, classified
        )

    async def embed(self, model: str, texts: Sequence[str], timeout: float | None = None) -> EmbedOutcome:
        self._check_texts(texts)
        loaded = await self._resolve(model)
        spec = loaded.specialist
        with self.statistics.request(loaded.key, len(texts)):
            # Rows without a head: the same batcher, token budget, deadlines and queue bound as Classify.
            results, truncated = await self._batched(spec, texts, None, timeout)
        vectors = np.stack([r.vector for r in results if r.vector is not None])
        return EmbedOutcome(spec.name, spec.version, vectors, truncated)


def _same_encoder(extractor: Extractor, classifier: Loaded | None) -> bool:
    return (
        classifier is not None and classifier.specialist.manifest.encoder_id == extractor.manifest.encoder_id
    )


def _extraction_route(policy: Policy | None, allow_fallback: bool) -> bool:
    """Whether the extractor answers as a fallback, on a runtime without a router (so without a
    generalist): a policy that needs one fails as the cascade fails it, unless the caller allows
    the specialist to answer instead."""
    if policy in (None, Policy.SPECIALIST_ONLY):
        return False
    if allow_fallback:
        return True
    raise FailedPrecondition(
        f"policy {policy.value} needs the generalist, but no generalist is configured on this appliance; "
        "use specialist_only or allow_fallback"
    )


def _answers(
    results: Sequence[_RowResult],
    truncation: Sequence[bool],
    labels: Sequence[str],
    k: int,
    latency_ms: float,
    rejection: Rejection | None,
) -> list[SpecialistAnswer]:
    """Classify rows' results as the specialist's answers, rejected as out of scope where the
    model's rejection threshold says so."""
    answers = []
    for result, truncated in zip(results, truncation, strict=True):
        top = [
            (labels[int(i)], float(s))
            for i, s in zip(result.ids[:k], result.scores[:k], strict=True)
            if i >= 0
        ]
        probs = None if result.probs is None else result.probs[: len(labels)]
        rejected = (
            rejection.spec.label
            if rejection is not None and top and rejection.rejects(top[0][1], result.similarity)
            else None
        )
        answers.append(SpecialistAnswer(top, probs, truncated, result.core_seconds, latency_ms, rejected))
    return answers


def _similarities(pooled: np.ndarray, work: Sequence[_Work], headed: Sequence[int]) -> dict[int, float]:
    """Classify rows' nearest-reference similarities, for the models whose rejection score uses them."""
    out = {}
    for i in headed:
        row = work[i].classify
        rejection = row.model.classifier.rejection if row is not None else None
        if rejection is None or not rejection.needs_embeddings:
            continue  # the top probability alone decides: no per-row normalisation on the hot path
        sim = rejection.similarity(l2_normalize(pooled[i : i + 1]))
        if sim is not None:
            out[i] = float(sim[0])
    return out


def encode_window(
    extractor: Extractor, texts: Sequence[str], requested_slots: Sequence[Sequence[str]]
) -> tuple[list[Encoded], list[bool]]:
    """:func:`tokenize_window` for an extractor: the same cut, offsets into the text as sent."""
    bound = extractor.encoder.config.max_length * CHARS_PER_TOKEN
    encoded = extractor.encode([text[:bound] for text in texts], requested_slots)
    return encoded, [len(text) > bound or enc.truncated for text, enc in zip(texts, encoded, strict=True)]


def tokenize_window(encoder: OnnxEncoder, texts: Sequence[str]) -> Tokenized:
    """Token ids for the encoder's window. Texts are first cut to ``CHARS_PER_TOKEN`` characters
    per window token, so a 64 KiB text costs the tokenizer no more than a window's worth; a cut
    text is reported truncated even if its cut part fits the window."""
    bound = encoder.config.max_length * CHARS_PER_TOKEN
    tokenized = encoder.tokenize([text[:bound] for text in texts])
    cut = [len(text) > bound or over for text, over in zip(texts, tokenized.truncated, strict=True)]
    return Tokenized(tokenized.ids, cut)


def _specialist_decision(answer: SpecialistAnswer) -> Decision:
    label, confidence = answer.top[0]
    return Decision(
        label=answer.rejected_as or label,
        confidence=confidence,
        top=answer.top,
        truncated=answer.truncated,
        route=Route.SPECIALIST,
        latency_ms=answer.latency_ms,
        cost=Cost(core_seconds=answer.core_seconds),
        probs=answer.probs,
    )
