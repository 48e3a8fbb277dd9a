"""Warnings that do not stop training, and the CSV-injection guard."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from appliance.dataset import escape_csv_cell, inspect_data, is_formula_like, load_labelled


def kinds(path: Path) -> dict[str, object]:
    return {w.kind: w for w in load_labelled(path, "text", "label").warnings}


def test_clean_file_has_no_warnings(write_csv, pairs):
    assert kinds(write_csv(pairs("a", "b", "c", per_label=3))) == {}


def test_exact_duplicates_are_counted_with_example_lines(write_csv, pairs):
    rows = [
        *pairs("a", "b", per_label=3),
        ["text 0 for a", "a"],
        [" text 0 for a ", "a"],
        ["text 1 for b", "b"],
    ]
    w = kinds(write_csv(rows))["duplicates"]
    assert w.message.startswith("3 row(s) repeat an earlier row's text and label")
    assert "line 8 repeats line 2" in w.message
    assert "line 10 repeats line 6" in w.message
    assert w.locations == [8, 9, 10]
    assert "conflicting_labels" not in kinds(write_csv(rows))


def test_conflicting_duplicates_name_the_labels(write_csv, pairs):
    rows = [*pairs("a", "b", per_label=3), ["text 0 for a", "b"]]
    found = kinds(write_csv(rows))
    w = found["conflicting_labels"]
    assert w.message == "1 text(s) appear with different labels (lines 2, 8: a, b)"
    assert w.locations == [2]
    assert "duplicates" not in found


def test_imbalance_names_the_classes(write_csv, pairs):
    rows = [
        *pairs("big", per_label=22),
        *pairs("small", per_label=2),
        *pairs("mid", per_label=5),
        *pairs("tiny", per_label=2),
    ]
    w = kinds(write_csv(rows))["imbalance"]
    assert w.message == (
        "classes are imbalanced 11.0:1 (above 10:1): largest 'big' (22); "
        "2 class(es) are over 10 times smaller: 'tiny' (2), 'small' (2)"
    )


def test_imbalance_at_the_threshold_is_not_flagged(write_csv, pairs):
    rows = [*pairs("big", per_label=20), *pairs("small", per_label=2)]
    assert "imbalance" not in kinds(write_csv(rows))
    data = load_labelled(write_csv(rows), "text", "label")
    assert [w.kind for w in inspect_data(data, imbalance_ratio=5)] == ["imbalance"]


def test_long_texts(write_csv, pairs):
    rows = [*pairs("a", "b"), ["word " * 500, "a"]]
    w = kinds(write_csv(rows))["long_texts"]
    assert w.message.startswith("1 text(s) are longer than 2000 characters")
    assert w.locations == [6]


def test_formula_cells_load_as_plain_text_and_are_flagged(write_csv, pairs):
    hostile = ['=HYPERLINK("http://evil","x")', "+1+1", "-2+3", "@SUM(A1)", "\tcmd"]
    rows = [*pairs("a", "b"), *([h, "a"] for h in hostile)]
    data = load_labelled(write_csv(rows), "text", "label")
    assert data.texts[4:] == hostile  # kept verbatim, never interpreted
    w = {w.kind: w for w in data.warnings}["formula_cells"]
    assert w.message.startswith("5 cell(s) start with = + - @")
    assert w.locations == [6, 7, 8]


def test_formula_labels_are_flagged_too(write_csv, pairs):
    rows = [*pairs("a"), ["x", "=cmd"], ["y", "=cmd"]]
    assert "formula_cells" in kinds(write_csv(rows))


@pytest.mark.parametrize("cell", ["=1+1", "+1", "-1", "@x", "\t=1", "\r=1"])
def test_escape_csv_cell_defuses_formulas(cell):
    escaped = escape_csv_cell(cell)
    assert escaped == "'" + cell
    assert not is_formula_like(escaped)


@pytest.mark.parametrize("cell", ["plain", "a=b", "", "'quoted", "1-2"])
def test_escape_csv_cell_leaves_plain_text_alone(cell):
    assert escape_csv_cell(cell) == cell


def test_escaped_cells_survive_a_csv_round_trip():
    cells = ['=HYPERLINK("x")', "a,b", 'say "hi"', "multi\nline"]
    buf = io.StringIO()
    csv.writer(buf).writerow([escape_csv_cell(c) for c in cells])
    back = next(csv.reader(io.StringIO(buf.getvalue(), newline="")))
    assert back == ["'" + cells[0], *cells[1:]]
