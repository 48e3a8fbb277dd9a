"""The dataset store: content-addressed, versioned per name, private, removable."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from appliance.artifact.spans import Span
from appliance.dataset.records import LabelledRow
from appliance.dataset.spans import SpanExample
from appliance.datasets.store import DatasetStore, canonical_jsonl
from appliance.errors import IntegrityError, InvalidArgument, NotFound

ROWS = [LabelledRow("lost my card", "lost_card"), LabelledRow("café\u2028menu", "other", "correction:h:a")]


def test_the_same_rows_are_stored_once_under_one_digest(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    first = store.put(ROWS, name="bank", role="train", kind="classify")
    again = store.put(list(ROWS), name="bank", role="train", kind="classify")
    assert first == again and first.version == 1 and first.n_rows == 2
    assert first.digest == hashlib.sha256(canonical_jsonl(ROWS)).hexdigest()
    other = store.put(ROWS[:1], name="bank", role="golden", kind="classify")
    assert other.digest != first.digest and other.version == 2
    assert [len(i.refs) for i in store.list()] == [1, 1]
    got = store.get(first.digest)
    assert got.rows == ROWS  # U+2028 inside a text does not split a row
    assert got.labelled().texts == ["lost my card", "café\u2028menu"]
    assert store.get(first.digest[:10]).digest == first.digest  # a prefix names it


def test_files_are_private_and_a_tampered_file_is_refused(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    ref = store.put(ROWS, name="bank", role="train", kind="classify")
    rows = tmp_path / "datasets" / ref.digest / "rows.jsonl"
    assert stat.S_IMODE(rows.stat().st_mode) == 0o600
    assert stat.S_IMODE(rows.parent.stat().st_mode) == 0o700
    rows.write_bytes(rows.read_bytes().replace(b"lost", b"LOST"))
    with pytest.raises(IntegrityError, match="does not match its digest"):
        store.get(ref.digest)


def test_span_rows_round_trip(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    example = SpanExample("table for 4 at 7pm", (Span("people", 10, 11, "4"), Span("time", 15, 18, "7pm")))
    ref = store.put([example], name="rest", role="train", kind="extract")
    got = store.get(ref)
    assert got.spans().examples == [example] and got.info.label_counts == {"people": 1, "time": 1}


def test_remove_forgets_and_bad_names_are_refused(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    ref = store.put(ROWS, name="bank", role="train", kind="classify")
    assert store.remove(ref.digest).digest == ref.digest
    assert not store.exists(ref.digest) and store.list() == []
    with pytest.raises(NotFound, match="deleted, or never stored here"):
        store.get(ref.digest)
    with pytest.raises(InvalidArgument, match="at least 8 hex digits"):
        store.get("abc")
    with pytest.raises(InvalidArgument, match="LabelledRow rows only"):
        store.put([object()], name="bank", role="train", kind="classify")  # type: ignore[list-item]
    with pytest.raises(InvalidArgument, match="dataset role"):
        store.put(ROWS, name="bank", role="test", kind="classify")
