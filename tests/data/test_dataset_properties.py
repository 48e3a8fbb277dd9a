"""Whatever the bytes, the loader either loads or raises DataError: never another exception."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.dataset import DataError, LabelledData, load_labelled

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every run
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

# Mostly label-like text so that some generated files load, mixed with anything at all.
LABELS = st.sampled_from(["a", "b", "c", " a ", "", "=x"])
TEXTS = st.one_of(st.text(max_size=40), st.sampled_from(["hello", "  ", "-1", '"', "a,b", "\r", "\n"]))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


def outcome(path: Path) -> LabelledData | DataError:
    try:
        data = load_labelled(path, "text", "label")
    except DataError as e:
        assert str(e).startswith(str(path))
        assert e.problems and len(e.problems) <= 20
        return e
    # A loaded file is always fit to train on.
    assert len(data.texts) == len(data.labels) == len(data.locations) > 0
    assert all(t.strip() for t in data.texts) and all(lab.strip() for lab in data.labels)
    assert min(data.label_counts().values()) >= 2 and len(data.label_counts()) >= 2
    return data


@SETTINGS
@given(content=st.binary(max_size=300), suffix=st.sampled_from([".csv", ".tsv", ".jsonl", ".parquet"]))
def test_random_bytes(tmp_path: Path, content: bytes, suffix: str):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(content)
    outcome(path)


@SETTINGS
@given(
    header=st.lists(st.sampled_from(["text", "label", "x", "", "text "]), min_size=1, max_size=4),
    rows=st.lists(st.lists(TEXTS | LABELS, max_size=4), max_size=12),
    line_end=st.sampled_from(["\n", "\r\n"]),
)
def test_random_csv(tmp_path: Path, header: list[str], rows: list[list[str]], line_end: str):
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=line_end)
    writer.writerow(header)
    writer.writerows(rows)
    path = tmp_path / "random.csv"
    path.write_text(buf.getvalue(), encoding="utf-8", newline="")
    result = outcome(path)
    if isinstance(result, LabelledData):  # what loaded is what was written
        ti, li = header.index("text"), header.index("label")
        for text, label, line in zip(result.texts, result.labels, result.locations, strict=True):
            assert any(r[ti] == text and r[li].strip() == label for r in rows if len(r) == len(header))
            assert line >= 2


@SETTINGS
@given(
    objects=st.lists(
        st.one_of(
            st.fixed_dictionaries({"text": TEXTS, "label": LABELS}),
            st.fixed_dictionaries({"text": JSON_VALUES, "label": JSON_VALUES}),
            JSON_VALUES,
        ),
        max_size=12,
    ),
    garbage=st.lists(st.text(max_size=20), max_size=2),
)
def test_random_jsonl(tmp_path: Path, objects: list[object], garbage: list[str]):
    lines = [json.dumps(o) for o in objects] + garbage
    path = tmp_path / "random.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    outcome(path)


@SETTINGS
@given(
    texts=st.lists(st.none() | TEXTS, min_size=0, max_size=10),
    labels=st.one_of(
        st.lists(st.none() | LABELS, min_size=10, max_size=10),
        st.lists(st.none() | st.integers(-3, 3), min_size=10, max_size=10),
        st.lists(st.none() | st.floats(), min_size=10, max_size=10),
    ),
)
def test_random_parquet(tmp_path: Path, texts: list[str | None], labels: list[object]):
    path = tmp_path / "random.parquet"
    pq.write_table(pa.table({"text": pa.array(texts, pa.string()), "label": labels[: len(texts)]}), path)
    outcome(path)
