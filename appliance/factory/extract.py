"""The extractor factory: span-labelled file in, published, F1-gated span extractor out.

validate → (fine-tune the encoder) → export ONNX (``pooled`` and ``states``) → int8 → token states
→ fit the token head → evaluate both precisions on held-out spans → gate int8 on micro F1 →
calibrate the span threshold → model card → publish with a ``span_extractor`` manifest.

The encoder artifacts are the classifiers' (:func:`appliance.factory.pipeline.base_encoders`), so an
extractor and a classifier on the same base share one encoder in the store and on the server.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from appliance.artifact.manifest import (
    SCHEMA_VERSION,
    BaseEncoderRef,
    EncoderRef,
    ExtractorInfo,
    Lineage,
    Quantization,
    SpanFormat,
    SpecialistFields,
    TaggerInfo,
    TrainedFrom,
    TrainingData,
)
from appliance.artifact.spans import (
    Encoded,
    Span,
    TokenHead,
    bio_targets,
    decode_spans,
    encode_many,
    tag_names,
    text_confidence,
)
from appliance.dataset import DataError, DataWarning
from appliance.dataset.spans import SpanData, fingerprint_spans, load_spans, window_warnings
from appliance.datasets.store import DatasetStore
from appliance.engines.encoder import EncoderConfig, OnnxEncoder
from appliance.errors import InvalidArgument
from appliance.factory import card
from appliance.factory.extract_eval import SpanReport, evaluate_spans
from appliance.factory.pipeline import (
    INT8_MAX_DROP_POINTS,
    Progress,
    _check_base,
    _store_exported,
    _window,
    base_encoders,
    default_base,
    gate,
)
from appliance.store import Manifest, ModelStore, folder_digest, hash_files, validate_name

log = logging.getLogger(__name__)

# L2 penalty of the token head (per token, on raw last hidden states): weak, as for the classifier's head.
HEAD_L2 = 1e-4
HEAD_MAX_ITER = 300


@dataclass
class ExtractSpec:
    data: Path
    name: str
    mode: Literal["head", "finetune"] = "head"
    eval_data: Path | None = None
    base: Path | None = None
    max_minutes: float = 45.0
    target_precision: float = 0.99
    heldout_fraction: float = 0.1
    seed: int = 0
    default_policy: Literal["cascade", "specialist_only", "generalist_only"] = "cascade"
    checkpoint_dir: Path | None = None
    max_steps: int | None = None  # caps the fine-tuning plan (short, deterministic runs)
    limit: int | None = None  # keep the first N training examples (small experiments, tests)


@dataclass
class ExtractResult:
    manifest: Manifest
    report: SpanReport
    warnings: list[DataWarning]
    timings: dict[str, float]

    def summary(self) -> dict[str, Any]:
        return {
            "model": f"{self.manifest.name}:{self.manifest.version}",
            "kind": "span_extractor",
            "path": str(self.manifest.folder),
            "precision": self.manifest.spec.precision,
            **self.report.summary(),
            "per_slot": {k: v.model_dump() for k, v in self.report.per_slot.items()},
            "boundary_errors": self.report.boundary_errors[:5],
            "quantization": self.manifest.spec.quantization.model_dump(),
            "warnings": [w.message for w in self.warnings],
            "timings_s": self.timings,
        }


class SpanTagger:
    """An encoder plus a token head: texts in, spans out. Used to evaluate before and after publishing."""

    def __init__(self, encoder: OnnxEncoder, head: TokenHead, labels: Sequence[str], uses_context: bool):
        self.encoder, self.head, self.labels, self.uses_context = encoder, head, list(labels), uses_context

    def encode(self, texts: Sequence[str], requested_slots: Sequence[Sequence[str]] | None) -> list[Encoded]:
        slots = requested_slots if self.uses_context and requested_slots is not None else None
        return encode_many(self.encoder.tokenizer, texts, slots, self.encoder.config.max_length)

    def predict(
        self, texts: Sequence[str], requested_slots: Sequence[Sequence[str]] | None = None
    ) -> tuple[list[list[Span]], list[float], list[bool]]:
        """Spans, text confidences and truncation flags, one per text."""
        encoded = self.encode(texts, requested_slots)
        spans, confidences = [], []
        for text, enc, states in zip(texts, encoded, token_states(self.encoder, encoded), strict=True):
            probs = self.head.probs(states)
            spans.append(decode_spans(probs, enc.offsets, text, self.labels))
            confidences.append(text_confidence(probs, enc.offsets))
        return spans, confidences, [e.truncated for e in encoded]

    def evaluate(self, data: SpanData, target_precision: float) -> SpanReport:
        spans, confidences, _ = self.predict(data.texts, [e.requested_slots for e in data.examples])
        gold = [e.spans for e in data.examples]
        return evaluate_spans(spans, gold, confidences, self.labels, target_precision)


def token_states(encoder: OnnxEncoder, encoded: Sequence[Encoded]) -> list[np.ndarray]:
    """Each text's last hidden states ``[T, D]``, in batches sorted by length."""
    out: list[np.ndarray] = [np.empty(0)] * len(encoded)
    for batch in encoder.plan_batches([len(e) for e in encoded]):
        for i, states in zip(batch, encoder.run_states([encoded[i].ids for i in batch]), strict=True):
            out[i] = states
    return out


def fit_token_head(
    states: Sequence[np.ndarray], targets: Sequence[np.ndarray], n_tags: int, seed: int = 0
) -> TokenHead:
    """Softmax regression over every text word piece (targets < 0 are skipped), full-batch L-BFGS."""
    import torch

    x = np.concatenate([s[t >= 0] for s, t in zip(states, targets, strict=True)])
    y = np.concatenate([t[t >= 0] for t in targets])
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))
    weight = torch.zeros(n_tags, x.shape[1], requires_grad=True)
    bias = torch.zeros(n_tags, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=HEAD_MAX_ITER, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ weight.T + bias, yt) + HEAD_L2 * (weight**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return TokenHead(weight.detach().numpy().astype(np.float32), bias.detach().numpy().astype(np.float32))


def targets_for(data: SpanData, encoded: Sequence[Encoded], labels: Sequence[str]) -> list[np.ndarray]:
    """BIO tag ids per word piece; -1 for special and context pieces (not trained on)."""
    out = []
    for example, enc in zip(data.examples, encoded, strict=True):
        tags = bio_targets(enc.offsets, example.spans, labels)
        tags[enc.offsets[:, 0] < 0] = -1
        out.append(tags)
    return out


def split_spans(data: SpanData, fraction: float, seed: int) -> tuple[SpanData, SpanData]:
    """A seeded random hold-out of about ``fraction`` of the texts (at least one on each side)."""
    n = len(data)
    if n < 2:
        raise DataError(data.source, None, "at least 2 examples are needed to hold one out")
    order = np.random.default_rng([seed, 0x5BA]).permutation(n)
    k = min(max(1, round(n * fraction)), n - 1)
    held = sorted(order[:k].tolist())
    train = sorted(order[k:].tolist())
    return data.subset(train), data.subset(held)


def _load_sets(spec: ExtractSpec, progress: Progress) -> tuple[SpanData, SpanData, str]:
    progress(f"validating {spec.data}")
    train = load_spans(spec.data)
    if spec.limit:
        train = SpanData(train.examples[: spec.limit], train.source, train.format, train.warnings)
    if spec.eval_data is None:
        return *split_spans(
            train, spec.heldout_fraction, spec.seed
        ), f"random {spec.heldout_fraction:.0%} split"
    heldout = load_spans(spec.eval_data)
    unknown = sorted(set(heldout.label_names) - set(train.label_names))
    if unknown:
        raise DataError(
            spec.eval_data, None, f"evaluation slots absent from the training data: {unknown[:5]}"
        )
    return SpanData(train.examples, train.source, train.format, train.warnings), heldout, "eval file"


def train_extractor(
    spec: ExtractSpec, store: ModelStore | None = None, progress: Progress = log.info
) -> ExtractResult:
    store = store or ModelStore()
    validate_name(spec.name)
    if spec.mode not in ("head", "finetune"):
        raise InvalidArgument(f"unknown mode {spec.mode!r}: use head or finetune")
    if not 0.0 < spec.target_precision <= 1.0:
        raise InvalidArgument(f"target precision {spec.target_precision}: must be in (0, 1]")
    timings: dict[str, float] = {}
    started = time.perf_counter()
    base = _check_base(spec.base or default_base())
    window = _window(base)
    train_set, heldout, heldout_source = _load_sets(spec, progress)
    labels = train_set.label_names
    tags = tag_names(labels)
    uses_context = train_set.uses_context
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    warnings = [*train_set.warnings, *window_warnings(train_set, tokenizer, window)]
    for w in warnings:
        progress(f"warning: {w.message}")
    timings["validate"] = time.perf_counter() - started

    t = time.perf_counter()
    finetune_summary: dict[str, Any] | None = None
    if spec.mode == "head":
        encoders = base_encoders(store, base, progress)
    else:
        from appliance.factory.extract_finetune import finetune_token_encoder

        tuned = finetune_token_encoder(spec, base, train_set, labels, window, uses_context, progress)
        finetune_summary = tuned.summary
        encoders = _store_exported(store, base, folder_digest(hash_files(base)), encoder=tuned.encoder)
    timings["encoder"] = time.perf_counter() - t

    t = time.perf_counter()
    config = EncoderConfig(max_length=window)
    sessions = {
        p: OnnxEncoder(store.encoder_folder(encoders[p]), "model.onnx", config) for p in ("fp32", "int8")
    }
    progress(f"token states of {len(train_set)} training texts; fitting the token head over {len(tags)} tags")
    slots = [e.requested_slots for e in train_set.examples] if uses_context else None
    encoded = encode_many(sessions["fp32"].tokenizer, train_set.texts, slots, window)
    head = fit_token_head(
        token_states(sessions["fp32"], encoded), targets_for(train_set, encoded, labels), len(tags)
    )
    timings["head"] = time.perf_counter() - t

    t = time.perf_counter()
    progress(f"evaluating on {len(heldout)} held-out texts (fp32 and int8)")
    reports = {
        p: SpanTagger(session, head, labels, uses_context).evaluate(heldout, spec.target_precision)
        for p, session in sessions.items()
    }
    timings["evaluate"] = time.perf_counter() - t
    precision, reason = gate(reports["fp32"].f1, reports["int8"].f1)
    reason = reason.replace("held-out accuracy", "held-out span F1")
    quantization = Quantization(
        metric="span_f1",
        fp32_accuracy=reports["fp32"].f1,
        int8_accuracy=reports["int8"].f1,
        drop_points=100.0 * (reports["fp32"].f1 - reports["int8"].f1),
        max_drop_points=INT8_MAX_DROP_POINTS,
        decision=precision,
        reason=reason,
    )
    report = reports[precision]
    progress(f"held-out span F1 {report.f1:.4f} ({precision}); {reason}")

    train_fp = fingerprint_spans(train_set)
    published = store.versions(spec.name)
    # Kept inside the perimeter, so that a retrain never needs the original files.
    datasets = DatasetStore(store.home)
    train_ref = datasets.put(train_set.examples, name=spec.name, role="train", kind="extract")
    golden_ref = datasets.put(heldout.examples, name=spec.name, role="golden", kind="extract")
    fields = SpecialistFields(
        kind="span_extractor",
        schema_version=SCHEMA_VERSION,
        mode=spec.mode,
        labels=labels,
        encoder=EncoderRef(
            id=encoders[precision], precision=precision, window=window, dim=sessions["fp32"].dim
        ),
        encoders=encoders,
        base_encoder=BaseEncoderRef(name=base.name, sha256=folder_digest(hash_files(base))),
        precision=precision,
        metrics={k: v for k, v in report.summary().items() if isinstance(v, int | float)},
        calibration=report.calibration,
        quantization=quantization,
        default_policy=spec.default_policy,
        finetune=finetune_summary,
        data=TrainingData(train=train_fp, heldout=fingerprint_spans(heldout), heldout_source=heldout_source),
        lineage=Lineage(
            parent_version=published[-1] if published else None,
            trained_from=TrainedFrom(fingerprint=str(train_fp["sha256"]), source=spec.data.name),
            train_dataset=train_ref.digest,
            golden_dataset=golden_ref.digest,
        ),
        extractor=ExtractorInfo(
            tagger=TaggerInfo(tags=tags),
            uses_context=uses_context,
            micro=report.micro,
            per_slot=report.per_slot,
            trained_format=SpanFormat(format=train_set.format),
        ),
    )
    timings["total"] = time.perf_counter() - started
    with store.staging(spec.name) as stage:
        head.save(stage.folder)
        (stage.folder / "report.json").write_text(json.dumps(report.to_dict(), indent=2, default=float))
        (stage.folder / card.CARD_FILE).write_text(
            card.render_extractor(spec, fields, report, warnings, timings)
        )
        manifest = stage.commit(fields.model_dump())
    progress(f"published {manifest.name}:{manifest.version} at {manifest.folder}")
    return ExtractResult(manifest, report, warnings, timings)


def load_tagger(ref: str, store: ModelStore | None = None) -> tuple[Manifest, SpanTagger]:
    """A published extractor, verified, ready to predict offline."""
    store = store or ModelStore()
    manifest = store.load(ref)
    spec = manifest.spec
    if spec.extractor is None:
        raise InvalidArgument(f"{manifest.name}:{manifest.version} is a {spec.kind}, not a span_extractor")
    encoder = OnnxEncoder(
        store.encoder_folder(spec.encoder.id), "model.onnx", EncoderConfig(max_length=spec.encoder.window)
    )
    head = TokenHead.load(manifest.folder, spec.extractor.tagger.file)
    return manifest, SpanTagger(encoder, head, spec.labels, spec.extractor.uses_context)
