"""The serving path's head bank gives the same labels through the kernel and the reference, on
real Banking77 embeddings from the exported MiniLM encoder, with two specialists' heads mixed in
one batch (as when several specialists share an encoder)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from appliance.artifact.maths import l2_normalize
from appliance.engines.encoder import EncoderConfig, OnnxEncoder
from appliance.factory.head import fit_logistic
from appliance.factory.pipeline import base_encoders, default_base
from appliance.serve.runtime import HeadTable, _Row
from appliance.store import ModelStore

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parents[2] / "appliance" / "data" / "banking77"


class _Head:
    def __init__(self, weight: np.ndarray, bias: np.ndarray) -> None:
        self.weight, self.bias = weight, bias


class _Spec:
    def __init__(self, name: str, head: _Head, labels: list[str]) -> None:
        self.name, self.version, self.head, self.labels = name, 1, head, labels


class _Loaded:
    """What HeadTable reads of a loaded specialist: its key and its head (as a classifier)."""

    def __init__(self, spec: _Spec) -> None:
        self.specialist = self.classifier = spec
        self.key = (spec.name, 1)


def rows(path: Path, limit_per_label: int) -> list[tuple[str, str]]:
    seen: dict[str, int] = {}
    out = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if seen.get(row["category"], 0) < limit_per_label:
                seen[row["category"]] = seen.get(row["category"], 0) + 1
                out.append((row["text"], row["category"]))
    return out


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> OnnxEncoder:
    store = ModelStore(tmp_path_factory.mktemp("parity-home"))
    ids = base_encoders(store, default_base(), progress=lambda _: None)
    return OnnxEncoder(store.encoder_folder(ids["int8"]), "model.onnx", EncoderConfig())


def test_kernel_and_reference_agree_on_real_embeddings(encoder: OnnxEncoder, monkeypatch) -> None:
    train = rows(DATA / "train.csv", 12)
    test = rows(DATA / "test.csv", 2)  # 154 texts, 77 intents
    labels = sorted({y for _, y in train})
    coarse = sorted({y.split("_")[0] for y in labels})  # a second specialist: 20-odd coarse groups
    x_train = l2_normalize(encoder.pooled(encoder.tokenize([t for t, _ in train])))
    fine = fit_logistic(x_train, np.array([labels.index(y) for _, y in train]), len(labels), 30.0)
    rough = fit_logistic(
        x_train, np.array([coarse.index(y.split("_")[0]) for _, y in train]), len(coarse), 30.0
    )
    models = [_Loaded(_Spec("fine", _Head(fine.weight, fine.bias), labels))]
    models.append(_Loaded(_Spec("coarse", _Head(rough.weight, rough.bias), coarse)))
    table = HeadTable(models)  # type: ignore[arg-type]
    pooled = encoder.pooled(encoder.tokenize([t for t, _ in test]))
    batch = [_Row(models[i % 2], 3, True) for i in range(len(test))]  # type: ignore[arg-type]

    monkeypatch.setenv("APPLIANCE_KERNEL", "reference")
    ref_ids, ref_scores, ref_full = table.apply(pooled, batch)
    monkeypatch.setenv("APPLIANCE_KERNEL", "triton")
    ker_ids, ker_scores, ker_full = table.apply(pooled, batch)

    np.testing.assert_array_equal(ker_ids, ref_ids)
    np.testing.assert_allclose(ker_scores, ref_scores, atol=1e-5)
    assert ref_full is not None and ker_full is not None
    np.testing.assert_allclose(ker_full, ref_full, atol=1e-5)
    fine_rows = [i for i in range(len(test)) if i % 2 == 0]
    accuracy = np.mean([labels[ref_ids[i, 0]] == test[i][1] for i in fine_rows])
    assert accuracy > 0.6  # real embeddings, a real head: the labels mean something
