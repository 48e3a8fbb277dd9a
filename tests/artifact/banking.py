"""Banking77 rows for the artifact tests: a few labels, under any column names."""

from __future__ import annotations

import csv
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "appliance" / "data" / "banking77"
LABELS = ("card_arrival", "exchange_rate", "lost_or_stolen_card", "change_pin")


def banking_csv(source: str, dst: Path, per_label: int, header: tuple[str, str]) -> Path:
    """``per_label`` rows of each label in LABELS from a Banking77 file, under the given column names."""
    taken = dict.fromkeys(LABELS, 0)
    with (DATA / source).open(newline="", encoding="utf-8") as src, dst.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(header)
        for row in csv.DictReader(src):
            label = row["category"]
            if label in taken and taken[label] < per_label:
                taken[label] += 1
                writer.writerow([row["text"], label])
    return dst


def sample_texts(n_per_label: int = 3) -> list[str]:
    """Test texts of the same labels, plus a long one that the window truncates."""
    texts: list[str] = []
    taken = dict.fromkeys(LABELS, 0)
    with (DATA / "test.csv").open(newline="", encoding="utf-8") as src:
        for row in csv.DictReader(src):
            if row["category"] in taken and taken[row["category"]] < n_per_label:
                taken[row["category"]] += 1
                texts.append(row["text"])
    return [*texts, " ".join(texts * 4)]
