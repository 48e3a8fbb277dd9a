"""Reading a labelled file (CSV, TSV, JSONL or Parquet) and validating it row by row.

CSV and JSONL are streamed line by line from a binary handle: the file is never held in memory
beyond the kept texts, and a line or field above a fixed bound is refused instead of exhausting
memory. Cell values are only ever treated as plain text.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from appliance.dataset.quality import inspect_data
from appliance.dataset.records import EXAMPLES, DataError, LabelledData

MAX_PROBLEMS = 20
# A text longer than this is almost always a broken file (an unclosed quote swallowing the rest of
# the file); the encoder reads only a few hundred tokens anyway.
MAX_FIELD_CHARS = 1 << 20
# Bounds one physical line before it is decoded. UTF-8 needs up to 4 bytes per character and JSON
# escapes widen text further, so this leaves room for a maximal field.
MAX_LINE_BYTES = 8 << 20
MIN_PER_LABEL = 2

_CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
_JSONL_SUFFIXES = {".jsonl", ".ndjson"}
_PARQUET_SUFFIXES = {".parquet", ".pq"}
SUPPORTED_SUFFIXES = tuple(sorted({*_CSV_SUFFIXES, *_JSONL_SUFFIXES, *_PARQUET_SUFFIXES}))


class _Missing:
    """A column absent from one row (a short CSV row, a JSON object without the key)."""


_MISSING = _Missing()


class _Problems:
    """Row-level problems, kept up to a cap and counted beyond it."""

    def __init__(self, path: Path, cap: int) -> None:
        self.path, self.cap = path, cap
        self.items: list[tuple[int | str | None, str]] = []
        self.total = 0

    def add(self, location: int | str | None, reason: str) -> None:
        self.total += 1
        if len(self.items) < self.cap:
            self.items.append((location, reason))

    def error(self, location: int | str | None = None, reason: str | None = None) -> DataError:
        """One DataError for everything so far, plus an optional fatal problem that ends the read."""
        if reason is not None:
            self.add(location, reason)
        first_loc, first_reason = self.items[0]
        return DataError(self.path, first_loc, first_reason, problems=self.items, total=self.total)


def load_labelled(
    path: Path | str, text_column: str, label_column: str, *, max_problems: int = MAX_PROBLEMS
) -> LabelledData:
    """Load and validate a labelled file; the format comes from the extension.

    Raises ``DataError`` for anything that would make training fail or silently go wrong. Problems
    that only deserve a look are returned in ``LabelledData.warnings``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(
            path,
            None,
            f"unsupported file type {suffix or '(no extension)'!r}; "
            f"use one of {', '.join(SUPPORTED_SUFFIXES)}",
        )
    if text_column == label_column:
        raise DataError(path, None, f"the text and label columns are both {text_column!r}")
    if not path.is_file():
        raise DataError(path, None, "no such file" if not path.exists() else "not a regular file")
    problems = _Problems(path, max_problems)
    try:
        if suffix in _CSV_SUFFIXES:
            rows: Iterator[tuple[int, object, object]] = _read_csv(
                path, text_column, label_column, problems, _CSV_SUFFIXES[suffix]
            )
        elif suffix in _JSONL_SUFFIXES:
            rows = _read_jsonl(path, text_column, label_column, problems)
        else:
            rows = _read_parquet(path, text_column, label_column, problems)
        data = _collect(path, rows, text_column, label_column, problems, suffix in _PARQUET_SUFFIXES)
    except OSError as e:
        raise DataError(path, None, f"cannot read the file: {e.strerror or e}") from e
    return validated(data)


def validated(data: LabelledData) -> LabelledData:
    """Rows that did not come from a file (a retrain's) under the checks and warnings of a loaded one."""
    _check_label_counts(data)
    return LabelledData(
        texts=data.texts,
        labels=data.labels,
        source=data.source,
        locations=data.locations,
        location_kind=data.location_kind,
        warnings=inspect_data(data),
    )


def _collect(
    path: Path,
    rows: Iterator[tuple[int, object, object]],
    text_column: str,
    label_column: str,
    problems: _Problems,
    by_row: bool,
) -> LabelledData:
    texts: list[str] = []
    labels: list[str] = []
    locations: list[int] = []
    for n, raw_text, raw_label in rows:
        loc: int | str = f"row {n}" if by_row else n
        text, text_problem = _as_text(raw_text, text_column)
        label, label_problem = _as_label(raw_label, label_column)
        for reason in (text_problem, label_problem):
            if reason:
                problems.add(loc, reason)
        if text is not None and label is not None:
            texts.append(text)
            labels.append(label)
            locations.append(n)
    if problems.total:
        raise problems.error()
    if not texts:
        raise DataError(path, None, "no data rows" + ("" if by_row else " after the header"))
    return LabelledData(texts, labels, path, locations, "row" if by_row else "line")


def _kind(value: object) -> str:
    names = {dict: "an object", list: "a list", bool: "a boolean", bytes: "binary data"}
    for t, name in names.items():
        if isinstance(value, t):
            return name
    if isinstance(value, int | float):
        return "a number"
    return f"a {type(value).__name__} value"


def _has_surrogates(s: str) -> bool:
    if s.isascii():
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _as_text(value: object, column: str) -> tuple[str | None, str | None]:
    if value is _MISSING:
        return None, f"no value for text column {column!r}"
    if value is None:
        return None, f"empty text in column {column!r}"
    if not isinstance(value, str):
        return None, f"text in column {column!r} must be a string, got {_kind(value)}"
    if not value.strip():
        return None, f"empty text in column {column!r}"
    if len(value) > MAX_FIELD_CHARS:
        return None, f"text in column {column!r} is longer than {MAX_FIELD_CHARS} characters"
    if _has_surrogates(value):
        return None, f"text in column {column!r} holds an unpaired UTF-16 surrogate"
    return value, None


def _as_label(value: object, column: str) -> tuple[str | None, str | None]:
    missing = f"missing label in column {column!r}"
    if value is _MISSING or value is None:
        return None, missing
    if isinstance(value, bool):  # before int: bool is an int subclass
        return ("true" if value else "false"), None
    if isinstance(value, int):
        return str(value), None
    if isinstance(value, float):
        if math.isnan(value):
            return None, missing
        if math.isinf(value):
            return None, f"label in column {column!r} is infinite"
        # Parquet and pandas widen integer labels with gaps to floats: 3.0 means class "3".
        return (str(int(value)) if value.is_integer() else repr(value)), None
    if not isinstance(value, str):
        return None, f"label in column {column!r} must be a string or a number, got {_kind(value)}"
    label = value.strip()
    if not label:
        return None, missing
    if "\n" in label or "\r" in label:
        return None, f"label in column {column!r} spans several lines (an unclosed quote?)"
    if len(label) > MAX_FIELD_CHARS or _has_surrogates(label):
        return None, f"label in column {column!r} is not a usable class name"
    return label, None


def _decoded_lines(path: Path, problems: _Problems) -> Iterator[str]:
    """Yield each physical line, decoded, with its ending; undecodable bytes are reported and replaced."""
    with path.open("rb") as f:
        head = f.read(4)
        if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise problems.error(None, "the file is UTF-16 encoded; save it as UTF-8")
        # Spreadsheet exports often start with a UTF-8 byte-order mark; it is not part of the header.
        f.seek(3 if head[:3] == b"\xef\xbb\xbf" else 0)
        offset = f.tell()
        lineno = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                raise problems.error(lineno, f"line is longer than {MAX_LINE_BYTES} bytes")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.add(
                    lineno,
                    f"invalid UTF-8 byte 0x{raw[e.start]:02x} at byte offset {offset + e.start} "
                    f"(column {e.start + 1} of the line); save the file as UTF-8",
                )
                line = raw.decode("utf-8", errors="replace")
            offset += len(raw)
            yield line


def _column_index(path: Path, header: list[str], column: str, role: str) -> int:
    matches = [i for i, name in enumerate(header) if name == column]
    if not matches:
        found = ", ".join(repr(h) for h in header[:30]) or "none"
        raise DataError(path, 1, f"no {role} column {column!r}; the header has: {found}")
    if len(matches) > 1:
        raise DataError(path, 1, f"the header names column {column!r} {len(matches)} times")
    return matches[0]


def _read_csv(
    path: Path, text_column: str, label_column: str, problems: _Problems, delimiter: str
) -> Iterator[tuple[int, object, object]]:
    # The default limit (128 KiB) is a process-wide setting of the csv module; fix it at our bound so
    # an oversized field fails with a located error rather than depending on whoever set it last.
    csv.field_size_limit(MAX_FIELD_CHARS)
    reader = csv.reader(_decoded_lines(path, problems), delimiter=delimiter)

    def next_row() -> list[str] | None:
        try:
            return next(reader)
        except StopIteration:
            return None
        except csv.Error as e:
            reason = str(e).split(" - do you need")[0]
            if "field larger than field limit" in reason:
                reason = f"a field is longer than {MAX_FIELD_CHARS} characters (an unclosed quote?)"
            raise problems.error(reader.line_num, f"malformed {path.suffix[1:].upper()}: {reason}") from e

    header = next_row()
    while header == []:  # blank lines before the header
        header = next_row()
    if header is None:
        if problems.total:
            raise problems.error()
        raise DataError(path, None, "the file is empty")
    header = [h.strip() for h in header]
    header_line = reader.line_num
    text_i = _column_index(path, header, text_column, "text")
    label_i = _column_index(path, header, label_column, "label")
    last_line = header_line
    while (row := next_row()) is not None:
        start, last_line = last_line + 1, reader.line_num
        if not row:
            continue
        if len(row) != len(header):
            hint = " (an unquoted delimiter or an unclosed quote?)"
            problems.add(start, f"the row has {len(row)} fields, the header has {len(header)}{hint}")
            continue
        yield start, row[text_i], row[label_i]


def _read_jsonl(
    path: Path, text_column: str, label_column: str, problems: _Problems
) -> Iterator[tuple[int, object, object]]:
    seen_text = seen_label = False
    objects = 0
    keys: dict[str, None] = {}  # insertion-ordered set, bounded below
    for lineno, line in enumerate(_decoded_lines(path, problems), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.add(lineno, f"malformed JSON at column {e.colno}: {e.msg}")
            continue
        except (ValueError, RecursionError) as e:  # integers over the digit limit; absurd nesting
            problems.add(lineno, f"malformed JSON: {str(e) or type(e).__name__}")
            continue
        if not isinstance(obj, dict):
            problems.add(lineno, f"expected a JSON object, got {_kind(obj)}")
            continue
        objects += 1
        seen_text = seen_text or text_column in obj
        seen_label = seen_label or label_column in obj
        for k in obj:
            if len(keys) < 30:
                keys.setdefault(k)
        yield lineno, obj.get(text_column, _MISSING), obj.get(label_column, _MISSING)
    if objects and not (seen_text and seen_label):
        # The key is absent everywhere: a wrong column name, not hundreds of row problems.
        missing = text_column if not seen_text else label_column
        role = "text" if not seen_text else "label"
        found = ", ".join(repr(k) for k in keys) or "none"
        raise DataError(path, None, f"no {role} column {missing!r} in any object; the keys are: {found}")
    if not objects and not problems.total:
        raise DataError(path, None, "the file is empty")


def _read_parquet(
    path: Path, text_column: str, label_column: str, problems: _Problems
) -> Iterator[tuple[int, object, object]]:
    # Imported here: only Parquet needs it.
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow_errors = (pa.ArrowException, ValueError, OverflowError, TypeError)
    try:
        pf = pq.ParquetFile(path)
        names = list(pf.schema_arrow.names)
    except arrow_errors as e:
        raise DataError(path, None, f"not a readable Parquet file: {e}") from e
    for column, role in ((text_column, "text"), (label_column, "label")):
        if column not in names:
            found = ", ".join(repr(n) for n in names[:30]) or "none"
            raise DataError(path, None, f"no {role} column {column!r}; the columns are: {found}")
    if pf.metadata.num_rows == 0:
        raise DataError(path, None, "the file has no rows")
    row = 0
    try:
        # Only the two columns are read, a batch at a time.
        for batch in pf.iter_batches(batch_size=65536, columns=[text_column, label_column]):
            texts = batch.column(text_column).to_pylist()
            labels = batch.column(label_column).to_pylist()
            for text, label in zip(texts, labels, strict=True):
                row += 1
                yield row, text, label
    except arrow_errors as e:
        raise problems.error(f"row {row + 1}", f"cannot read the Parquet data: {e}") from e


def _check_label_counts(data: LabelledData) -> None:
    counts = Counter(data.labels)
    if len(counts) < 2:
        only = next(iter(counts))
        raise DataError(data.source, None, f"every row has the label {only!r}; a classifier needs at least 2")
    rare = sorted((n, label) for label, n in counts.items() if n < MIN_PER_LABEL)
    if not rare:
        return
    first_at: dict[str, int] = {}
    for label, n in zip(data.labels, data.locations, strict=True):
        first_at.setdefault(label, n)
    shown = ", ".join(
        f"{label!r} ({n}, at {data.location(first_at[label])})" for n, label in rare[: EXAMPLES + 2]
    )
    more = f" and {len(rare) - EXAMPLES - 2} more" if len(rare) > EXAMPLES + 2 else ""
    reason = (
        f"{len(rare)} label(s) have fewer than {MIN_PER_LABEL} examples: {shown}{more}; "
        "each label needs one example to train on and one to hold out"
    )
    if len(rare) > len(counts) / 2:
        reason += "; most labels are unique, so the label column may be the wrong one"
    raise DataError(data.source, None, reason)
