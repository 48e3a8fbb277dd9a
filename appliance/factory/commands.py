"""``appliance train`` and ``appliance eval``."""

from __future__ import annotations

import argparse
import json
import math
import numbers
import sys
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError, InvalidArgument


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    train = sub.add_parser("train", help="train and publish a specialist from a labelled file")
    train.add_argument(
        "--task",
        choices=("classify", "extract"),
        default="classify",
        help="classify: a label per text; extract: labelled spans (JSONL text+spans, or DSTC8/Restaurant8k)",
    )
    train.add_argument(
        "--data", type=Path, required=True, help="CSV, TSV, JSONL or Parquet file (extract: JSONL or JSON)"
    )
    train.add_argument("--text-column", default="text")
    train.add_argument("--label-column", default="label")
    train.add_argument("--name", required=True, help="model name in the store (a-z, 0-9, _ . -)")
    train.add_argument("--mode", choices=("head", "finetune"), default="head")
    train.add_argument("--eval-data", type=Path, help="held-out file (default: a stratified 10%% split)")
    train.add_argument("--base", type=Path, help="local Hugging Face encoder folder (default: MiniLM-L6)")
    train.add_argument("--max-minutes", type=float, default=45.0, help="finetune time budget")
    train.add_argument(
        "--strategy",
        choices=("auto", "classifier", "contrastive", "cpft"),
        default="auto",
        help="finetune objective (auto: contrastive pairs at 16 or fewer examples per label, else cpft: "
        "a contrastive stage on same-label pairs, then a classifier)",
    )
    train.add_argument(
        "--finetune-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a fine-tuning recipe value, e.g. label_smoothing=0 or layer_decay=1 (repeatable)",
    )
    train.add_argument("--target-precision", type=float, default=0.99)
    train.add_argument("--few-shot", type=int, metavar="K", help="keep K examples per label")
    train.add_argument("--checkpoint-dir", type=Path, help="finetune checkpoints (resumes if present)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--oos-label",
        default="oos",
        help="rows with this label are out of scope: not a class, they calibrate rejection (default: oos)",
    )
    train.add_argument(
        "--reject-unknown",
        nargs="?",
        const="auto",
        choices=("auto", "max_prob", "max_prob_knn"),
        help="without out-of-scope rows, calibrate rejection of texts that are none of the labels on "
        "leave-labels-out folds, with this score (auto: the folds' best); max_prob_knn stores the "
        "training rows' embeddings (oos_references.npy)",
    )
    train.add_argument(
        "--demonstrations",
        action="store_true",
        help="store the training texts, labels and embeddings in the artifact (demonstrations.npz), so that "
        "escalations can show the generalist the nearest examples; off by default: the texts are data",
    )
    train.add_argument("--json", action="store_true", help="last line of stdout: one JSON object")
    train.set_defaults(func=run_train)

    ev = sub.add_parser("eval", help="evaluate a published specialist on a labelled file")
    ev.add_argument("model", help="NAME or NAME:VERSION")
    ev.add_argument("--data", type=Path, required=True)
    ev.add_argument("--text-column", help="default: the column the model was trained from (else text)")
    ev.add_argument("--label-column", help="default: the column the model was trained from (else label)")
    ev.add_argument("--json", action="store_true", help="last line of stdout: one JSON object")
    ev.set_defaults(func=run_eval)


def parse_overrides(items: list[str]) -> dict[str, float]:
    """``KEY=VALUE`` pairs as numbers; which keys exist is the fine-tune's to say."""
    overrides: dict[str, float] = {}
    for item in items:
        key, sep, value = (part.strip() for part in item.partition("="))
        try:
            number = float(value)
        except ValueError:
            number = None
        if not (key and sep) or number is None:
            raise InvalidArgument(f"--finetune-set {item!r}: expected KEY=NUMBER")
        overrides[key] = number
    return overrides


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None: strict JSON parsers (jq, browsers) reject them.

    NaN is what a metric reads when it has nothing to measure, e.g. the precision at a threshold
    that no decision reaches.
    """
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    return value


def _emit(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(_finite(result), default=float, allow_nan=False))
        return
    for key, value in result.items():
        if not isinstance(value, dict | list):
            print(f"{key:>24}: {value}")


def run_train(args: argparse.Namespace) -> int:
    from appliance.factory.pipeline import TrainSpec, train
    from appliance.security.signing import require_signing_box

    try:
        require_signing_box()  # before minutes of training whose result could not be published
    except ApplianceError as exc:
        return _fail(exc)
    if args.task == "extract":
        return _run_train_extractor(args)
    try:
        finetune_overrides = parse_overrides(args.finetune_set)
    except InvalidArgument as exc:
        return _fail(exc)
    spec = TrainSpec(
        data=args.data,
        text_column=args.text_column,
        label_column=args.label_column,
        name=args.name,
        mode=args.mode,
        eval_data=args.eval_data,
        base=args.base,
        max_minutes=args.max_minutes,
        target_precision=args.target_precision,
        few_shot=args.few_shot,
        checkpoint_dir=args.checkpoint_dir,
        finetune_strategy=args.strategy,
        finetune_overrides=finetune_overrides,
        seed=args.seed,
        oos_label=args.oos_label,
        reject_unknown=args.reject_unknown,
        demonstrations=args.demonstrations,
    )
    try:
        result = train(spec, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (ApplianceError, ValueError, OSError) as exc:
        return _fail(exc)
    _emit(result.summary(), args.json)
    return 0


def _run_train_extractor(args: argparse.Namespace) -> int:
    from appliance.factory.extract import ExtractSpec, train_extractor

    spec = ExtractSpec(
        data=args.data,
        name=args.name,
        mode=args.mode,
        eval_data=args.eval_data,
        base=args.base,
        max_minutes=args.max_minutes,
        target_precision=args.target_precision,
        checkpoint_dir=args.checkpoint_dir,
        seed=args.seed,
    )
    try:
        result = train_extractor(spec, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (ApplianceError, ValueError, OSError) as exc:
        return _fail(exc)
    _emit(result.summary(), args.json)
    return 0


def _run_eval_extractor(args: argparse.Namespace) -> int:
    from appliance.dataset import load_spans
    from appliance.factory.extract import load_tagger
    from appliance.factory.extract_eval import evaluate_spans, precision_at

    try:
        manifest, tagger = load_tagger(args.model)
        data = load_spans(args.data)
    except (ApplianceError, ValueError, OSError) as exc:
        return _fail(exc)
    spec = manifest.spec
    spans, confidences, truncated = tagger.predict(data.texts, [e.requested_slots for e in data.examples])
    gold = [e.spans for e in data.examples]
    report = evaluate_spans(spans, gold, confidences, tagger.labels, spec.calibration.target_precision)
    threshold = spec.calibration.threshold
    coverage, precision = precision_at(spans, gold, threshold)
    result = {
        "model": f"{manifest.name}:{manifest.version}",
        "kind": spec.kind,
        "n": report.n_texts,
        "micro_precision": report.micro.precision,
        "micro_recall": report.micro.recall,
        "micro_f1": report.micro.f1,
        "exact_texts": report.exact_texts,
        "per_slot": {k: v.model_dump() for k, v in report.per_slot.items()},
        "threshold": threshold,
        "span_coverage_at_threshold": coverage,
        "precision_at_threshold": precision,
        "text_coverage_at_threshold": sum(c >= threshold for c in confidences) / max(1, len(confidences)),
        "precision": spec.precision,
        "truncated": int(sum(truncated)),
        "boundary_errors": report.boundary_errors[:5],
    }
    _emit(result, args.json)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import numpy as np

    from appliance.dataset import load_labelled
    from appliance.engines.specialist import load_specialist
    from appliance.factory.evaluate import evaluate, precision_at, rejection_scores
    from appliance.factory.pipeline import split_out
    from appliance.store import ModelStore

    try:
        if ModelStore().load(args.model).spec.kind == "span_extractor":
            return _run_eval_extractor(args)
        model = load_specialist(args.model)
        trained = model.spec.columns  # None for models published before columns were recorded
        text_column = args.text_column or (trained.text if trained else "text")
        label_column = args.label_column or (trained.label if trained else "label")
        data = load_labelled(args.data, text_column, label_column)
    except (ApplianceError, ValueError, OSError) as exc:
        return _fail(exc)
    oos = model.spec.oos
    oos_texts: list[str] = []
    if oos is not None:
        data, oos_texts = split_out(data, oos.label)
    index = {label: i for i, label in enumerate(model.labels)}
    unknown = sorted(set(data.labels) - set(index))
    if unknown:
        return _fail(ValueError(f"{args.data}: labels unknown to {model.name}: {unknown[:5]}"))
    y = np.array([index[x] for x in data.labels])
    probs, in_score, truncated = model.scored(data.texts)
    report = evaluate(probs, y, model.labels)
    rejection = {}
    if oos is not None and oos_texts and in_score is not None:
        _, oos_score, oos_truncated = model.scored(oos_texts)
        assert oos_score is not None  # the same model: it has a rejection
        truncated = [*truncated, *oos_truncated]
        rejection = {"oos_label": oos.label, "oos_threshold": oos.threshold, "n_oos": len(oos_texts)}
        rejection |= {"oos_score": oos.score} | rejection_scores(probs, y, in_score, oos_score, oos.threshold)
    coverage, precision = precision_at(probs, y, model.threshold)
    result = {
        "model": f"{model.name}:{model.version}",
        "n": report.n,
        "accuracy": report.accuracy,
        "macro_f1": report.macro_f1,
        "ece": report.ece,
        "threshold": model.threshold,
        "coverage_at_threshold": coverage,
        "precision_at_threshold": precision,
        "precision": model.precision,
        "truncated": int(sum(truncated)),
        **rejection,
        "confused_pairs": report.confused_pairs[:5],
    }
    _emit(result, args.json)
    return 0
