"""Small labelled files written into tmp_path, one per test."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest


@pytest.fixture
def write_csv(tmp_path: Path) -> Callable[..., Path]:
    def write(
        rows: Sequence[Sequence[object]], header: Sequence[str] = ("text", "label"), name="d.csv"
    ) -> Path:
        path = tmp_path / name
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="\t" if name.endswith(".tsv") else ",")
            w.writerow(header)
            w.writerows(rows)
        return path

    return write


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    def write(objects: Sequence[object], name="d.jsonl") -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(o) + "\n" for o in objects), encoding="utf-8")
        return path

    return write


@pytest.fixture
def write_parquet(tmp_path: Path) -> Callable[..., Path]:
    def write(columns: dict[str, list[object]], name="d.parquet") -> Path:
        path = tmp_path / name
        pq.write_table(pa.table(columns), path)
        return path

    return write


@pytest.fixture
def write_bytes(tmp_path: Path) -> Callable[[bytes, str], Path]:
    def write(data: bytes, name: str) -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path

    return write


def _pairs(*labels: str, per_label: int = 2) -> list[list[str]]:
    return [[f"text {i} for {label}", label] for label in labels for i in range(per_label)]


@pytest.fixture
def pairs() -> Callable[..., list[list[str]]]:
    """``pairs("a", "b", per_label=2)``: that many distinct (text, label) rows for each label."""
    return _pairs
