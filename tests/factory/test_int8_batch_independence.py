"""A text's answer does not depend on its batch: the published int8 encoder, run by ONNX Runtime,
gives every text the same label and embedding alone, in batches of 64 of mixed lengths (so with
padding), in any order, and through the offline encoder's length-sorted batches.

The encoder is the factory's int8 export of the packaged MiniLM-L6; the head is a logistic head
trained on its fp32 embeddings of Banking77 training texts. Dynamic int8 fails this (min cosine
0.98, about 1% of labels move): its activation scales come from the whole batch. The tests' small
random BERT does not show it, since the same few tokens set every batch's scale there.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest

from appliance.artifact.head import Head
from appliance.artifact.maths import l2_normalize
from appliance.config import apply_offline_env
from appliance.engines.encoder import EncoderConfig, OnnxEncoder
from appliance.factory.export import export_encoder_folders
from appliance.factory.head import DEFAULT_C, fit_logistic
from appliance.factory.pipeline import default_base

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[2] / "appliance" / "data" / "banking77"
N_TEXTS = 320
BATCH = 64
MIN_COSINE = 0.9999


def banking(name: str, n: int) -> tuple[list[str], list[str]]:
    """Every k-th row of a Banking77 file: every intent, 2 to 80 words."""
    with (DATA / name).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    rows = rows[:: max(1, len(rows) // n)][:n]
    return [r["text"] for r in rows], [r["category"] for r in rows]


def banking_texts(n: int) -> list[str]:
    return banking("test.csv", n)[0]


def encoder(folder: Path) -> OnnxEncoder:
    return OnnxEncoder(folder, "model.onnx", EncoderConfig(max_length=128, intra_op_threads=1))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    apply_offline_env()
    return export_encoder_folders(default_base(), tmp_path_factory.mktemp("int8-export"))


@pytest.fixture(scope="module")
def int8_encoder(exported: dict[str, Path]) -> OnnxEncoder:
    return encoder(exported["int8"])


@pytest.fixture(scope="module")
def head(exported: dict[str, Path]) -> Head:
    texts, labels = banking("train.csv", 1500)
    names = sorted(set(labels))
    y = np.array([names.index(x) for x in labels])
    return fit_logistic(encoder(exported["fp32"]).embed(texts)[0], y, len(names), DEFAULT_C)


def in_batches(encoder: OnnxEncoder, rows: list[list[int]], order: list[int]) -> np.ndarray:
    """Pooled, normalised rows, run ``BATCH`` at a time in ``order`` (each batch padded to its longest)."""
    out = np.empty((len(rows), encoder.dim), dtype=np.float32)
    for start in range(0, len(order), BATCH):
        chunk = order[start : start + BATCH]
        out[chunk] = l2_normalize(encoder.run_padded([rows[i] for i in chunk]))
    return out


def test_every_text_gets_the_same_answer_alone_and_in_any_batch(
    int8_encoder: OnnxEncoder, head: Head
) -> None:
    texts = banking_texts(N_TEXTS)
    rows = int8_encoder.tokenize(texts).ids
    assert min(map(len, rows)) < 8 and max(map(len, rows)) > 40  # batches mix short and long texts
    alone = l2_normalize(np.concatenate([int8_encoder.run_padded([row]) for row in rows]))
    shuffled = list(range(len(rows)))
    random.Random(7).shuffle(shuffled)
    runs = {
        "shuffled batches of 64": in_batches(int8_encoder, rows, shuffled),
        "reversed batches of 64": in_batches(int8_encoder, rows, shuffled[::-1]),
        "input-order batches of 64": in_batches(int8_encoder, rows, list(range(len(rows)))),
        "length-sorted embed()": int8_encoder.embed(texts)[0],
    }
    labels = head.probs(alone).argmax(axis=1)
    for name, vectors in runs.items():
        cosine = np.sum(alone * vectors, axis=1)
        worst = int(cosine.argmin())
        assert cosine.min() >= MIN_COSINE, f"{name}: cosine {cosine.min():.6f} for {texts[worst]!r}"
        changed = np.flatnonzero(head.probs(vectors).argmax(axis=1) != labels)
        assert changed.size == 0, f"{name}: {changed.size} labels moved, e.g. {texts[changed[0]]!r}"


def test_padding_does_not_change_a_row(int8_encoder: OnnxEncoder) -> None:
    """One text padded next to ever longer texts: its embedding stays the same."""
    texts = banking_texts(N_TEXTS)
    rows = sorted(int8_encoder.tokenize(texts).ids, key=len)
    short = rows[0]
    alone = l2_normalize(int8_encoder.run_padded([short]))[0]
    for longer in rows[len(rows) // 2 :: 20]:
        padded = l2_normalize(int8_encoder.run_padded([short, longer]))[0]
        assert float(alone @ padded) >= MIN_COSINE, f"padded to {len(longer)} tokens"
