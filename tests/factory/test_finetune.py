"""Encoder fine-tuning, through the real pipeline and the real MiniLM-L6 encoder, on a Banking77 subset.

Runs are kept short with ``max_minutes=0`` (every run makes exactly one step) or ``max_steps``, so
that no assertion depends on how fast the machine is.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from appliance.config import apply_offline_env
from appliance.errors import InvalidArgument
from appliance.factory import finetune as ft
from appliance.factory.pipeline import TrainSpec, base_encoders, default_base, train
from appliance.store import ModelStore

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[2] / "appliance" / "data" / "banking77"
LABELS = 8


def subset(source: Path, target: Path, per_label: int) -> Path:
    """The first ``per_label`` rows of the first ``LABELS`` categories (sorted by name)."""
    with source.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by_label: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        by_label[row["category"]].append(row)
    keep = sorted(by_label)[:LABELS]
    with target.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "category"])
        writer.writeheader()
        for label in keep:
            writer.writerows(by_label[label][:per_label])
    return target


def texts_and_labels(path: Path) -> tuple[list[str], np.ndarray]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names = sorted({r["category"] for r in rows})
    return [r["text"] for r in rows], np.array([names.index(r["category"]) for r in rows])


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    apply_offline_env()
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def spec_for(tmp_path: Path, train_file: Path, **kw: object) -> TrainSpec:
    return TrainSpec(
        data=train_file,
        eval_data=subset(DATA / "test.csv", tmp_path / "test.csv", 10),
        text_column="text",
        label_column="category",
        name="bank8",
        mode="finetune",
        **kw,  # type: ignore[arg-type]
    )


def test_finetune_publishes_and_resumes(tmp_path: Path, home: Path) -> None:
    train_file = subset(DATA / "train.csv", tmp_path / "train.csv", 20)  # 20 a label: classifier
    ckpt = tmp_path / "ckpt"
    store = ModelStore()
    first_log: list[str] = []
    first = train(
        spec_for(tmp_path, train_file, max_minutes=0.0, checkpoint_dir=ckpt, finetune_strategy="classifier"),
        store,
        first_log.append,
    )
    (saved,) = ckpt.glob("finetune-*.pt")
    state = ft.read_checkpoint(saved)["state"]
    assert state["step"] == 1 and not state["done"]
    assert any("fine-tuning (classifier)" in m for m in first_log)

    second_log: list[str] = []
    second = train(
        spec_for(tmp_path, train_file, max_minutes=0.0, checkpoint_dir=ckpt, finetune_strategy="classifier"),
        store,
        second_log.append,
    )
    assert any(f"resuming fine-tuning from {saved} at step 1 " in m for m in second_log)
    resumed = ft.read_checkpoint(saved)["state"]
    assert resumed["step"] == 2
    assert [h["step"] for h in resumed["history"]] == [1, 2]  # the first run's evaluation is kept

    base_ids = set(base_encoders(store, default_base(), lambda _: None).values())
    for result, version in ((first, 1), (second, 2)):
        manifest = store.load(f"bank8:{version}")
        assert manifest.data["mode"] == "finetune"
        assert manifest.encoder_id not in base_ids
        assert set(manifest.data["encoders"].values()).isdisjoint(base_ids)
        assert manifest.data["metrics"]["n"] == LABELS * 10
        assert manifest.data["metrics"]["accuracy"] == result.report.accuracy
        # A step or two at a warm-up learning rate must leave a working encoder (chance is 1/8).
        assert result.report.accuracy > 0.5


def test_same_seed_same_weights_and_changed_from_base(tmp_path: Path) -> None:
    apply_offline_env()
    texts, y = texts_and_labels(subset(DATA / "train.csv", tmp_path / "t.csv", 20))
    spec = TrainSpec(data=tmp_path, text_column="", label_column="", name="x", seed=3)
    runs = [
        ft.finetune_encoder(spec, default_base(), texts, y, LABELS, 64, lambda _: None, max_steps=7)
        for _ in range(2)
    ]
    a, b = (r.encoder.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary = runs[0].summary
    # auto is cpft: a contrastive stage on its share of the fixed steps, then the classifier.
    assert summary["strategy"] == "cpft" and summary["stages"] == ["contrastive", "classifier"]
    assert [s["step"] for s in summary["stage_summaries"]] == [1, 6]
    assert all(s["stop_reason"] == "plan complete" for s in summary["stage_summaries"])
    # Each evaluation scores the raw weights and their moving average; the better is kept.
    last = summary["stage_summaries"][1]["history"][-1]
    assert {"val_accuracy", "val_accuracy_ema"} <= set(last)
    assert summary["best_val_accuracy"] == max(
        max(h["val_accuracy"], h["val_accuracy_ema"]) for h in summary["history"]
    )
    assert summary["best_weights"] in ("raw", "ema")
    from transformers import AutoModel

    base = AutoModel.from_pretrained(default_base(), local_files_only=True).state_dict()
    assert any(not torch.equal(a[k], base[k]) for k in a)


def test_contrastive_batches_are_label_distinct(tmp_path: Path) -> None:
    apply_offline_env()
    texts, y = texts_and_labels(subset(DATA / "train.csv", tmp_path / "t.csv", 10))
    assert ft.few_shot_data(y)
    train_idx, val_idx = ft.validation_split(y, ft.VAL_FRACTION, seed=0)
    assert np.bincount(y[val_idx]).tolist() == [1] * LABELS
    settings = ft.settings_for("contrastive", len(train_idx))
    data = ft.Data([[0]] * len(y), y, train_idx, val_idx)
    for batch in ft.Batches(settings, data, seed=0).epoch(0):
        anchors, positives = batch[0::2], batch[1::2]
        assert (y[anchors] == y[positives]).all()
        assert len(set(y[anchors].tolist())) == len(anchors)  # no false in-batch negatives
        assert set(batch) <= set(train_idx.tolist())

    spec = TrainSpec(data=tmp_path, text_column="", label_column="", name="x")
    result = ft.finetune_encoder(
        spec, default_base(), texts, y, LABELS, 64, lambda _: None, strategy="contrastive", max_steps=2
    )
    assert result.summary["strategy"] == "contrastive" and result.summary["step"] == 2
    assert 0.0 <= result.summary["best_val_accuracy"] <= 1.0


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    spec = TrainSpec(data=tmp_path, text_column="", label_column="", name="x")
    y = np.array([0, 0, 1, 1])
    with pytest.raises(InvalidArgument, match="unknown fine-tuning strategy"):
        ft.finetune(spec, default_base(), ["a", "b", "c", "d"], y, 2, 64, print, strategy="setfit")
    with pytest.raises(InvalidArgument, match="at least two labels"):
        ft.finetune(spec, default_base(), ["a", "b"], np.array([0, 0]), 2, 64, print)
    with pytest.raises(InvalidArgument, match="texts but"):
        ft.finetune(spec, default_base(), ["a"], y, 2, 64, print)
    spec.finetune_overrides = {"label_smothing": 0.0}
    with pytest.raises(InvalidArgument, match="unknown fine-tuning settings"):
        ft.finetune(spec, default_base(), ["a b", "c d", "e f", "g h"], y, 2, 64, print, max_steps=1)
