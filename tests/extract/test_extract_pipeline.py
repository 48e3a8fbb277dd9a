"""The extractor factory end to end: train a head-mode extractor on a Restaurant8k subset, export,
publish, then read the published artifact back (verified) and check its spans offline; and the
``appliance train --task extract`` / ``appliance eval`` commands as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.artifact.manifest import SpecialistManifest
from appliance.config import apply_offline_env
from appliance.dataset import load_spans
from appliance.dataset.spans import fingerprint_spans
from appliance.datasets.store import DatasetStore
from appliance.factory.extract import load_tagger, split_spans
from appliance.factory.extract_eval import evaluate_spans
from appliance.store import ModelStore
from tests.helpers.extractor import EXTRACTOR, RESTAURANT8K, build_extractor

APPLIANCE = [sys.executable, "-m", "appliance.cli"]
EXAMPLES = 200


def run(home: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = apply_offline_env({**os.environ, "APPLIANCE_HOME": str(home)})
    return subprocess.run(
        [*APPLIANCE, *map(str, args)], env=env, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelStore]:
    home = tmp_path_factory.mktemp("extract-home")
    store = ModelStore(home)
    build_extractor(store, examples=EXAMPLES)
    return home, store


@pytest.mark.slow
def test_the_published_extractor_reproduces_its_held_out_spans(published: tuple[Path, ModelStore]) -> None:
    _, store = published
    manifest, tagger = load_tagger(EXTRACTOR, store)
    spec = manifest.spec
    assert spec.kind == "span_extractor" and spec.extractor is not None
    assert spec.labels == sorted({"date", "time", "people", "first_name", "last_name"})
    assert spec.extractor.uses_context and spec.extractor.trained_format.format == "dstc8"
    assert (manifest.folder / spec.extractor.tagger.file).is_file()
    assert spec.quantization.metric == "span_f1" and spec.precision == spec.quantization.decision
    assert spec.encoders[spec.precision] == spec.encoder.id
    # The same held-out split, through the published (re-hashed, signature-checked) artifact.
    data = load_spans(RESTAURANT8K / "train_4.json")
    _, heldout = split_spans(data.subset(range(EXAMPLES)), 0.1, 0)
    report = tagger.evaluate(heldout, spec.calibration.target_precision)
    assert report.micro.f1 == pytest.approx(spec.extractor.micro.f1)
    assert report.micro.f1 > 0.3  # far above chance for a frozen encoder on 180 texts
    assert report.calibration.threshold == pytest.approx(spec.calibration.threshold)
    # Offsets index the text as sent, including multi-byte characters and emoji before the span.
    texts = ["🍕🍕 Table for 4 people at 7pm tomorrow, name Zoë Müller", "nothing here"]
    spans, confidences, truncated = tagger.predict(texts, [["people"], []])
    assert truncated == [False, False] and len(confidences) == 2
    assert spans[0], "no span found in a plain booking request"
    for span in spans[0]:
        assert texts[0][span.start : span.end] == span.text and 0.0 < span.confidence <= 1.0
    assert "4" in {s.text.split()[0] for s in spans[0] if s.label == "people"}
    card = (manifest.folder / "MODEL_CARD.md").read_text()
    assert "span F1" in card and "| **micro** |" in card and "Requested-slot context: used" in card
    # An extractor manifest without its extractor fields is not a valid manifest.
    broken = {k: v for k, v in manifest.data.items() if k != "extractor"}
    with pytest.raises(ValueError, match="extractor fields"):
        SpecialistManifest.model_validate(broken)


@pytest.mark.slow
def test_eval_command_reports_span_f1(published: tuple[Path, ModelStore]) -> None:
    home, store = published
    test_file = home / "test_subset.json"
    raw = json.loads((RESTAURANT8K / "test.json").read_text())[:150]
    test_file.write_text(json.dumps(raw))
    done = run(home, "eval", EXTRACTOR, "--data", test_file, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["kind"] == "span_extractor" and result["n"] == 150
    _, tagger = load_tagger(EXTRACTOR, store)
    data = load_spans(test_file)
    spans, confidences, _ = tagger.predict(data.texts, [e.requested_slots for e in data.examples])
    expected = evaluate_spans(spans, [e.spans for e in data.examples], confidences, tagger.labels)
    assert result["micro_f1"] == pytest.approx(expected.micro.f1)
    assert set(result["per_slot"]) == set(tagger.labels)


@pytest.mark.slow
def test_train_command_publishes_an_extractor(published: tuple[Path, ModelStore]) -> None:
    home, store = published  # the base encoder is already exported in this home
    subset = home / "train_subset.jsonl"
    data = load_spans(RESTAURANT8K / "train_4.json")
    rows = [
        {"text": e.text, "spans": [{"label": s.label, "start": s.start, "end": s.end} for s in e.spans]}
        for e in data.examples[:120]
    ]
    subset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = run(home, "train", "--task", "extract", "--data", subset, "--name", "cli-r8k", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["kind"] == "span_extractor" and result["model"] == "cli-r8k:1"
    assert 0.0 <= result["micro_f1"] <= 1.0 and result["quantization"]["metric"] == "span_f1"
    spec = store.load("cli-r8k").spec
    assert spec.extractor is not None and spec.extractor.trained_format.format == "spans_jsonl"
    assert not spec.extractor.uses_context and spec.data.train.n_rows == 108  # a 10% split held out
    # both sets are kept in the dataset store and named from the lineage
    assert spec.lineage is not None and spec.lineage.train_dataset and spec.lineage.golden_dataset
    datasets = DatasetStore(home)
    kept = datasets.get(spec.lineage.train_dataset).spans()
    golden = datasets.get(spec.lineage.golden_dataset).spans()
    assert (len(kept), len(golden)) == (108, 12) and fingerprint_spans(kept) == spec.data.train.model_dump()
    assert not {e.text for e in kept.examples} & {e.text for e in golden.examples}


def test_train_extract_refuses_bad_data_with_located_errors_and_publishes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    rows = [
        {"text": "for 4 people", "spans": [{"label": "people", "start": 4, "end": 5}]},
        {"text": "for 4 people", "spans": [{"label": "people", "start": 4, "end": 99}]},
        {"text": "at 7pm", "spans": [{"label": "time", "start": 3, "end": 3}]},
    ]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = run(tmp_path, "train", "--task", "extract", "--data", bad, "--name", "bad")
    assert done.returncode == 2
    assert f"{bad}:2: span 0 ('people') [4, 99) lies outside the text" in done.stderr
    assert f"{bad}:3: span 0 ('time') ends at 3" in done.stderr
    assert ModelStore(tmp_path).versions("bad") == []


@pytest.mark.slow
def test_finetune_mode_tunes_the_encoder_and_publishes(tmp_path: Path) -> None:
    """A two-step token fine-tune, through the classifier fine-tune's machinery, publishes a
    verified extractor whose summary names its steps and whose encoder is not the base's."""
    from appliance.factory.extract import ExtractSpec, train_extractor

    apply_offline_env()
    store = ModelStore(tmp_path / "home")
    spec = ExtractSpec(
        data=RESTAURANT8K / "train_4.json",
        name="r8k-ft",
        mode="finetune",
        limit=120,
        max_steps=2,
        checkpoint_dir=tmp_path / "ckpt",
    )
    result = train_extractor(spec, store, progress=lambda _: None)
    manifest = store.load("r8k-ft:1")
    summary = manifest.data["finetune"]
    assert manifest.data["mode"] == "finetune"
    assert summary["step"] == 2 and summary["stop_reason"] == "plan complete"
    # 120 examples leave fewer validation texts than early stopping needs: all train, none scored.
    assert summary["val_texts"] == 0 and summary["best_val_span_f1"] is None
    head_store = ModelStore(tmp_path / "head-home")
    head = build_extractor(head_store, name="r8k-head", examples=120)
    assert manifest.encoder_id != head_store.load("r8k-head:1").encoder_id
    assert result.report.n_texts > 0 and head.report.n_texts == result.report.n_texts
