"""The typed manifest: old manifests load, new ones record columns and lineage, signatures hold."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from appliance.artifact.manifest import SCHEMA_VERSION, SpecialistManifest
from appliance.errors import IntegrityError
from appliance.factory.pipeline import TrainSpec, train
from appliance.store import MANIFEST, Manifest, ModelStore
from tests.artifact.banking import banking_csv
from tests.artifact.old_manifest import INT8_ID, LABELS, old_fields, old_manifest


def test_an_old_manifest_reads_as_schema_1_without_columns_or_lineage() -> None:
    spec = SpecialistManifest.model_validate(old_manifest())
    assert spec.schema_version == 1
    assert spec.columns is None and spec.lineage is None
    assert (spec.name, spec.version, spec.ref) == ("b8", 1, "b8:1")
    assert spec.kind == "classifier" and spec.labels == LABELS
    assert spec.encoder.id == INT8_ID and spec.encoder.window == 256 and spec.encoders["fp32"] != INT8_ID
    assert spec.calibration.threshold == pytest.approx(0.36069250106811523)
    assert spec.quantization.decision == "int8"
    assert spec.head.regularisation_C == 30.0
    assert spec.metrics["n"] == 60 and isinstance(spec.metrics["n"], int)
    assert spec.data.train.label_counts == dict.fromkeys(LABELS, 40)
    assert spec.default_policy == "cascade" and spec.finetune is None


def test_an_old_manifest_published_and_signed_loads_and_verifies(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with store.staging("b8") as stage:
        (stage.folder / "head.npz").write_bytes(b"head")
        committed = stage.commit(old_fields())
    loaded = store.load("b8")  # re-hashes the files and checks the signature over the bytes
    assert loaded.data == committed.data
    raw = json.loads((loaded.folder / MANIFEST).read_bytes())
    assert raw == loaded.data and "schema_version" not in raw  # nothing rewritten on read
    assert loaded.spec.schema_version == 1 and loaded.spec.labels == LABELS
    assert loaded.encoder_id == INT8_ID


def test_a_nan_calibration_precision_survives(tmp_path: Path) -> None:
    """No threshold reaches the target: the factory writes NaN, and it reads back as NaN."""
    fields = old_fields()
    fields["calibration"] = {**fields["calibration"], "precision": float("nan"), "coverage": 0.0}
    store = ModelStore(tmp_path)
    with store.staging("b8") as stage:
        stage.commit(fields)
    assert math.isnan(store.load("b8").spec.calibration.precision)


def test_keys_from_a_newer_factory_are_ignored() -> None:
    data = {**old_manifest(), "schema_version": SCHEMA_VERSION + 1, "something_new": {"a": 1}}
    assert SpecialistManifest.model_validate(data).schema_version == SCHEMA_VERSION + 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "regressor"}, "kind"),
        ({"labels": []}, "labels"),
        ({"labels": ["a", "a", "b"]}, "unique"),
        ({"precision": "int4"}, "precision"),
        ({"encoders": {"fp32": INT8_ID, "int8": "f" * 64}}, "not the int8 encoder"),
    ],
)
def test_malformed_manifests_are_refused(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SpecialistManifest.model_validate({**old_manifest(), **change})


def test_a_store_manifest_that_is_no_specialist_is_an_integrity_error(tmp_path: Path) -> None:
    data = old_manifest()
    del data["calibration"]
    with pytest.raises(IntegrityError, match="not a specialist manifest"):
        _ = Manifest(tmp_path, data).spec


@pytest.mark.slow
def test_the_factory_records_columns_lineage_and_schema(published: tuple[ModelStore, Manifest]) -> None:
    store, manifest = published
    spec = store.load(manifest.name).spec
    assert spec.schema_version == SCHEMA_VERSION
    assert spec.columns is not None and (spec.columns.text, spec.columns.label) == ("utterance", "intent")
    assert spec.lineage is not None
    assert spec.lineage.parent_version is None  # the first version of its name
    assert spec.lineage.trained_from.source == "train.csv"
    assert spec.lineage.trained_from.fingerprint == spec.data.train.sha256
    # the typed view is the signed JSON, key for key (compared as JSON text: NaN is not equal to itself)
    typed = spec.model_dump()
    assert json.dumps(typed, sort_keys=True) == json.dumps(
        {k: manifest.data[k] for k in typed}, sort_keys=True
    )


@pytest.mark.slow
def test_a_new_version_names_its_parent(tmp_path: Path, tiny_base: Path) -> None:
    header = ("text", "label")
    spec = TrainSpec(
        data=banking_csv("train.csv", tmp_path / "first.csv", 12, header),
        text_column="text",
        label_column="label",
        name="bank4",
        base=tiny_base,
        heldout_fraction=0.25,
    )
    store = ModelStore(tmp_path / "home")
    first = train(spec, store, progress=lambda _msg: None).manifest.spec
    spec.data = banking_csv("train.csv", tmp_path / "second.csv", 16, header)
    second = train(spec, store, progress=lambda _msg: None).manifest.spec
    assert first.lineage is not None and first.lineage.parent_version is None
    assert second.lineage is not None and second.lineage.parent_version == first.version == 1
    assert second.lineage.trained_from.source == "second.csv"
    assert second.lineage.trained_from.fingerprint != first.lineage.trained_from.fingerprint
