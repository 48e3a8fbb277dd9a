"""Span-labelled data for extractors: reading, validation and warnings.

Two formats, told apart by their objects:

- ``spans_jsonl``: JSON lines ``{"text": ..., "spans": [{"label", "start", "end"}]}``, character
  offsets into the text, end exclusive;
- ``dstc8`` (Restaurant8k): ``{"userInput": {"text"}, "labels": [{"slot", "valueSpan":
  {"startIndex", "endIndex"}}], "context": {"requestedSlots": [...]}}``, one object per line or one
  JSON array of them; a missing ``startIndex`` means 0.

Every problem is located by the line its object starts on and reported together in one
``DataError``; warnings (spans that cut a word, texts past the model window) come back with the data.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from appliance.artifact.spans import Span, encode_many
from appliance.dataset.reading import MAX_PROBLEMS, MIN_PER_LABEL, _as_text, _decoded_lines, _kind, _Problems
from appliance.dataset.records import EXAMPLES, DataError, DataWarning, normalized

if TYPE_CHECKING:
    from tokenizers import Tokenizer

SpanFormatName = Literal["spans_jsonl", "dstc8"]
SPAN_SUFFIXES = (".json", ".jsonl", ".ndjson")


@dataclass(frozen=True)
class SpanExample:
    text: str
    spans: tuple[Span, ...]  # sorted by start
    requested_slots: tuple[str, ...] = ()
    location: int = 0  # the 1-based line the object starts on


@dataclass(frozen=True)
class SpanData:
    examples: list[SpanExample]
    source: Path
    format: SpanFormatName
    warnings: list[DataWarning] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def texts(self) -> list[str]:
        return [e.text for e in self.examples]

    def label_counts(self) -> dict[str, int]:
        """Spans per label, labels sorted."""
        return dict(sorted(Counter(s.label for e in self.examples for s in e.spans).items()))

    @property
    def label_names(self) -> list[str]:
        return list(self.label_counts())

    @property
    def uses_context(self) -> bool:
        return any(e.requested_slots for e in self.examples)

    def subset(self, indices: Sequence[int]) -> SpanData:
        """The given examples, in the given order; warnings are not carried over."""
        return SpanData([self.examples[i] for i in indices], self.source, self.format)


def load_spans(path: Path | str, *, max_problems: int = MAX_PROBLEMS) -> SpanData:
    """Load and validate a span file; raises one ``DataError`` naming every problem found."""
    path = Path(path)
    if path.suffix.lower() not in SPAN_SUFFIXES:
        raise DataError(
            path,
            None,
            f"unsupported file type {path.suffix or '(no extension)'!r} for spans; "
            f"use one of {', '.join(SPAN_SUFFIXES)}",
        )
    if not path.is_file():
        raise DataError(path, None, "no such file" if not path.exists() else "not a regular file")
    problems = _Problems(path, max_problems)
    examples: list[SpanExample] = []
    formats: set[SpanFormatName] = set()
    try:
        for lineno, obj in _objects(path, problems):
            fmt: SpanFormatName = "dstc8" if "userInput" in obj else "spans_jsonl"
            if formats and fmt not in formats:
                problems.add(lineno, f"a {fmt} object in a file of {next(iter(formats))} objects")
                continue
            formats.add(fmt)
            example = _example(obj, fmt, lineno, problems)
            if example is not None:
                examples.append(example)
    except OSError as e:
        raise DataError(path, None, f"cannot read the file: {e.strerror or e}") from e
    if not examples and not problems.total:
        raise DataError(path, None, "the file holds no examples")
    data = SpanData(examples, path, next(iter(formats), "spans_jsonl"))
    for location, reason in _label_problems(data):
        problems.add(location, reason)
    if problems.total:
        raise problems.error()
    return SpanData(examples, path, data.format, cut_word_warnings(data))


def _objects(path: Path, problems: _Problems) -> Iterator[tuple[int, dict[str, object]]]:
    """(line, object) for each JSON object: one per line, or the elements of one JSON array."""
    lines = list(_decoded_lines(path, problems))
    first = next((line for line in lines if line.strip()), "")
    if first.lstrip().startswith("["):
        yield from _array_objects(path, "".join(lines), problems)
        return
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:
            col = f" at column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else f": {e}"
            problems.add(lineno, f"malformed JSON{col}")
            continue
        if not isinstance(obj, dict):
            problems.add(lineno, f"expected a JSON object, got {_kind(obj)}")
            continue
        yield lineno, obj


def _array_objects(path: Path, text: str, problems: _Problems) -> Iterator[tuple[int, dict[str, object]]]:
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line, counted = 1, 0

    def line_at(i: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, i)
        counted = i
        return line

    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise problems.error(line_at(pos), "malformed JSON: the array is not closed")
        if text[pos] == "]":
            if text[pos + 1 :].strip():
                raise problems.error(line_at(pos), "malformed JSON: text after the closing ]")
            return
        try:
            obj, end = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError) as e:
            raise problems.error(line_at(pos), f"malformed JSON: {e}") from e
        lineno = line_at(pos)
        pos = end
        if not isinstance(obj, dict):
            problems.add(lineno, f"expected a JSON object, got {_kind(obj)}")
            continue
        yield lineno, obj


def _example(
    obj: dict[str, object], fmt: SpanFormatName, lineno: int, problems: _Problems
) -> SpanExample | None:
    if fmt == "dstc8":
        user = obj.get("userInput")
        raw_text = user.get("text") if isinstance(user, dict) else None
        raw_spans = obj.get("labels", [])
        context = obj.get("context")
        raw_slots = context.get("requestedSlots", []) if isinstance(context, dict) else []
    else:
        raw_text, raw_spans, raw_slots = obj.get("text"), obj.get("spans", []), obj.get("requested_slots", [])
    text, reason = _as_text(raw_text, "text")
    if text is None:
        problems.add(lineno, reason or "no text")
        return None
    if not isinstance(raw_spans, list):
        problems.add(lineno, f"the spans must be a list, got {_kind(raw_spans)}")
        return None
    if not isinstance(raw_slots, list) or not all(isinstance(s, str) for s in raw_slots):
        problems.add(lineno, "the requested slots must be a list of strings")
        return None
    spans: list[Span] = []
    for i, raw in enumerate(raw_spans):
        span, reason = _span(raw, fmt, text, i)
        if span is None:
            problems.add(lineno, reason or f"span {i} is not usable")
        else:
            spans.append(span)
    spans.sort(key=lambda s: (s.start, s.end, s.label))
    for a, b in _overlapping(spans):
        problems.add(
            lineno,
            f"spans [{a.start}, {a.end}) and [{b.start}, {b.end}) of label {a.label!r} overlap",
        )
    return SpanExample(text, tuple(spans), tuple(raw_slots), lineno)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _span(raw: object, fmt: SpanFormatName, text: str, i: int) -> tuple[Span | None, str | None]:
    if not isinstance(raw, dict):
        return None, f"span {i} must be an object, got {_kind(raw)}"
    if fmt == "dstc8":
        label, value = raw.get("slot"), raw.get("valueSpan")
        if not isinstance(value, dict):
            return None, f"span {i} has no valueSpan object"
        start, end = _int(value.get("startIndex", 0)), _int(value.get("endIndex"))
    else:
        label, start, end = raw.get("label"), _int(raw.get("start")), _int(raw.get("end"))
    if not isinstance(label, str) or not label.strip():
        return None, f"span {i} has no label"
    label = label.strip()
    if start is None or end is None:
        return None, f"span {i} ({label!r}) needs integer start and end offsets"
    if start < 0 or end > len(text):
        return None, f"span {i} ({label!r}) [{start}, {end}) lies outside the text ({len(text)} characters)"
    if end <= start:
        return None, f"span {i} ({label!r}) ends at {end}, not after its start {start}"
    if not text[start:end].strip():
        return None, f"span {i} ({label!r}) [{start}, {end}) covers only whitespace"
    return Span(label, start, end, text[start:end]), None


def _overlapping(spans: Sequence[Span]) -> Iterator[tuple[Span, Span]]:
    last_end: dict[str, Span] = {}
    for span in spans:  # sorted by start
        prev = last_end.get(span.label)
        if prev is not None and span.start < prev.end:
            yield prev, span
        if prev is None or span.end > prev.end:
            last_end[span.label] = span


def _label_problems(data: SpanData) -> list[tuple[int | None, str]]:
    counts = data.label_counts()
    if not counts:
        return [(None, "no spans at all: an extractor needs labelled spans to learn from")]
    first_at: dict[str, int] = {}
    for e in data.examples:
        for s in e.spans:
            first_at.setdefault(s.label, e.location)
    return [
        (first_at[label], f"label {label!r} has {n} span(s); each label needs at least {MIN_PER_LABEL}")
        for label, n in counts.items()
        if n < MIN_PER_LABEL
    ]


def _cuts_word(text: str, span: Span) -> bool:
    def joined(i: int) -> bool:  # a word character on both sides of position i
        return 0 < i < len(text) and text[i - 1].isalnum() and text[i].isalnum()

    return joined(span.start) or joined(span.end)


def cut_word_warnings(data: SpanData) -> list[DataWarning]:
    cut = [e.location for e in data.examples if any(_cuts_word(e.text, s) for s in e.spans)]
    if not cut:
        return []
    shown = ", ".join(map(str, cut[:EXAMPLES]))
    return [
        DataWarning(
            "spans_cut_words",
            f"{len(cut)} text(s) have a span that starts or ends inside a word (e.g. lines {shown}); "
            "the extractor predicts whole word pieces, so such spans cannot match exactly",
            cut[:EXAMPLES],
        )
    ]


def window_warnings(data: SpanData, tokenizer: Tokenizer, window: int) -> list[DataWarning]:
    """Texts longer than the model window, and the spans the cut leaves out of training."""
    encoded = encode_many(tokenizer, data.texts, [e.requested_slots for e in data.examples], window)
    long = [i for i, enc in enumerate(encoded) if enc.truncated]
    if not long:
        return []
    lost: list[str] = []
    for i in long:
        seen_end = int(encoded[i].offsets[:, 1].max())
        example = data.examples[i]
        lost += [
            f"line {example.location}: {s.label} [{s.start}, {s.end})"
            for s in example.spans
            if s.end > seen_end
        ]
    locations = [data.examples[i].location for i in long]
    message = (
        f"{len(long)} text(s) are longer than the model window ({window} word pieces) and are cut "
        f"(e.g. lines {', '.join(map(str, locations[:EXAMPLES]))})"
    )
    if lost:
        message += (
            f"; {len(lost)} span(s) lie past the cut and cannot be learnt: {'; '.join(lost[:EXAMPLES])}"
        )
    return [DataWarning("long_texts", message, locations[:EXAMPLES])]


def fingerprint_spans(data: SpanData) -> dict[str, object]:
    """A span set identified without its texts, in the shape of ``appliance.dataset.fingerprint``."""
    rows = sorted(
        hashlib.sha256(
            json.dumps(
                [normalized(e.text), [[s.label, s.start, s.end] for s in e.spans], list(e.requested_slots)]
            ).encode()
        ).digest()
        for e in data.examples
    )
    digest = hashlib.sha256()
    for row in rows:
        digest.update(row)
    counts = data.label_counts()
    return {
        "sha256": digest.hexdigest(),
        "n_rows": len(data),
        "n_labels": len(counts),
        "label_counts": counts,
    }
