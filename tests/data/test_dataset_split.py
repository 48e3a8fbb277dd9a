"""Stratified split, few-shot sampling and the data fingerprint."""

from __future__ import annotations

import json
import random
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from appliance.dataset import LabelledData, few_shot, fingerprint, load_labelled, stratified_split

BANKING77_TRAIN = Path(str(resources.files("appliance") / "data" / "banking77" / "train.csv"))


def make(rows: list[tuple[str, str]]) -> LabelledData:
    return LabelledData(
        texts=[t for t, _ in rows],
        labels=[lab for _, lab in rows],
        source=Path("mem.csv"),
        locations=list(range(2, len(rows) + 2)),
    )


def sized(sizes: dict[str, int]) -> LabelledData:
    return make([(f"{label} example {i}", label) for label, n in sizes.items() for i in range(n)])


@pytest.fixture(scope="module")
def banking() -> LabelledData:
    return load_labelled(BANKING77_TRAIN, "text", "category")


# -- stratified_split -------------------------------------------------------------------------------


def test_split_is_stratified_on_banking77(banking):
    train, held = stratified_split(banking, fraction=0.1, seed=0)
    assert len(train) + len(held) == len(banking)
    assert sorted(train.locations + held.locations) == banking.locations
    total = Counter(banking.labels)
    held_counts = Counter(held.labels)
    assert set(held_counts) == set(total)
    for label, n in total.items():
        assert abs(held_counts[label] - 0.1 * n) <= 1.5, label
    assert abs(len(held) - 0.1 * len(banking)) <= 77


def test_split_keeps_file_order_and_pairs(banking):
    train, held = stratified_split(banking, seed=3)
    at = dict(zip(banking.locations, zip(banking.texts, banking.labels, strict=True), strict=True))
    for part in (train, held):
        assert part.locations == sorted(part.locations)
        for text, label, loc in zip(part.texts, part.labels, part.locations, strict=True):
            assert at[loc] == (text, label)


def test_split_is_deterministic_and_depends_on_the_seed(banking):
    a_train, a_held = stratified_split(banking, seed=0)
    b_train, b_held = stratified_split(banking, seed=0)
    assert a_held.locations == b_held.locations and a_train.texts == b_train.texts
    assert stratified_split(banking, seed=1)[1].locations != a_held.locations


def test_split_of_one_label_does_not_move_when_another_label_changes():
    def held_a(data: LabelledData) -> list[str]:
        held = stratified_split(data)[1]
        return [t for t, lab in zip(held.texts, held.labels, strict=True) if lab == "a"]

    assert held_a(sized({"a": 30, "b": 30})) == held_a(sized({"a": 30, "b": 45}))


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 0.99])
def test_every_label_keeps_one_example_on_each_side(fraction):
    data = sized({"two": 2, "three": 3, "many": 40})
    train, held = stratified_split(data, fraction=fraction)
    for part in (train, held):
        assert set(part.labels) == {"two", "three", "many"}


def test_a_label_with_one_example_stays_in_train():
    data = sized({"one": 1, "many": 10})
    train, held = stratified_split(data)
    assert "one" in train.labels and "one" not in held.labels


def test_duplicate_texts_stay_on_one_side():
    rows = (
        [(f"text {i}", "a") for i in range(20)] + [("text 3", "a")] * 5 + [(f"b {i}", "b") for i in range(20)]
    )
    for seed in range(10):
        train, held = stratified_split(make(rows), fraction=0.3, seed=seed)
        assert not set(train.texts) & set(held.texts)


@pytest.mark.parametrize("seed", range(8))
def test_uneven_duplicate_groups_still_leave_train_an_example(seed):
    # Holding out whole groups could empty train when a large group comes after a small one.
    data = make([("x", "a")] * 5 + [("y", "a")] + [(f"b {i}", "b") for i in range(6)])
    train, held = stratified_split(data, fraction=0.5, seed=seed)
    assert "a" in train.labels and "a" in held.labels


def test_a_label_that_is_one_repeated_text_is_still_split():
    data = make([("same", "a")] * 4 + [(f"b {i}", "b") for i in range(4)])
    train, held = stratified_split(data)
    assert "a" in train.labels and "a" in held.labels


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_a_fraction_outside_0_1(fraction):
    with pytest.raises(ValueError, match="fraction"):
        stratified_split(sized({"a": 4, "b": 4}), fraction=fraction)


# -- few_shot ---------------------------------------------------------------------------------------


def test_few_shot_takes_k_per_label(banking):
    shot = few_shot(banking, per_label=10, seed=0)
    assert Counter(shot.labels) == {label: 10 for label in banking.label_names}
    assert shot.locations == sorted(shot.locations)
    assert len(set(shot.texts)) == len(shot)
    assert few_shot(banking, 10, seed=0).locations == shot.locations
    assert few_shot(banking, 10, seed=1).locations != shot.locations


def test_few_shot_takes_all_of_a_small_label_and_prefers_distinct_texts():
    data = make([("dup", "a")] * 5 + [("other", "a"), ("b1", "b"), ("b2", "b")])
    shot = few_shot(data, per_label=3)
    assert Counter(shot.labels) == {"a": 3, "b": 2}
    assert {"dup", "other"} <= set(shot.texts)


def test_few_shot_rejects_zero():
    with pytest.raises(ValueError, match="per_label"):
        few_shot(sized({"a": 2, "b": 2}), per_label=0)


# -- fingerprint ------------------------------------------------------------------------------------


def test_fingerprint_summarises_without_the_texts(banking):
    fp = fingerprint(banking)
    assert fp["n_rows"] == 10003
    assert fp["n_labels"] == 77
    assert fp["label_counts"] == dict(sorted(Counter(banking.labels).items()))
    assert len(fp["sha256"]) == 64
    dumped = json.dumps(fp)
    assert not any(text in dumped for text in banking.texts if len(text) > 8)


def test_fingerprint_is_stable_and_order_independent(banking):
    rows = list(zip(banking.texts, banking.labels, strict=True))
    random.Random(0).shuffle(rows)
    assert fingerprint(make(rows)) == fingerprint(banking)
    assert fingerprint(load_labelled(BANKING77_TRAIN, "text", "category")) == fingerprint(banking)


def test_fingerprint_changes_with_one_label(banking):
    rows = list(zip(banking.texts, banking.labels, strict=True))
    text, label = rows[500]
    other = next(lab for lab in banking.label_names if lab != label)
    rows[500] = (text, other)
    assert fingerprint(make(rows))["sha256"] != fingerprint(banking)["sha256"]


def test_fingerprint_changes_with_one_text_and_with_a_duplicate():
    base = [("hello", "a"), ("world", "b")]
    fp = fingerprint(make(base))["sha256"]
    assert fingerprint(make([("hello!", "a"), ("world", "b")]))["sha256"] != fp
    assert fingerprint(make([*base, ("hello", "a")]))["sha256"] != fp


def test_fingerprint_ignores_outer_whitespace_and_line_endings():
    a = make([("two\r\nlines ", "a"), ("x", "b")])
    b = make([("  two\nlines", "a"), ("x", "b")])
    assert fingerprint(a) == fingerprint(b)
