"""The review queue: decisions most worth a person's look, out as CSV or JSON lines, and back in.

``write_queue`` picks a model's escalations and low-margin decisions not yet corrected, least sure
first, one per near-duplicate text (the same words, whatever the case, spacing or punctuation), and
writes them with an empty ``corrected_label`` column. A reviewer fills that column in (and
``source``, else ``review-queue``) and ``read_filled`` turns the filled rows back into correction
requests; rows left empty are skipped. Cells a spreadsheet would run as formulas are escaped.
"""

from __future__ import annotations

import csv
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.dataset.quality import escape_csv_cell, is_formula_like
from appliance.errors import InvalidArgument
from appliance.router.escalations import Correction, CorrectionRequest, ReviewCandidate

QUEUE_COLUMNS = (
    "model", "model_version", "escalation_id", "request_id", "item", "route", "served_label",
    "confidence", "margin", "text", "corrected_label", "source",
)  # fmt: skip
CORRECTION_COLUMNS = (
    "id", "model", "model_version", "escalation_id", "request_id", "route", "served_label", "label",
    "spans", "source", "created_epoch", "text",
)  # fmt: skip
DEFAULT_SOURCE = "review-queue"
_WORDS = re.compile(r"\w+")


def near_duplicate_key(text: str) -> str:
    """The same words in the same order, whatever the case, accents' encoding, spacing or punctuation."""
    return " ".join(_WORDS.findall(unicodedata.normalize("NFKC", text).casefold()))


@dataclass(frozen=True)
class Queue:
    rows: list[ReviewCandidate]
    without_text: int  # candidates left out: their text was not kept, so no one can review them
    duplicates: int  # candidates left out as near-duplicates of a less sure one


def pick(candidates: Iterable[ReviewCandidate], limit: int) -> Queue:
    """Least sure first (``candidates`` come so), one per near-duplicate, at most ``limit``."""
    seen: set[str] = set()
    rows: list[ReviewCandidate] = []
    without_text = duplicates = 0
    for c in candidates:
        if c.text is None:
            without_text += 1
            continue
        key = near_duplicate_key(c.text)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        if len(rows) < limit:
            rows.append(c)
    return Queue(rows, without_text, duplicates)


def _format(path: Path, fmt: str | None) -> str:
    chosen = fmt or ("jsonl" if path.suffix.lower() in (".jsonl", ".json", ".ndjson") else "csv")
    if chosen not in ("csv", "jsonl"):
        raise InvalidArgument(f"format {chosen!r}: use csv or jsonl")
    return chosen


def _write(
    path: Path, columns: Sequence[str], records: Iterable[Mapping[str, object]], fmt: str | None
) -> int:
    chosen = _format(path, fmt)
    n = 0
    with path.open("w", newline="", encoding="utf-8") as handle:
        if chosen == "jsonl":
            for record in records:
                handle.write(json.dumps({c: record.get(c) for c in columns}, ensure_ascii=False) + "\n")
                n += 1
            return n
        writer = csv.writer(handle)
        writer.writerow(columns)
        for record in records:
            writer.writerow([_cell(record.get(c)) for c in columns])
            n += 1
    return n


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}"
    return escape_csv_cell(str(value))


def write_queue(path: Path, queue: Queue, fmt: str | None = None) -> int:
    records = (
        {
            "model": c.model,
            "model_version": c.model_version,
            "escalation_id": c.escalation_id or "",
            "request_id": c.request_id,
            "item": c.item,
            "route": c.route,
            "served_label": c.served_label,
            "confidence": c.confidence,
            "margin": c.margin,
            "text": c.text,
            "corrected_label": "",
            "source": "",
        }
        for c in queue.rows
    )
    return _write(path, QUEUE_COLUMNS, records, fmt)


def write_corrections(path: Path, corrections: Iterable[Correction], fmt: str | None = None) -> int:
    records = (
        {
            "id": c.id,
            "model": c.model,
            "model_version": c.model_version,
            "escalation_id": c.escalation_id or "",
            "request_id": c.request_id,
            "route": c.route,
            "served_label": c.served_label,
            "label": c.label,
            "spans": None if c.spans is None else json.dumps([s.__dict__ for s in c.spans]),
            "source": c.source,
            "created_epoch": c.created_epoch,
            "text": c.text,
        }
        for c in corrections
    )
    return _write(path, CORRECTION_COLUMNS, records, fmt)


@dataclass(frozen=True)
class FilledRow:
    line: int  # 1-based line of the file (CSV: the header is line 1)
    model: str
    request: CorrectionRequest


def read_filled(path: Path, fmt: str | None = None) -> Iterator[FilledRow]:
    """The rows a reviewer gave a ``corrected_label``, as correction requests."""
    chosen = _format(path, fmt)
    with path.open(newline="", encoding="utf-8-sig") as handle:
        if chosen == "jsonl":
            records: Iterable[tuple[int, dict[str, object]]] = (
                (n, json.loads(line)) for n, line in enumerate(handle, 1) if line.strip()
            )
        else:
            records = ((n, row) for n, row in enumerate(csv.DictReader(handle), 2))
        for line, record in records:
            if not isinstance(record, dict):
                raise InvalidArgument(f"{path}:{line}: expected an object with the queue's columns")
            label = _unescape(str(record.get("corrected_label") or "").strip())
            if not label:
                continue
            yield FilledRow(line, str(record.get("model") or ""), _request(path, line, record, label))


def _unescape(cell: str) -> str:
    """Undo :func:`escape_csv_cell`'s leading quote on a formula-like cell."""
    return cell[1:] if cell.startswith("'") and is_formula_like(cell[1:]) else cell


def _request(path: Path, line: int, record: dict[str, object], label: str) -> CorrectionRequest:
    escalation_id = str(record.get("escalation_id") or "").strip()
    request_id = str(record.get("request_id") or "").strip()
    item = str(record.get("item") if record.get("item") is not None else "").strip()
    if not escalation_id and not (request_id and item.isdigit()):
        raise InvalidArgument(
            f"{path}:{line}: names no decision (an escalation_id, or a request_id and item)"
        )
    return CorrectionRequest(
        source=str(record.get("source") or "").strip() or DEFAULT_SOURCE,
        escalation_id=escalation_id,
        request_id="" if escalation_id else _unescape(request_id),
        item=int(item) if item.isdigit() else 0,
        model=str(record.get("model") or ""),
        label=label,
    )
