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

from appliance.artifact.head import Head
from appliance.artifact.manifest import OutOfScope
from appliance.artifact.maths import nearest_similarity, oos_score
from appliance.artifact.rejection import Rejection
from appliance.config import apply_offline_env
from appliance.factory.evaluate import calibrate_rejection, oos_scores, threshold_for_loss
from appliance.factory.head import fit_logistic
from appliance.factory.oos import calibrate_unknown, leave_labels_out
from appliance.store import ModelStore

if TYPE_CHECKING:
    from tests.security.test_security_server import LiveServer

DATA = Path(__file__).resolve().parents[2] / "appliance" / "data" / "banking77"
IN_SCOPE, OUT_OF_SCOPE = 12, 5  # labels, in sorted order: the first kept, the next relabelled oos
MODEL = "bankoos"
UNKNOWN = "bankunknown"  # trained without oos rows, with --reject-unknown max_prob_knn
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


def test_scores_on_known_examples() -> None:
    refs = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    x = np.array([[0.6, 0.8], [1.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(nearest_similarity(x, refs), [0.8, 1.0], rtol=1e-6)
    probs = np.array([[0.7, 0.3], [0.5, 0.5]])
    np.testing.assert_allclose(oos_score("max_prob", probs, None, (0, 1, 0, 1)), [0.7, 0.5])
    # standardised (top - 0.6) / 0.1 and (similarity - 0.9) / 0.1, averaged
    got = oos_score("max_prob_knn", probs, np.array([0.8, 1.0]), (0.6, 0.1, 0.9, 0.1))
    np.testing.assert_allclose(got, [0.5 * (1.0 - 1.0), 0.5 * (-1.0 + 1.0)], atol=1e-9)
    with pytest.raises(ValueError, match="needs"):
        oos_score("max_prob_knn", probs, None, (0, 1, 0, 1))


def test_threshold_for_loss_counts_only_right_answers() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    correct = np.array([False, True, True, True, True, True, True, True, True, True])
    # 10 points of 10 rows: one right answer may go; the wrong 0.1 goes for free
    threshold, lost = threshold_for_loss(scores, correct, max_loss_points=10.0)
    assert threshold == pytest.approx(0.3) and lost == pytest.approx(10.0)
    threshold, lost = threshold_for_loss(scores, correct, max_loss_points=0.0)
    assert threshold == pytest.approx(0.2) and lost == 0.0


def test_manifests_from_before_score_kinds_mean_the_top_probability() -> None:
    old = {"label": "oos", "threshold": 0.5, "max_accuracy_loss_points": 0.5}
    spec = OutOfScope.model_validate(
        old | {"in_scope_accuracy_loss_points": 0.1, "oos_recall": 0.4, "heldout_oos": 9}
    )
    assert spec.score == "max_prob" and spec.calibrated_on == "oos_rows"
    rejection = Rejection(spec, None)
    probs = np.array([[0.45, 0.55], [0.2, 0.8]])
    assert list(rejection.scores(probs, np.zeros((2, 3))) < 0.5) == [False, False]
    assert rejection.rejects(0.49, None) and not rejection.rejects(0.5, None)


def clusters(n_classes: int, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Tight clusters around random unit directions in 32 dimensions, normalised."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, 32))
    y = np.repeat(np.arange(n_classes), per_class)
    x = centres[y] + 0.3 * rng.normal(size=(len(y), 32))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def fit(x: np.ndarray, y: np.ndarray, n: int) -> Head:  # the factory's head fit
    return fit_logistic(x, y, n, 30.0)


def test_leave_labels_out_finds_held_out_clusters_and_calibrate_keeps_the_budget() -> None:
    x_all, y_all = clusters(20, 40, seed=1)
    held = np.arange(len(y_all)) % 4 == 0
    x, y, x_held, y_held = x_all[~held], y_all[~held], x_all[held], y_all[held]
    results = leave_labels_out(x, y, 20, fit, seed=0)
    assert len(results) == 3 and all(r.n_oos == 2 * 30 for r in results)
    # a held-out cluster lies far from every training row: the knn score rejects most of it
    assert np.mean([r.recall["max_prob_knn"] for r in results]) > 0.8
    head = fit(x, y, 20)
    spec, refs = calibrate_unknown("oos", x, y, 20, fit, head, x_held, y_held, kind="max_prob_knn")
    assert spec.score == "max_prob_knn" and spec.calibrated_on == "leave_labels_out" and refs is not None
    assert spec.in_scope_accuracy_loss_points <= 0.5 and spec.scale is not None
    rejection = Rejection(spec, refs)
    held_scores = rejection.scores(head.probs(x_held), x_held)
    right = head.probs(x_held).argmax(axis=1) == y_held
    assert 100 * float((right & (held_scores < spec.threshold)).mean()) <= 0.5
    with pytest.raises(ValueError, match="auto or one of"):
        calibrate_unknown("oos", x, y, 20, fit, head, x_held, y_held, kind="energy")


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


@pytest.fixture(scope="module")
def trained_unknown(trained: tuple[Path, Path]) -> Path:
    """The home with UNKNOWN published beside MODEL: the same rows less the oos ones, rejection
    calibrated on leave-labels-out folds with the knn score."""
    home, _ = trained
    source = relabelled("train.csv", home.parent / "train_with_oos.csv", 40)
    with source.open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] != "oos"]
    train_file = home.parent / "train_known.csv"
    with train_file.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "category"])
        writer.writeheader()
        writer.writerows(rows)
    done = run(
        home, "train", "--data", train_file, "--label-column", "category", "--name", UNKNOWN,
        "--reject-unknown", "max_prob_knn", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return home


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
def live(trained: tuple[Path, Path], trained_unknown: Path) -> Iterator[LiveServer]:
    from appliance.security.pki import ensure_local_pki
    from tests.security.test_security_server import LiveServer

    home, _ = trained
    ensure_local_pki(home / "pki")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("APPLIANCE_HOME", str(home))
        with LiveServer(home, models=(MODEL, UNKNOWN)) as server:
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


@pytest.mark.slow
def test_reject_unknown_calibrates_without_oos_rows_and_eval_reports_it(trained_unknown: Path) -> None:
    home = trained_unknown
    spec = ModelStore(home).load(UNKNOWN).spec
    assert spec.oos is not None and spec.oos.calibrated_on == "leave_labels_out"
    assert spec.oos.score == "max_prob_knn" and spec.oos.references in spec.files
    assert spec.oos.in_scope_accuracy_loss_points <= 0.5 and "oos" not in spec.labels
    test_file = relabelled("test.csv", home.parent / "test_unknown.csv", 20)
    done = run(home, "eval", UNKNOWN, "--data", test_file, "--json")
    assert done.returncode == 0, done.stderr
    out = last_json(done.stdout)
    assert out["oos_score"] == "max_prob_knn" and out["n_oos"] == 20 * OUT_OF_SCOPE
    for key in OOS_KEYS:
        assert isinstance(out[key], float) and 0.0 <= out[key] <= 1.0, (key, out[key])


@pytest.mark.slow
@pytest.mark.integration
def test_a_text_rejected_by_the_knn_score_is_served_as_oos(
    trained: tuple[Path, Path], trained_unknown: Path, live: LiveServer
) -> None:
    from appliance.engines.specialist import load_specialist
    from appliance.security.tokens import TokenStore

    home, test_file = trained
    model = load_specialist(UNKNOWN, ModelStore(home))
    assert model.spec.oos is not None and model.rejection is not None
    with test_file.open(newline="", encoding="utf-8") as f:
        texts = [r["text"] for r in csv.DictReader(f)]
    probs, score, _ = model.scored(texts)
    assert score is not None
    offline = [
        "oos" if s < model.spec.oos.threshold else model.labels[int(i)]
        for s, i in zip(score, probs.argmax(axis=1), strict=True)
    ]
    # the clearest rejection, the clearest keep, and the two nearest the threshold on either side
    margin = score - model.spec.oos.threshold
    below, above = np.flatnonzero(margin < 0), np.flatnonzero(margin >= 0)
    assert below.size and above.size
    picks = [int(below[np.argmin(margin[below])]), int(above[np.argmax(margin[above])])]
    picks += [int(below[np.argmax(margin[below])]), int(above[np.argmin(margin[above])])]
    secret = TokenStore(home / "tokens" / "tokens.json").create("unknown-reader", [f"classify:{UNKNOWN}"])
    with live.client(secret) as client:
        served = client.classify(UNKNOWN, [texts[i] for i in picks]).results
    assert [s.route for s in served] == ["specialist"] * len(picks)
    assert served[0].label == "oos" and served[1].label in model.labels
    # near the threshold, int8 or kernel rounding may tip a row: only clear margins must agree
    for s, i in zip(served, picks, strict=True):
        if abs(margin[i]) > 1e-3:
            assert s.label == offline[i], (texts[i], margin[i])
