"""Loading and validating labelled files: every format, every located error."""

from __future__ import annotations

import csv
import json
import pickle
from importlib import resources
from pathlib import Path

import grpc
import pytest

from appliance.dataset import MAX_FIELD_CHARS, DataError, load_labelled
from appliance.errors import InvalidArgument

BANKING77 = Path(str(resources.files("appliance") / "data" / "banking77"))


def load(path: Path, text: str = "text", label: str = "label"):
    return load_labelled(path, text, label)


def error_of(path: Path, text: str = "text", label: str = "label") -> DataError:
    with pytest.raises(DataError) as info:
        load_labelled(path, text, label)
    return info.value


# -- the shipped data ------------------------------------------------------------------------------


def test_banking77_train_loads_whole():
    data = load_labelled(BANKING77 / "train.csv", "text", "category")
    assert len(data) == 10003
    assert len(data.label_names) == 77
    with (BANKING77 / "categories.json").open() as f:
        assert set(data.label_names) == set(json.load(f))
    with (BANKING77 / "train.csv").open(newline="", encoding="utf-8") as f:
        expected = list(csv.DictReader(f))
    assert data.texts == [r["text"] for r in expected]
    assert data.labels == [r["category"] for r in expected]
    # The file holds quoted multi-line texts, so rows and lines part ways: each location must be the
    # line where its row starts.
    lines = (BANKING77 / "train.csv").read_text(encoding="utf-8").split("\n")
    assert data.locations[0] == 2
    assert data.locations[-1] > len(data) + 1
    multi_line = [i for i, t in enumerate(data.texts) if "\n" in t]
    assert multi_line
    for i in [0, 5000, len(data) - 1, *multi_line]:
        first_line = data.texts[i].split("\n")[0]
        assert lines[data.locations[i] - 1].lstrip('"').startswith(first_line)
    for i in multi_line:  # the next row starts after all of this row's lines
        assert data.locations[i + 1] == data.locations[i] + data.texts[i].count("\n") + 1


# -- formats ----------------------------------------------------------------------------------------


def test_csv_keeps_rows_labels_and_start_lines(tmp_path: Path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\nhello,a\n"two\nlines",b\n\nbye, a \n"x",b\n', encoding="utf-8")
    data = load(path)
    assert data.texts == ["hello", "two\nlines", "bye", "x"]
    assert data.labels == ["a", "b", "a", "b"]  # labels are trimmed, texts are kept as written
    assert data.locations == [2, 3, 6, 7]
    assert data.source == path
    assert data.where(1) == f"{path}:3"


def test_csv_byte_order_mark_is_not_part_of_the_header(write_bytes):
    path = write_bytes("\ufefftext,label\nx,a\ny,a\nz,b\nw,b\n".encode(), "bom.csv")
    assert load(path).texts == ["x", "y", "z", "w"]


def test_tsv_uses_tabs(write_csv, pairs):
    data = load(write_csv([["a, with comma", "l1"], *pairs("l1", "l2")[1:]], name="d.tsv"))
    assert data.texts[0] == "a, with comma"


def test_jsonl_stringifies_number_labels_and_skips_blank_lines(tmp_path: Path):
    path = tmp_path / "d.ndjson"
    lines = [
        {"text": "one", "label": 3},
        {"text": "two", "label": 3.0},
        {"text": "three", "label": "x"},
        {"text": "four", "label": "x", "extra": [1]},
        {"text": "five", "label": True},
        {"text": "six", "label": True},
    ]
    path.write_text(
        "\n".join(json.dumps(o) for o in lines[:2])
        + "\n\n   \n"
        + "\n".join(json.dumps(o) for o in lines[2:])
    )
    data = load(path)
    assert data.labels == ["3", "3", "x", "x", "true", "true"]
    assert data.locations == [1, 2, 5, 6, 7, 8]


@pytest.mark.parametrize("name", ["d.parquet", "d.pq"])
def test_parquet_reads_the_two_columns_with_row_numbers(write_parquet, name):
    path = write_parquet({"id": [7, 8, 9, 10], "text": ["a", "b", "c", "d"], "label": [1, 2, 1, 2]}, name)
    data = load(path)
    assert data.texts == ["a", "b", "c", "d"]
    assert data.labels == ["1", "2", "1", "2"]
    assert data.locations == [1, 2, 3, 4]
    assert data.location_kind == "row"
    assert data.where(2) == f"{path}:row 3"


def test_parquet_problems_are_located_by_row(write_parquet):
    path = write_parquet({"text": ["a", None, "c", "d"], "label": ["x", "x", "y", None]})
    err = error_of(path)
    assert err.problems == [
        ("row 2", "empty text in column 'text'"),
        ("row 4", "missing label in column 'label'"),
    ]
    assert str(err).splitlines()[0] == f"{path}:row 2: empty text in column 'text'"


# -- file-level errors ------------------------------------------------------------------------------


def test_unsupported_extension_names_the_supported_ones(write_bytes):
    err = error_of(write_bytes(b"text,label\n", "d.xlsx"))
    assert "'.xlsx'" in err.reason and ".csv" in err.reason and ".parquet" in err.reason


def test_missing_file(tmp_path: Path):
    err = error_of(tmp_path / "nope.csv")
    assert str(err) == f"{tmp_path / 'nope.csv'}: no such file"


def test_same_column_for_text_and_label(write_csv, pairs):
    assert "both 'text'" in error_of(write_csv(pairs("a", "b")), "text", "text").reason


@pytest.mark.parametrize(
    ("content", "name", "expected"),
    [
        (b"", "d.csv", "the file is empty"),
        (b"\n\n", "d.csv", "the file is empty"),
        (b"text,label\n", "d.csv", "no data rows after the header"),
        (b"", "d.jsonl", "the file is empty"),
        (b"\n  \n", "d.jsonl", "the file is empty"),
    ],
)
def test_empty_files(write_bytes, content, name, expected):
    err = error_of(write_bytes(content, name))
    assert err.reason == expected
    assert err.location is None


def test_parquet_without_rows(write_parquet):
    import pyarrow as pa

    path = write_parquet({"text": pa.array([], pa.string()), "label": pa.array([], pa.string())})
    assert error_of(path).reason == "the file has no rows"


def test_csv_missing_column_lists_the_header(write_csv):
    path = write_csv([["x", "a"]], header=("sentence", "intent"))
    err = error_of(path, "text", "intent")
    assert str(err) == f"{path}:1: no text column 'text'; the header has: 'sentence', 'intent'"


def test_csv_duplicate_header_is_ambiguous(write_csv):
    err = error_of(write_csv([["x", "y", "a"]], header=("text", "text", "label")))
    assert "names column 'text' 2 times" in err.reason


def test_jsonl_key_absent_everywhere_is_one_error_naming_the_keys(write_jsonl):
    err = error_of(write_jsonl([{"sentence": f"s{i}", "label": "a"} for i in range(50)]))
    assert err.problems == [(None, "no text column 'text' in any object; the keys are: 'sentence', 'label'")]


def test_parquet_missing_column_lists_columns(write_parquet):
    err = error_of(write_parquet({"text": ["a", "b"], "intent": ["x", "y"]}))
    assert err.reason == "no label column 'label'; the columns are: 'text', 'intent'"


def test_utf16_file_is_named_as_such(write_bytes):
    err = error_of(write_bytes("text,label\nx,a\n".encode("utf-16"), "d.csv"))
    assert "UTF-16" in err.reason


def test_corrupt_parquet(write_bytes):
    err = error_of(write_bytes(b"PAR1 this is not parquet at all", "d.parquet"))
    assert err.reason.startswith("not a readable Parquet file")


# -- row-level errors -------------------------------------------------------------------------------


def test_empty_text_message_is_located(tmp_path: Path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\nfine,a\n   ,a\nok,b\nalso,b\n")
    err = error_of(path)
    assert str(err) == f"{path}:3: empty text in column 'text'"
    assert (err.path, err.location, err.reason) == (path, 3, "empty text in column 'text'")


def test_missing_labels(write_csv, write_jsonl):
    err = error_of(write_csv([["x", "a"], ["y", ""], ["z", "  "], ["w", "a"]]))
    assert [loc for loc, _ in err.problems] == [3, 4]
    assert all(reason == "missing label in column 'label'" for _, reason in err.problems)
    err = error_of(write_jsonl([{"text": "x", "label": None}, {"text": "y"}, {"text": "z", "label": "a"}]))
    assert err.problems == [(1, "missing label in column 'label'"), (2, "missing label in column 'label'")]


def test_non_utf8_reports_line_and_byte_offset(write_bytes):
    content = b"text,label\ncaf\xc3\xa9,a\nna\xefve,a\nx,b\ny,b\n"
    err = error_of(write_bytes(content, "d.csv"))
    offset = content.index(b"\xef")
    assert err.location == 3
    assert f"byte offset {offset}" in err.reason
    assert "0xef" in err.reason and "column 3 of the line" in err.reason


def test_non_utf8_in_jsonl_is_reported_alongside_other_problems(write_bytes):
    content = b'{"text": "ok", "label": "a"}\n{"text": "\xff", "label": "a"}\n{"text": "", "label": "b"}\n'
    err = error_of(write_bytes(content, "d.jsonl"))
    assert [loc for loc, _ in err.problems] == [2, 3]
    offset = content.index(b"\xff")
    assert f"byte offset {offset}" in err.problems[0][1]


def test_malformed_json_lines(write_bytes):
    content = (
        b'{"text": "a", "label": "x"}\n{"text": "b", "label": \n[1, 2]\n"just a string"\n'
        + b"[" * 100_000
        + b"\n"
    )
    err = error_of(write_bytes(content, "d.jsonl"))
    assert [loc for loc, _ in err.problems] == [2, 3, 4, 5]
    assert err.problems[0][1].startswith("malformed JSON at column")
    assert err.problems[1][1] == "expected a JSON object, got a list"
    assert err.problems[2][1] == "expected a JSON object, got a str value"
    assert err.problems[3][1].startswith("malformed JSON")


@pytest.mark.parametrize(
    ("text", "label", "expected"),
    [
        ({"a": 1}, "x", "text in column 'text' must be a string, got an object"),
        (["a"], "x", "text in column 'text' must be a string, got a list"),
        (12, "x", "text in column 'text' must be a string, got a number"),
        (True, "x", "text in column 'text' must be a string, got a boolean"),
        ("fine", {"a": 1}, "label in column 'label' must be a string or a number, got an object"),
        ("fine", [1], "label in column 'label' must be a string or a number, got a list"),
        ("\ud800", "x", "text in column 'text' holds an unpaired UTF-16 surrogate"),
    ],
)
def test_wrong_types(write_jsonl, text, label, expected):
    rows = [{"text": text, "label": label}, *({"text": f"t{i}", "label": "x"} for i in range(3))]
    err = error_of(write_jsonl(rows))
    assert err.problems == [(1, expected)]


def test_field_count_mismatch_is_a_problem(tmp_path: Path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nhello, world,a\nx,a\ny,b\nz,b\n")
    err = error_of(path)
    assert err.location == 2
    assert "3 fields, the header has 2" in err.reason


def test_unclosed_quote_is_caught(tmp_path: Path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\nx,a\n"oops,a\ny,b\nz,b\n')
    err = error_of(path)
    assert err.location == 3
    assert "unclosed quote" in err.reason


def test_field_over_the_limit_is_refused(tmp_path: Path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\nx,a\n"' + "y" * (MAX_FIELD_CHARS + 10) + '",a\nz,b\n')
    err = error_of(path)
    assert err.location == 3
    assert f"longer than {MAX_FIELD_CHARS}" in err.reason


def test_bare_carriage_returns_are_a_csv_error(write_bytes):
    err = error_of(write_bytes(b"text,label\rx,a\r", "d.csv"))
    assert "malformed CSV" in err.reason


def test_problems_are_collected_together_up_to_a_cap(tmp_path: Path):
    rows = ["text,label"] + [f"t{i},a" if i % 2 else ",a" for i in range(50)]
    path = tmp_path / "d.csv"
    path.write_text("\n".join(rows) + "\n")
    err = error_of(path)
    assert len(err.problems) == 20
    assert err.total == 25
    assert [loc for loc, _ in err.problems] == list(range(2, 42, 2))
    lines = str(err).splitlines()
    assert len(lines) == 21
    assert lines[-1] == "(25 problems in all; the first 20 are shown)"
    with pytest.raises(DataError) as small:
        load_labelled(path, "text", "label", max_problems=3)
    assert len(small.value.problems) == 3 and small.value.total == 25


# -- label counts -------------------------------------------------------------------------------------


def test_rare_labels_are_named_with_counts(write_csv, pairs):
    path = write_csv([*pairs("ok1", "ok2"), ["lonely", "solo"], ["also lonely", "single"]])
    err = error_of(path)
    assert err.location is None
    assert err.reason.startswith(
        "2 label(s) have fewer than 2 examples: 'single' (1, at 7), 'solo' (1, at 6)"
    )


def test_mostly_unique_labels_suggest_the_wrong_column(write_csv):
    path = write_csv([["a", "x1"], ["b", "x2"], ["c", "x3"], ["d", "x3"]])
    assert "label column may be the wrong one" in error_of(path).reason


def test_a_single_label_is_refused(write_csv):
    err = error_of(write_csv([["a", "only"], ["b", "only"], ["c", "only"]]))
    assert err.reason == "every row has the label 'only'; a classifier needs at least 2"


def test_data_error_is_a_value_error_with_grpc_status(write_bytes):
    err = error_of(write_bytes(b"", "d.csv"))
    assert isinstance(err, ValueError)
    assert isinstance(err, InvalidArgument)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT


def test_data_error_survives_pickling_across_processes(tmp_path: Path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n,a\nx,\n")
    err = error_of(path)
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), str(back), back.problems, back.total) == (
        DataError,
        str(err),
        err.problems,
        err.total,
    )
