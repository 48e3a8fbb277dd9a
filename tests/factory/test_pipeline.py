"""The training pipeline: the int8 gate, input checks, and one real specialist end to end."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from appliance.artifact.manifest import SpecialistFields
from appliance.config import apply_offline_env
from appliance.dataset import DataError
from appliance.engines.specialist import load_specialist
from appliance.errors import InvalidArgument
from appliance.factory import card
from appliance.factory.evaluate import evaluate, precision_at
from appliance.factory.pipeline import INT8_MAX_DROP_POINTS, TrainResult, TrainSpec, gate, train
from appliance.store import ModelStore
from tests.artifact.old_manifest import old_fields

DATA = Path(__file__).resolve().parents[2] / "appliance" / "data" / "banking77"
# Eight intents that MiniLM-L6 separates well: a specialist on them should be nearly always right.
LABELS = (
    "card_arrival",
    "exchange_rate",
    "lost_or_stolen_card",
    "change_pin",
    "top_up_failed",
    "cash_withdrawal_charge",
    "pending_transfer",
    "request_refund",
)


def banking_subset(source: str, target: Path, per_label: int, labels: tuple[str, ...] = LABELS) -> Path:
    """The first ``per_label`` rows of each label, in file order."""
    by_label: dict[str, list[str]] = defaultdict(list)
    with (DATA / source).open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["category"] in labels and len(by_label[row["category"]]) < per_label:
                by_label[row["category"]].append(row["text"])
    with target.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "category"])
        for label in labels:
            writer.writerows([text, label] for text in by_label[label])
    return target


def read_rows(path: Path) -> tuple[list[str], list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [r["text"] for r in rows], [r["category"] for r in rows]


# -- the int8 gate ---------------------------------------------------------------------------------------


def test_gate_publishes_int8_within_the_limit() -> None:
    precision, reason = gate(0.93, 0.928)
    assert precision == "int8"
    assert "0.20 points below fp32" in reason and reason.endswith("int8 published")


def test_gate_keeps_fp32_past_the_limit() -> None:
    precision, reason = gate(0.93, 0.924)
    assert precision == "fp32"
    assert "0.60 points below fp32" in reason and reason.endswith("fp32 kept")
    assert f"at most {INT8_MAX_DROP_POINTS} points" in reason


def test_gate_takes_int8_when_it_is_as_good_or_better() -> None:
    assert gate(0.90, 0.90) == ("int8", gate(0.90, 0.90)[1])
    assert "equal to fp32" in gate(0.90, 0.90)[1]
    precision, reason = gate(0.90, 0.92)
    assert precision == "int8" and "2.00 points above fp32" in reason


def test_a_drop_of_exactly_the_limit_passes() -> None:
    # 186/200 vs 185/200 is a 0.5-point drop, though 100 * (0.93 - 0.925) is 0.5000000000000004
    assert gate(186 / 200, 185 / 200)[0] == "int8"
    assert gate(186 / 200, 184 / 200)[0] == "fp32"


@pytest.mark.parametrize("n", [160, 200, 1000, 3080])
def test_gate_agrees_with_exact_arithmetic(n: int) -> None:
    """Every pair of held-out counts around the limit, against the rule in exact fractions."""
    limit = Fraction(INT8_MAX_DROP_POINTS)
    base = int(0.9 * n)
    for fp32_hits in (base, n):
        for int8_hits in range(max(0, fp32_hits - n // 50), fp32_hits + 3):
            if int8_hits > n:
                continue
            expected = "int8" if Fraction(100 * (fp32_hits - int8_hits), n) <= limit else "fp32"
            assert gate(fp32_hits / n, int8_hits / n)[0] == expected, (fp32_hits, int8_hits)


def test_gate_with_no_tolerance() -> None:
    assert gate(0.9, 0.9, max_drop_points=0.0)[0] == "int8"
    assert gate(0.9, 0.899, max_drop_points=0.0)[0] == "fp32"


def test_the_model_card_records_an_fp32_decision() -> None:
    precision, reason = gate(0.95, 0.90)
    y = np.array([0, 1, 1, 0])
    report = evaluate(np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]]), y, ["a", "b"])
    published = old_fields()
    quantization = {**published["quantization"], "fp32_accuracy": 0.95, "int8_accuracy": 0.90}
    fields = SpecialistFields.model_validate(
        {
            **published,
            "labels": ["a", "b"],
            "precision": precision,
            "quantization": {**quantization, "decision": precision, "reason": reason},
            "encoder": {"id": "cd" * 32, "precision": precision, "window": 256, "dim": 384},
            "encoders": {"fp32": "cd" * 32},
        }
    )
    spec = TrainSpec(data=Path("x.csv"), text_column="text", label_column="label", name="toy")
    text = card.render(spec, fields, report, [], {"total": 1.0})
    assert "Published as **fp32**" in text
    assert reason in text and "fp32 kept" in text
    assert "fp32 held-out accuracy 95.00%, int8 90.00%" in text
    assert "## Promotion" in text and "at most 0.2 points below the champion's" in text


# -- input checks, before any export -----------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelStore:
    apply_offline_env()
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path / "home"))
    return ModelStore(tmp_path / "home")


def spec(tmp_path: Path, **overrides: object) -> TrainSpec:
    values: dict[str, object] = {
        "data": banking_subset("train.csv", tmp_path / "train.csv", 5),
        "text_column": "text",
        "label_column": "category",
        "name": "bank8",
        **overrides,
    }
    return TrainSpec(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"name": "../bank8"}, "invalid model name"),
        ({"name": "Bank8"}, "invalid model name"),
        ({"mode": "lora"}, "unknown mode 'lora'"),
        ({"target_precision": 1.5}, r"target precision 1.5: must be in \(0, 1\]"),
        ({"target_precision": 0.0}, "target precision 0.0"),
        ({"label_column": "label"}, "no label column 'label'"),
    ],
)
def test_bad_specs_are_refused_before_anything_is_stored(
    store: ModelStore, tmp_path: Path, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        train(spec(tmp_path, **overrides), store)
    assert not store.home.exists() or store.names() == []
    assert not store.encoders_root.exists()


def test_a_base_that_is_not_an_encoder_folder_is_refused(store: ModelStore, tmp_path: Path) -> None:
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(InvalidArgument, match="not a local Hugging Face encoder folder"):
        train(spec(tmp_path, base=tmp_path / "not-a-model"), store)
    assert store.names() == []


def test_eval_labels_unknown_to_training_are_refused(store: ModelStore, tmp_path: Path) -> None:
    held = banking_subset("test.csv", tmp_path / "held.csv", 3, (*LABELS, "card_linking"))
    with pytest.raises(DataError, match=r"evaluation labels absent from training data: \['card_linking'\]"):
        train(spec(tmp_path, eval_data=held), store)
    assert store.names() == []


# -- a real specialist, end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def trained(workdir: Path) -> TrainResult:
    """bank8: 40 training rows per intent, evaluated on 20 official test rows per intent."""
    apply_offline_env()
    train_spec = TrainSpec(
        data=banking_subset("train.csv", workdir / "train.csv", 40),
        eval_data=banking_subset("test.csv", workdir / "test.csv", 20),
        text_column="text",
        label_column="category",
        name="bank8",
    )
    messages: list[str] = []
    result = train(train_spec, ModelStore(workdir / "home"), messages.append)
    assert any("exporting the base encoder" in m for m in messages)
    return result


@pytest.mark.slow
def test_the_specialist_is_accurate(trained: TrainResult) -> None:
    metrics = trained.manifest.data["metrics"]
    assert metrics["n"] == 160
    assert metrics["accuracy"] >= 0.8
    assert metrics["macro_f1"] >= 0.8
    assert trained.report.accuracy == metrics["accuracy"]


@pytest.mark.slow
def test_the_manifest_describes_the_model(trained: TrainResult, workdir: Path) -> None:
    store = ModelStore(workdir / "home")
    manifest = store.load("bank8:1")  # verifies hashes and signature
    data = manifest.data
    assert data == trained.manifest.data
    assert (data["name"], data["version"], data["kind"], data["mode"]) == ("bank8", 1, "classifier", "head")
    assert data["labels"] == sorted(LABELS)
    assert set(data["files"]) == {"head.npz", "MODEL_CARD.md", "report.json", "selfcheck.json"}
    check = data["self_check"]  # every held-out row, since there are fewer than 300
    assert (check["file"], check["n"], check["min_agreement"]) == ("selfcheck.json", 160, 0.98)
    assert check["factory_accuracy"] == data["metrics"]["accuracy"] and check["factory_fp32_agreement"] > 0.9
    assert data["encoder"]["dim"] == 384 and data["encoder"]["window"] == 256
    assert set(data["encoders"]) == {"fp32", "int8"}
    assert data["base_encoder"]["name"] == "model" and len(data["base_encoder"]["sha256"]) == 64
    assert data["data"]["train"]["n_rows"] == 320 and data["data"]["train"]["n_labels"] == 8
    assert data["data"]["heldout"]["n_rows"] == 160
    assert data["data"]["heldout_source"] == "eval file"
    cal = data["calibration"]
    assert cal["target_precision"] == 0.99
    assert 0.0 < cal["threshold"] <= 1.0 and 0.0 < cal["coverage"] <= 1.0 and cal["precision"] >= 0.99
    assert data["default_policy"] == "cascade"
    report = json.loads((manifest.folder / "report.json").read_text())
    assert report["accuracy"] == data["metrics"]["accuracy"]
    assert set(trained.timings) >= {"validate", "encoder", "embed", "head", "total"}


@pytest.mark.slow
def test_the_quantization_block_is_consistent(trained: TrainResult) -> None:
    data = trained.manifest.data
    quant = data["quantization"]
    expected = gate(quant["fp32_accuracy"], quant["int8_accuracy"])
    assert (quant["decision"], quant["reason"]) == expected
    assert quant["decision"] == data["precision"] == data["encoder"]["precision"]
    assert data["encoder"]["id"] == data["encoders"][data["precision"]]
    assert quant["drop_points"] == pytest.approx(100 * (quant["fp32_accuracy"] - quant["int8_accuracy"]))
    assert quant["max_drop_points"] == INT8_MAX_DROP_POINTS
    assert data["metrics"]["accuracy"] == quant[f"{data['precision']}_accuracy"]
    # int8 and fp32 are measured separately: two encoder artifacts
    assert data["encoders"]["fp32"] != data["encoders"]["int8"]


@pytest.mark.slow
def test_the_model_card_states_the_precision_decision(trained: TrainResult) -> None:
    text = (trained.manifest.folder / card.CARD_FILE).read_text()
    data = trained.manifest.data
    assert text.startswith("# Model card: bank8")
    assert f"Published as **{data['precision']}**. {data['quantization']['reason']}." in text
    assert f"| accuracy | {100 * data['metrics']['accuracy']:.2f}% |" in text


@pytest.mark.slow
def test_the_published_specialist_reproduces_its_metrics(trained: TrainResult, workdir: Path) -> None:
    store = ModelStore(workdir / "home")
    specialist = load_specialist("bank8", store)
    assert specialist.precision == trained.manifest.data["precision"]
    texts, labels = read_rows(workdir / "test.csv")
    probs, truncated = specialist.probs(texts)
    y = np.array([specialist.labels.index(label) for label in labels])
    assert not any(truncated)
    accuracy = float(np.mean(probs.argmax(axis=1) == y))
    assert accuracy == pytest.approx(trained.manifest.data["metrics"]["accuracy"], abs=1e-9)
    coverage, precision = precision_at(probs, y, specialist.threshold)
    cal = trained.manifest.data["calibration"]
    assert (coverage, precision) == pytest.approx((cal["coverage"], cal["precision"]))


@pytest.mark.slow
def test_a_second_specialist_on_the_same_base_reuses_the_encoders(
    trained: TrainResult, workdir: Path
) -> None:
    store = ModelStore(workdir / "home")
    before = sorted(p.name for p in store.encoders_root.iterdir() if p.is_dir())
    assert sorted(trained.manifest.data["encoders"].values()) == before
    few = TrainSpec(
        data=banking_subset("train.csv", workdir / "train4.csv", 10, LABELS[:4]),
        text_column="text",
        label_column="category",
        name="bank4",
        heldout_fraction=0.2,
    )
    messages: list[str] = []
    second = train(few, store, messages.append).manifest
    assert not any("exporting" in m for m in messages)
    assert sorted(p.name for p in store.encoders_root.iterdir() if p.is_dir()) == before
    assert second.data["encoders"] == trained.manifest.data["encoders"]
    assert second.data["data"]["heldout_source"] == "stratified 20% split"
    assert store.names() == ["bank4", "bank8"]
