"""Retrain end to end on a small Banking77 subset: corrections in, a challenger out that is not served.

A real champion is trained (head mode) into a private home; its training and golden sets land in the
dataset store. Corrections are recorded in a real escalation database; ``appliance retrain`` (the
command, in-process and as a killed subprocess) trains from the store, never from the original file.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.config import apply_offline_env
from appliance.dataset.records import LabelledRow
from appliance.datasets.store import DatasetStore
from appliance.errors import FailedPrecondition
from appliance.factory.pipeline import TrainSpec, train
from appliance.factory.retrain import RetrainSpec, plan
from appliance.feedback.core import record
from appliance.router.escalations import (
    CorrectionRequest,
    DecisionRecord,
    EscalationRecord,
    EscalationStore,
    database_path,
)
from appliance.store import ModelStore, iter_staging
from appliance.types import Cost
from tests.factory.test_pipeline import DATA, LABELS, banking_subset

pytestmark = pytest.mark.slow
NAME = "bank8"
COST = Cost(core_seconds=0.01)


def fresh_rows(skip: int, n: int) -> list[tuple[str, str]]:
    """``n`` rows per label of Banking77's train file after its first ``skip``: texts bank8:1 never saw."""
    seen: dict[str, int] = {}
    out = []
    with (DATA / "train.csv").open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            label = row["category"]
            if label in LABELS:
                seen[label] = seen.get(label, 0) + 1
                if skip < seen[label] <= skip + n:
                    out.append((row["text"], label))
    return out


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A home with bank8:1 trained on 12 rows per intent, its golden set 6 official test rows per intent."""
    apply_offline_env()
    work = tmp_path_factory.mktemp("retrain")
    path = work / "home"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("APPLIANCE_HOME", str(path))
        spec = TrainSpec(
            data=banking_subset("train.csv", work / "train.csv", 12),
            eval_data=banking_subset("test.csv", work / "test.csv", 6),
            text_column="text",
            label_column="category",
            name=NAME,
        )
        train(spec, ModelStore(path), lambda _: None)
        yield path


def test_the_champion_names_its_training_and_golden_sets(home: Path) -> None:
    models, datasets = ModelStore(home), DatasetStore(home)
    lineage = models.load(f"{NAME}:1").spec.lineage
    assert lineage is not None and lineage.train_dataset and lineage.golden_dataset
    assert models.load(f"{NAME}:1").spec.stage == "champion"
    trained = datasets.get(lineage.train_dataset)
    golden = datasets.golden_for(NAME)
    assert golden is not None and golden.digest == lineage.golden_dataset
    assert trained.info.n_rows == 96 and golden.info.n_rows == 48
    assert {r.role for r in golden.info.refs} == {"golden"} and {r.role for r in trained.info.refs} == {
        "train"
    }
    assert not {r.text for r in trained.rows} & {r.text for r in golden.rows}


def test_nothing_new_is_a_failed_precondition(home: Path) -> None:
    with pytest.raises(
        FailedPrecondition, match="nothing new to retrain bank8:1 on: no corrections recorded"
    ):
        plan(RetrainSpec(NAME), ModelStore(home), DatasetStore(home))


def test_corrections_without_their_texts_are_counted_but_cannot_train(home: Path, tmp_path: Path) -> None:
    db = tmp_path / "e.db"
    with EscalationStore(db) as store:  # store_texts off
        store.record_decisions(
            [DecisionRecord(NAME, 1, "specialist", "cascade", COST, 1.0, "r", item=0, text="x")]
        )
        record(
            store,
            ModelStore(home),
            NAME,
            CorrectionRequest(source="human:t", request_id="r", label=LABELS[0]),
        )
    with pytest.raises(FailedPrecondition, match=r"1 correction\(s\) were recorded without their text"):
        plan(RetrainSpec(NAME), ModelStore(home), DatasetStore(home), db)


@pytest.fixture(scope="module")
def corrected(home: Path) -> dict[str, object]:
    """In the home's escalation database: 16 corrected specialist answers, a corrected golden text,
    and 4 confident generalist answers."""
    models = ModelStore(home)
    golden = DatasetStore(home).golden_for(NAME)
    assert golden is not None
    rows = fresh_rows(12, 2)
    distill = fresh_rows(14, 1)[:4]
    with EscalationStore(database_path(home), store_texts=True) as store:
        decisions = [
            DecisionRecord(
                NAME, 1, "specialist", "cascade", COST, 1.0, "req-a", item=i, label=LABELS[0], text=t
            )
            for i, (t, _) in enumerate(rows)
        ]
        decisions.append(
            DecisionRecord(
                NAME, 1, "specialist", "cascade", COST, 1.0, "req-g", item=0, text=golden.rows[0].text
            )
        )
        escalations = [
            EscalationRecord(
                model=NAME, model_version=1, text=t, specialist_top=[(label, 0.3)], specialist_confidence=0.3,
                threshold=0.8, generalist_label=label, generalist_confidence=0.95, final_label=label,
                route="generalist", policy="cascade", cost=COST, request_id=f"req-e{i}",
            )
            for i, (t, label) in enumerate(distill)
        ]  # fmt: skip
        store.record(escalations, decisions)
        for i, (_, label) in enumerate(rows):
            record(
                store,
                models,
                NAME,
                CorrectionRequest(source="human:t", request_id="req-a", item=i, label=label),
            )
        other = LABELS[1] if golden.labelled().labels[0] != LABELS[1] else LABELS[2]
        record(store, models, NAME, CorrectionRequest(source="human:t", request_id="req-g", label=other))
    return {"corrected": rows, "distilled": distill}


def test_a_retrain_publishes_a_challenger_that_is_not_served(
    home: Path, corrected: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    models, datasets = ModelStore(home), DatasetStore(home)
    assert models.serving_version(NAME) is None  # nothing chosen yet: the newest serves
    assert main(["retrain", NAME, "--include-generalist-labels", "0.9", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["challenger"]["model"] == f"{NAME}:2" and summary["serving"] == f"{NAME}:1"
    assert (summary["corrections_used"], summary["corrections_on_golden"], summary["distilled"]) == (16, 1, 4)
    assert models.versions(NAME) == [1, 2]
    assert models.serving_version(NAME) == 1 and models.served_version(NAME) == 1  # SERVING was pinned first
    challenger = models.load(f"{NAME}:2").spec
    champion = models.load(f"{NAME}:1").spec
    assert (
        challenger.stage == "challenger" and challenger.lineage is not None and champion.lineage is not None
    )
    assert challenger.lineage.parent_version == 1 and challenger.lineage.corrections == 16
    assert challenger.lineage.distilled == 4
    assert challenger.lineage.golden_dataset == champion.lineage.golden_dataset  # the same golden set
    trained = datasets.get(challenger.lineage.train_dataset or "").rows
    origins = {r.text: r.origin for r in trained if isinstance(r, LabelledRow)}
    assert all(origins[t] == "correction:human:t" for t, _ in corrected["corrected"])  # type: ignore[attr-defined]
    assert all(origins[t] == "generalist" for t, _ in corrected["distilled"])  # type: ignore[attr-defined]
    golden = datasets.get(champion.lineage.golden_dataset or "").rows
    assert not {r.text for r in golden} & set(origins)  # no golden row is trained on
    assert len(trained) == 96 + 16 + 4
    assert challenger.data.heldout.n_rows == 48 and challenger.data.heldout_source.startswith("golden set ")


def test_corrections_before_since_are_not_new(home: Path, corrected: dict[str, object]) -> None:
    later = time.time() + 3600
    with pytest.raises(FailedPrecondition, match="nothing new to retrain bank8:1 on since "):
        plan(RetrainSpec(NAME, since=later), ModelStore(home), DatasetStore(home))
    assert plan(RetrainSpec(NAME), ModelStore(home), DatasetStore(home)).corrections == 16


def test_an_interrupted_retrain_leaves_the_champion_serving_and_no_version(
    home: Path, corrected: dict[str, object]
) -> None:
    models = ModelStore(home)
    before = models.versions(NAME)
    env = {**os.environ, "APPLIANCE_HOME": str(home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "retrain", NAME],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("embedding "):  # inside training: the staging folder exists
                proc.send_signal(signal.SIGKILL)
                break
        else:
            pytest.fail("the retrain ended before it trained")
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert models.versions(NAME) == before and models.served_version(NAME) == 1
    # what the kill left behind is a staging folder, never a version
    assert all(p.name.startswith(".staging-") for p in iter_staging(models.models_root))


def test_datasets_list_show_rm_and_the_models_show_notice(
    home: Path, corrected: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    challenger = ModelStore(home).load(f"{NAME}:2").spec.lineage
    assert challenger is not None and challenger.train_dataset
    digest = challenger.train_dataset
    assert main(["datasets", "list", "--json"]) == 0
    listed = {d["digest"]: d for d in json.loads(capsys.readouterr().out)}
    assert listed[digest]["rows"] == 116 and listed[digest]["names"][0]["role"] == "train"
    assert main(["datasets", "show", digest[:10], "--rows", "1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["models"] == [f"{NAME}:2"] and len(shown["first_rows"]) == 1
    assert main(["datasets", "rm", digest[:12]]) == 0
    assert f"{NAME}:2" in capsys.readouterr().out
    assert main(["models", "show", f"{NAME}:2"]) == 0
    err = capsys.readouterr().err
    assert f"its training set {digest[:12]} was deleted from the dataset store" in err
    assert main(["datasets", "show", digest]) == 2
    assert "deleted, or never stored here" in capsys.readouterr().err
