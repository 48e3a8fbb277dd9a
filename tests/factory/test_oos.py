"""Out-of-scope rows: ``appliance train --oos-label``, the rejection threshold, ``eval --json`` and
the served answer.

The calibration maths is checked on hand-made probabilities; the rest runs the real commands on
Banking77 with the real MiniLM encoder (head mode), five labels relabelled ``oos``, and a real
gRPC server over the serving runtime.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from appliance.config import apply_offline_env
from appliance.factory.evaluate import calibrate_rejection, oos_scores
from appliance.store import ModelStore

if TYPE_CHECKING:
    from tests.security.test_security_server import LiveServer

DATA = Path(__file__).resolve().parents[2] / "appliance" / "data" / "banking77"
IN_SCOPE, OUT_OF_SCOPE = 12, 5  # labels, in sorted order: the first kept, the next relabelled oos
MODEL = "bankoos"
OOS_KEYS = ("oos_recall", "oos_precision", "in_scope_accuracy")


def test_rejection_threshold_keeps_the_accuracy_constraint_and_maximises_recall() -> None:
    rng = np.random.default_rng(0)
    n, classes = 400, 4
    y = rng.integers(0, classes, n)
    probs = rng.dirichlet(np.ones(classes) * 0.3, n)
    probs[np.arange(n), y] += 1.0  # mostly right and confident
    probs /= probs.sum(axis=1, keepdims=True)
    oos_probs = rng.dirichlet(np.ones(classes) * 3.0, 100)  # flat: low top probability
    threshold, lost, recall = calibrate_rejection(probs, y, oos_probs, max_loss_points=0.5)
    assert lost <= 0.5
    scores = oos_scores(probs, y, oos_probs, threshold)
    assert scores["oos_recall"] == pytest.approx(recall) and recall > 0.5
    base = float((probs.argmax(axis=1) == y).mean())
    assert 100 * (base - scores["in_scope_accuracy"]) == pytest.approx(lost)
    # any higher threshold breaks the constraint: this one is the best recall that keeps it
    above = np.sort(np.unique(probs.max(axis=1)))
    above = above[above > threshold]
    if above.size:
        worse = oos_scores(probs, y, oos_probs, float(above[0]) + 1e-12)
        assert 100 * (base - worse["in_scope_accuracy"]) > 0.5


def test_nothing_rejected_means_no_precision() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    scores = oos_scores(probs, np.array([0, 1]), np.array([[0.7, 0.3]]), threshold=0.5)
    assert scores["oos_recall"] == 0.0 and np.isnan(scores["oos_precision"])
    assert scores["in_scope_accuracy"] == 1.0


# -- the real commands -------------------------------------------------------------------------------


def relabelled(source: str, target: Path, per_label: int) -> Path:
    """``per_label`` rows of the first IN_SCOPE labels, and of the next OUT_OF_SCOPE labelled oos."""
    with (DATA / source).open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by_label: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        by_label[row["category"]].append(row["text"])
    names = sorted(by_label)
    with target.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "category"])
        for i, name in enumerate(names[: IN_SCOPE + OUT_OF_SCOPE]):
            writer.writerows((t, name if i < IN_SCOPE else "oos") for t in by_label[name][:per_label])
    return target


def run(home: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = apply_offline_env({**os.environ, "APPLIANCE_HOME": str(home)})
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def last_json(stdout: str) -> dict[str, object]:
    import json

    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(home, evaluation file) with the oos-trained specialist published."""
    work = tmp_path_factory.mktemp("oos")
    home = work / "home"
    train_file = relabelled("train.csv", work / "train.csv", 40)
    test_file = relabelled("test.csv", work / "test.csv", 20)
    done = run(
        home, "train", "--data", train_file, "--eval-data", test_file, "--label-column", "category",
        "--name", MODEL, "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return home, test_file


@pytest.mark.slow
def test_train_stores_a_rejection_threshold_and_oos_is_not_a_class(trained: tuple[Path, Path]) -> None:
    home, _ = trained
    spec = ModelStore(home).load(MODEL).spec
    assert "oos" not in spec.labels and len(spec.labels) == IN_SCOPE
    assert spec.oos is not None and spec.oos.label == "oos"
    assert spec.oos.heldout_oos == 20 * OUT_OF_SCOPE
    assert spec.oos.in_scope_accuracy_loss_points <= spec.oos.max_accuracy_loss_points == 0.5
    assert 0.0 < spec.oos.threshold < 1.0 and 0.0 < spec.oos.oos_recall <= 1.0


@pytest.mark.slow
def test_eval_json_reports_out_of_scope_scores(trained: tuple[Path, Path]) -> None:
    home, test_file = trained
    done = run(home, "eval", MODEL, "--data", test_file, "--json")
    assert done.returncode == 0, done.stderr
    out = last_json(done.stdout)
    for key in OOS_KEYS:
        value = out[key]
        assert isinstance(value, float) and 0.0 <= value <= 1.0, (key, value)
    spec = ModelStore(home).load(MODEL).spec
    assert spec.oos is not None
    assert out["oos_recall"] == pytest.approx(spec.oos.oos_recall)
    assert out["n"] == 20 * IN_SCOPE and out["n_oos"] == 20 * OUT_OF_SCOPE


@pytest.fixture(scope="module")
def live(trained: tuple[Path, Path]) -> Iterator[LiveServer]:
    from appliance.security.pki import ensure_local_pki
    from tests.security.test_security_server import LiveServer

    home, _ = trained
    ensure_local_pki(home / "pki")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("APPLIANCE_HOME", str(home))
        with LiveServer(home, models=(MODEL,)) as server:
            yield server


@pytest.mark.slow
@pytest.mark.integration
def test_a_rejected_text_is_served_as_oos_by_the_specialist(
    trained: tuple[Path, Path], live: LiveServer
) -> None:
    from appliance.engines.specialist import load_specialist
    from appliance.security.tokens import TokenStore

    home, test_file = trained
    model = load_specialist(MODEL, ModelStore(home))
    assert model.spec.oos is not None
    with test_file.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    oos_texts = [r["text"] for r in rows if r["category"] == "oos"]
    in_texts = [r["text"] for r in rows if r["category"] != "oos"]
    oos_top = model.probs(oos_texts)[0].max(axis=1)
    in_top = model.probs(in_texts)[0].max(axis=1)
    rejected = oos_texts[int(np.argmin(oos_top))]
    kept = in_texts[int(np.argmax(in_top))]
    assert oos_top.min() < model.spec.oos.threshold <= in_top.max()

    secret = TokenStore(home / "tokens" / "tokens.json").create("oos-reader", [f"classify:{MODEL}"])
    with live.client(secret) as client:
        served = client.classify(MODEL, [rejected, kept]).results
    assert served[0].label == "oos" and served[0].route == "specialist"
    assert served[0].confidence == pytest.approx(float(oos_top.min()), abs=1e-3)
    assert served[1].label in model.labels and served[1].route == "specialist"
