"""``appliance feedback correct|import|export|queue`` and ``appliance retrain``.

``correct`` and ``import`` go through the running appliance (FeedbackService.Correct: scoped,
audited, durable before the answer); ``queue`` and ``export`` read the escalation database
without writing, as ``appliance report`` does; ``retrain`` trains here, on this box's stores.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from appliance.config import appliance_home
from appliance.errors import ApplianceError, InvalidArgument
from appliance.router.escalations import EscalationStore, database_path

IMPORT_BATCH = 500  # corrections per call (the server takes at most 1,000)
DEFAULT_QUEUE_MARGIN = 0.2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    feedback = sub.add_parser("feedback", help="corrections of decisions, and the review queue")
    fsub = feedback.add_subparsers(dest="feedback_command", required=True)

    correct = fsub.add_parser("correct", help="correct one decision (through the running appliance)")
    correct.add_argument("--model", required=True, help="the model whose decision it was")
    target = correct.add_mutually_exclusive_group(required=True)
    target.add_argument("--escalation", metavar="ID", help="the decision's escalation id")
    target.add_argument("--request", metavar="ID", help="the request id of the call that got it")
    correct.add_argument("--item", type=int, default=0, help="the text's position in that request (from 0)")
    what = correct.add_mutually_exclusive_group(required=True)
    what.add_argument("--label", help="the right label")
    what.add_argument("--spans", help='the right spans, JSON: [{"label": ..., "start": ..., "end": ...}]')
    correct.add_argument("--source", required=True, help="human:<name>, review-queue, or a model's name")
    _server_options(correct)
    correct.set_defaults(func=run_correct)

    imp = fsub.add_parser("import", help="send a filled-in review queue (CSV or JSON lines) as corrections")
    imp.add_argument("file", type=Path)
    imp.add_argument("--format", choices=("csv", "jsonl"), help="default: from the file's extension")
    _server_options(imp)
    imp.set_defaults(func=run_import)

    queue = fsub.add_parser(
        "queue", help="the decisions most worth a person's look, least sure first, as CSV or JSON lines"
    )
    queue.add_argument("model", metavar="NAME")
    queue.add_argument("-o", "--output", type=Path, required=True, help="file to write (.csv or .jsonl)")
    queue.add_argument("--format", choices=("csv", "jsonl"))
    queue.add_argument("--limit", type=int, default=200, help="rows at most (default: %(default)s)")
    queue.add_argument(
        "--max-margin",
        type=float,
        default=DEFAULT_QUEUE_MARGIN,
        help="specialist answers with a top-1 minus top-2 score below this are included, as are all "
        "escalations (default: %(default)s)",
    )
    queue.add_argument("--since", metavar="ISO", help="only decisions from this time on")
    _db_option(queue)
    queue.set_defaults(func=run_queue)

    export = fsub.add_parser("export", help="the recorded corrections, as CSV or JSON lines")
    export.add_argument("-o", "--output", type=Path, required=True)
    export.add_argument("--format", choices=("csv", "jsonl"))
    export.add_argument("--model", metavar="NAME")
    export.add_argument("--since", metavar="ISO")
    _db_option(export)
    export.set_defaults(func=run_export)

    retrain = sub.add_parser(
        "retrain", help="train a challenger from the champion's data and the corrections (not served)"
    )
    retrain.add_argument("model", metavar="NAME")
    retrain.add_argument("--since", metavar="ISO", help="only corrections and escalations from this time on")
    retrain.add_argument(
        "--include-generalist-labels",
        type=float,
        metavar="MIN_CONFIDENCE",
        help="also train on the generalist's answers to escalations at or above this confidence (off by "
        "default)",
    )
    retrain.add_argument("--max-minutes", type=float, help="fine-tune time budget (default: 45)")
    retrain.add_argument("--base", type=Path, help="the champion's base encoder folder (default: packaged)")
    retrain.add_argument("--json", action="store_true", help="print the report as one JSON object")
    _db_option(retrain)
    retrain.set_defaults(func=run_retrain)


def _server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-new-label", action="store_true", help="accept a label the model lacks")
    parser.add_argument("--address", help="host:port (default: the local appliance)")
    parser.add_argument("--json", action="store_true")


def _db_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db", type=Path, help="escalation database (default: $APPLIANCE_HOME/escalations/escalations.db)"
    )


def _since(ns: argparse.Namespace) -> float | None:
    from appliance.router.commands import parse_time

    return parse_time(ns.since).timestamp() if ns.since else None


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


# ---------------------------------------------------------------------------- through the server


def _send(ns: argparse.Namespace, model: str, corrections: list[Any]) -> Iterator[Any]:
    from appliance.client import Client, Connection

    with Client(Connection.discover(address=ns.address)) as client:
        for start in range(0, len(corrections), IMPORT_BATCH):
            chunk = corrections[start : start + IMPORT_BATCH]
            yield from client.correct(model, chunk, allow_new_label=ns.allow_new_label).results


def _result_json(model: str, result: Any) -> dict[str, Any]:
    return {
        "id": result.id,
        "model": f"{model}:{result.version}",
        "duplicate": result.duplicate,
        "trainable": result.trainable,
        "note": result.note,
    }


def run_correct(ns: argparse.Namespace) -> int:
    from appliance._proto.appliance.v1 import appliance_pb2 as pb

    try:
        spans = [pb.CorrectedSpan(**s) for s in json.loads(ns.spans)] if ns.spans else []
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        return _fail(f"--spans: expected a JSON list of {{label, start, end}} ({exc})")
    correction = pb.Correction(
        escalation_id=ns.escalation or "",
        request_id=ns.request or "",
        item=ns.item,
        label=ns.label or "",
        spans=spans,
        source=ns.source,
    )
    try:
        [result] = list(_send(ns, ns.model, [correction]))
    except grpc.RpcError as exc:
        return _fail(f"{exc.code().name}: {exc.details()}", 1)
    row = _result_json(ns.model, result)
    if ns.json:
        print(json.dumps(row))
    else:
        state = "already recorded" if result.duplicate else "recorded"
        print(
            f"correction {result.id} {state} for {row['model']}"
            + (f" ({result.note})" if result.note else "")
        )
    return 0


def run_import(ns: argparse.Namespace) -> int:
    from appliance._proto.appliance.v1 import appliance_pb2 as pb
    from appliance.feedback.queue import read_filled

    try:
        filled = list(read_filled(ns.file, ns.format))
    except (ApplianceError, OSError, json.JSONDecodeError) as exc:
        return _fail(str(exc))
    by_model: dict[str, list[Any]] = {}
    for row in filled:
        if not row.model:
            return _fail(f"{ns.file}:{row.line}: no model named")
        r = row.request
        by_model.setdefault(row.model, []).append(
            pb.Correction(
                escalation_id=r.escalation_id,
                request_id=r.request_id,
                item=r.item,
                label=r.label or "",
                source=r.source,
            )
        )
    counts = {"recorded": 0, "duplicates": 0, "untrainable": 0}
    try:
        for model, corrections in by_model.items():
            for result in _send(ns, model, corrections):
                counts["duplicates" if result.duplicate else "recorded"] += 1
                counts["untrainable"] += int(not result.trainable)
    except grpc.RpcError as exc:
        return _fail(f"{exc.code().name}: {exc.details()} (the rows before it are recorded)", 1)
    if ns.json:
        print(json.dumps(counts))
    else:
        print(
            f"{counts['recorded']} corrections recorded, {counts['duplicates']} already were; "
            f"{counts['untrainable']} without a kept text (recorded, cannot train)"
        )
    return 0


# ---------------------------------------------------------------------------- reading the database


def run_queue(ns: argparse.Namespace) -> int:
    from appliance.feedback.queue import pick, write_queue

    if ns.limit < 1:
        return _fail("--limit must be at least 1")
    try:
        store = EscalationStore.reader(ns.db or database_path(appliance_home()))
        queue = pick(store.iter_review_candidates(ns.model, ns.max_margin, _since(ns)), ns.limit)
        written = write_queue(ns.output, queue, ns.format)
    except (ApplianceError, OSError) as exc:
        return _fail(str(exc))
    print(
        f"{written} decisions of {ns.model} to review in {ns.output}; left out: {queue.duplicates} "
        f"near-duplicates, {queue.without_text} without a kept text (store_texts off)",
        file=sys.stderr,
    )
    return 0


def run_export(ns: argparse.Namespace) -> int:
    from appliance.feedback.queue import write_corrections

    try:
        store = EscalationStore.reader(ns.db or database_path(appliance_home()))
        written = write_corrections(ns.output, store.iter_corrections(ns.model, _since(ns)), ns.format)
    except (ApplianceError, OSError) as exc:
        return _fail(str(exc))
    print(f"{written} corrections written to {ns.output}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- retrain


def run_retrain(ns: argparse.Namespace) -> int:
    from appliance.factory.retrain import RetrainSpec, retrain

    if ns.include_generalist_labels is not None and not 0.0 < ns.include_generalist_labels <= 1.0:
        return _fail("--include-generalist-labels takes a confidence in (0, 1]")
    try:
        spec = RetrainSpec(
            name=ns.model,
            since=_since(ns),
            generalist_min_confidence=ns.include_generalist_labels,
            max_minutes=ns.max_minutes,
            base=ns.base,
        )
        done = retrain(spec, progress=lambda m: print(m, file=sys.stderr, flush=True), escalations=ns.db)
    except (ApplianceError, InvalidArgument) as exc:
        return _fail(f"{type(exc).__name__}: {exc}", 1)
    summary = done.summary()
    if ns.json:
        print(json.dumps(summary, default=str))
        return 0
    challenger = summary["challenger"]
    print(
        f"challenger {challenger['model']} published (stage: challenger); {summary['serving']} still serves"
    )
    print(
        f"trained on {summary['training_rows']} rows: {summary['corrections_used']} corrections, "
        f"{summary['distilled']} generalist labels; golden accuracy {challenger.get('accuracy')} "
        f"(champion {summary['champion_metrics'].get('accuracy')})"
    )
    for note in summary["notes"]:
        print(f"note: {note}")
    return 0
