"""Labelled training data: loading, validation, quality warnings, splitting and fingerprinting.

``load_labelled`` reads CSV, TSV, JSONL or Parquet into a ``LabelledData`` and either returns it with
a list of ``DataWarning`` or raises one ``DataError`` that names every row-level problem it found (up
to a cap), each located by file line (CSV/JSONL) or row (Parquet), so the engineer fixes the file in
one pass instead of one error per run.

- :mod:`~appliance.dataset.records`: ``LabelledData``, ``LabelledRow``, ``DataError``, ``DataWarning``.
- :mod:`~appliance.dataset.reading`: ``load_labelled``, the per-format readers, ``validated``.
- :mod:`~appliance.dataset.quality`: ``inspect_data`` (the warnings) and spreadsheet-formula escaping.
- :mod:`~appliance.dataset.splitting`: ``stratified_split``, ``few_shot``, ``fingerprint``.
- :mod:`~appliance.dataset.spans`: ``load_spans`` for span extractors (JSONL spans or DSTC8), with the
  same error and warning types.
"""

from appliance.dataset.quality import (
    FORMULA_PREFIXES,
    IMBALANCE_RATIO,
    LONG_TEXT_CHARS,
    escape_csv_cell,
    inspect_data,
    is_formula_like,
)
from appliance.dataset.reading import (
    MAX_FIELD_CHARS,
    MAX_LINE_BYTES,
    MAX_PROBLEMS,
    MIN_PER_LABEL,
    SUPPORTED_SUFFIXES,
    load_labelled,
    validated,
)
from appliance.dataset.records import DataError, DataWarning, LabelledData, LabelledRow
from appliance.dataset.spans import SpanData, SpanExample, load_spans
from appliance.dataset.splitting import few_shot, fingerprint, stratified_split

__all__ = [
    "FORMULA_PREFIXES",
    "IMBALANCE_RATIO",
    "LONG_TEXT_CHARS",
    "MAX_FIELD_CHARS",
    "MAX_LINE_BYTES",
    "MAX_PROBLEMS",
    "MIN_PER_LABEL",
    "SUPPORTED_SUFFIXES",
    "DataError",
    "DataWarning",
    "LabelledData",
    "LabelledRow",
    "SpanData",
    "SpanExample",
    "escape_csv_cell",
    "few_shot",
    "fingerprint",
    "inspect_data",
    "is_formula_like",
    "load_labelled",
    "load_spans",
    "stratified_split",
    "validated",
]
