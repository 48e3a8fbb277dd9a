"""The demonstration index on a real published specialist: opt-in at train time, signed with the
artifact, and searched by the specialist's own ONNX encoder."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from appliance.engines.specialist import load_specialist
from appliance.factory.pipeline import TrainSpec, train
from appliance.router.cascade import ModelRef
from appliance.router.retrieval import DEMONSTRATIONS_FILE, DemonstrationIndex, SpecialistRetriever
from appliance.store import ModelStore
from tests.serving.specialists import sample_texts, subset

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[2] / "appliance" / "data" / "banking77"


def test_train_stores_an_index_only_when_asked_and_the_retriever_finds_neighbours(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "home")
    data = subset(DATA / "train.csv", tmp_path / "train.csv", 12, 0)
    held = subset(DATA / "test.csv", tmp_path / "test.csv", 6, 0)
    common = {"data": data, "eval_data": held, "text_column": "text", "label_column": "category"}
    with_index = train(TrainSpec(name="withdemos", demonstrations=True, **common), store).manifest
    without = train(TrainSpec(name="nodemos", **common), store).manifest

    assert DEMONSTRATIONS_FILE in with_index.data["files"]  # hashed and signed with the artifact
    assert not (without.folder / DEMONSTRATIONS_FILE).exists()
    with (data).open(newline="") as f:
        rows = list(csv.DictReader(f))
    index = DemonstrationIndex.load(with_index.folder)
    assert index is not None and len(index) == len(rows)
    assert sorted(index.labels) == sorted(r["category"] for r in rows)

    retriever = SpecialistRetriever()
    specialist = load_specialist("withdemos", store)
    own = [r["text"] for r in rows[:3]]
    found = retriever.nearest(specialist, own, 4)
    assert [f[0].text for f in found] == own  # a training text's nearest example is itself
    assert all(len(f) == 4 for f in found)
    # held-out texts: most of their nearest examples carry their own label
    tests = sample_texts(per_label=3)
    near = retriever.nearest(specialist, [t for t, _ in tests], 1)
    agree = sum(n[0].label == label for n, (_, label) in zip(near, tests, strict=True))
    assert agree >= 0.6 * len(tests)
    assert retriever.nearest(load_specialist("nodemos", store), own, 4) == [[], [], []]
    assert retriever.nearest(ModelRef.of(specialist), own, 4) == [[], [], []]
