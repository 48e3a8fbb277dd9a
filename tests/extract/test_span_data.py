"""Loading and validating span files (JSONL spans and DSTC8/Restaurant8k): every bad case is a
located error, all reported together; cut words and texts past the window are warnings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from appliance.dataset import DataError, load_spans
from appliance.dataset.spans import window_warnings
from appliance.factory.pipeline import default_base

RESTAURANT8K = Path(__file__).resolve().parents[2] / "appliance" / "data" / "restaurant8k"


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def row(text: str, *spans: tuple[str, int, int]) -> dict[str, object]:
    return {"text": text, "spans": [{"label": lab, "start": s, "end": e} for lab, s, e in spans]}


GOOD = [
    row("table for 4 at 7pm", ("people", 10, 11), ("time", 15, 18)),
    row("we are 6, at 8pm please", ("people", 7, 8), ("time", 13, 16)),
    row("nothing to extract here"),
]


def test_restaurant8k_dstc8_array_loads_with_context_and_default_start() -> None:
    data = load_spans(RESTAURANT8K / "train_7.json")
    assert data.format == "dstc8" and len(data) == 64
    assert data.uses_context
    assert set(data.label_names) == {"date", "time", "people", "first_name", "last_name"}
    raw = json.loads((RESTAURANT8K / "train_7.json").read_text())
    no_start = [
        (i, lab)
        for i, ex in enumerate(raw)
        for lab in ex.get("labels", [])
        if "startIndex" not in lab["valueSpan"]
    ]
    assert no_start, "the fixture needs a span without startIndex"
    i, lab = no_start[0]
    span = next(s for s in data.examples[i].spans if s.label == lab["slot"])
    assert span.start == 0 and span.end == lab["valueSpan"]["endIndex"]
    assert data.examples[i].text[: span.end] == span.text
    # Each example is located by the line its object starts on.
    lines = (RESTAURANT8K / "train_7.json").read_text().splitlines()
    assert all('"userInput"' in lines[e.location] for e in data.examples)


def test_dstc8_one_object_per_line(tmp_path: Path) -> None:
    rows = [
        {
            "userInput": {"text": "for 5 people"},
            "labels": [{"slot": "people", "valueSpan": {"startIndex": 4, "endIndex": 5}}],
        },
        {
            "userInput": {"text": "3 of us"},
            "context": {"requestedSlots": ["people"]},
            "labels": [{"slot": "people", "valueSpan": {"endIndex": 1}}],
        },
    ]
    data = load_spans(write_jsonl(tmp_path / "d.jsonl", rows))
    assert data.format == "dstc8"
    assert [(s.text, s.start) for e in data.examples for s in e.spans] == [("5", 4), ("3", 0)]
    assert data.examples[1].requested_slots == ("people",)


def test_jsonl_offsets_are_characters_with_multibyte_text_and_emoji(tmp_path: Path) -> None:
    text = "Tisch für 4 🍕🍕 am 3. Mai, Name Zoë Müller"
    start_date = text.index("3. Mai")
    start_name = text.index("Zoë")
    rows = [
        row(
            text,
            ("people", 10, 11),
            ("date", start_date, start_date + 6),
            ("name", start_name, start_name + 3),
        ),
        row("😀 Zoë kommt zu 2", ("name", 2, 5), ("people", 15, 16)),
        row("am 4. Juni", ("date", 3, 10)),
    ]
    data = load_spans(write_jsonl(tmp_path / "m.jsonl", rows))
    assert data.format == "spans_jsonl" and not data.uses_context
    assert [s.text for s in data.examples[0].spans] == ["4", "3. Mai", "Zoë"]
    assert [s.text for s in data.examples[1].spans] == ["Zoë", "2"]


def test_every_bad_case_is_located_and_reported_together(tmp_path: Path) -> None:
    rows = [
        *GOOD,
        row("for 4 people", ("people", 4, 40)),  # line 4: outside the text
        row("for 4 people", ("people", 5, 5)),  # line 5: end <= start
        row("at 7pm or 8pm", ("time", 3, 6), ("time", 5, 13)),  # line 6: overlapping, same label
        row("for  4", ("people", 3, 5)),  # line 7: whitespace only
        row("on friday", ("date", 3, 9)),  # line 8: a label seen once
        {"text": "", "spans": []},  # line 9: empty text
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_spans(path)
    err = info.value
    by_line = {loc: why for loc, why in err.problems}
    assert set(by_line) == {4, 5, 6, 7, 8, 9}
    assert "outside the text" in by_line[4]
    assert "not after its start" in by_line[5]
    assert "overlap" in by_line[6]
    assert "whitespace" in by_line[7]
    assert "'date' has 1 span" in by_line[8]
    assert "empty text" in by_line[9]
    assert f"{path}:4:" in str(err) and f"{path}:8:" in str(err)


def test_a_file_without_any_span_is_refused(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "none.jsonl", [row("hello"), row("table for two")])
    with pytest.raises(DataError, match="no spans at all"):
        load_spans(path)


def test_malformed_json_and_mixed_formats_are_located(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    lines = [json.dumps(r) for r in GOOD] + [
        "{not json",
        json.dumps({"userInput": {"text": "x"}, "labels": []}),
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        load_spans(path)
    by_line = dict(info.value.problems)
    assert "malformed JSON" in by_line[4] and "dstc8 object" in by_line[5]

    array = tmp_path / "broken.json"
    array.write_text('[\n  {"userInput": {"text": "a"}},\n  {"userInput": oops}\n]\n')
    with pytest.raises(DataError) as info:
        load_spans(array)
    assert info.value.problems[-1][0] == 3


def test_cut_words_are_a_warning(tmp_path: Path) -> None:
    rows = [*GOOD, row("at 730pm", ("time", 3, 6)), row("at 930pm", ("time", 3, 8))]
    data = load_spans(write_jsonl(tmp_path / "cut.jsonl", rows))
    (warning,) = data.warnings
    assert warning.kind == "spans_cut_words" and warning.locations == [4]


def test_texts_past_the_window_warn_and_name_the_spans_lost(tmp_path: Path) -> None:
    long = "we would like a table " * 10 + "for 9"
    rows = [*GOOD, row(long, ("people", len(long) - 1, len(long)))]
    data = load_spans(write_jsonl(tmp_path / "long.jsonl", rows))
    tokenizer = Tokenizer.from_file(str(default_base() / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    (warning,) = window_warnings(data, tokenizer, window=16)
    assert warning.kind == "long_texts" and warning.locations == [4]
    assert "1 span(s) lie past the cut" in warning.message and "line 4: people" in warning.message
    assert window_warnings(data, tokenizer, window=128) == []
