"""Small real specialists for serving tests: a Banking77 subset through the real factory."""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from pathlib import Path

from appliance.factory.pipeline import TrainSpec, train
from appliance.store import Manifest, ModelStore

DATA = Path(__file__).resolve().parents[2] / "appliance" / "data" / "banking77"
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


def subset(src: Path, dst: Path, per_label: int, seed: int) -> Path:
    rows: dict[str, list[str]] = defaultdict(list)
    with src.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["category"] in LABELS:
                rows[row["category"]].append(row["text"])
    rng = random.Random(seed)
    with dst.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "category"])
        for label in LABELS:
            for text in rng.sample(rows[label], min(per_label, len(rows[label]))):
                writer.writerow([text, label])
    return dst


def sample_texts(per_label: int = 5) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    seen: dict[str, int] = defaultdict(int)
    with (DATA / "test.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["category"] in LABELS and seen[row["category"]] < per_label:
                seen[row["category"]] += 1
                out.append((row["text"], row["category"]))
    return out


def train_subset(store: ModelStore, name: str, workdir: Path, per_label: int = 40, seed: int = 0) -> Manifest:
    workdir.mkdir(parents=True, exist_ok=True)
    data = subset(DATA / "train.csv", workdir / f"train-{seed}.csv", per_label, seed)
    held = subset(DATA / "test.csv", workdir / "test.csv", 20, 0)
    spec = TrainSpec(
        data=data, eval_data=held, text_column="text", label_column="category", name=name, seed=seed
    )
    return train(spec, store).manifest
