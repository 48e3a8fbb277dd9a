"""Out-of-scope rejection without out-of-scope rows: Banking77 with labels held out, head mode.

``--held-out`` labels (default 10, drawn with ``--seed``) are removed from training; their test
rows are the out-of-scope set, the other labels' test rows are in scope. The frozen encoder embeds
train and test once (cached in ``--cache-dir``); every score is computed from those embeddings.

For each score kind the rejection threshold is calibrated on the training data alone, by
leave-labels-out folds (:func:`appliance.factory.oos.calibrate_unknown`), for an in-scope accuracy
loss of at most 0.5 points; the table reports, on the test rows, the out-of-scope recall and the
in-scope accuracy lost at that threshold, and (as a ceiling) the recall of the threshold chosen on
the test rows themselves.

With ``--model NAME[:VERSION]`` the embeddings come from that published model's fp32 encoder (in
``APPLIANCE_HOME``) instead: a fine-tuned encoder, which must have been trained without the
held-out labels (``bench.factory``'s ``oos-finetune`` case holds out the same labels for a seed).
Each score also reports the recall at larger in-scope loss budgets (1, 2 and 5 points), the
trade-off an operator chooses along.

    python -m bench.oos --json-out bench/runs/oos.json      # ~4 min embedding on 2 cores, then ~2 min
    python -m bench.oos --seeds 0 --model banking77-oos-finetune   # seed 0 only: its labels were held out
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from appliance.artifact.head import Head
from appliance.artifact.maths import OOS_SCORES, head_logits, l2_normalize
from appliance.factory.evaluate import threshold_for_loss
from appliance.factory.head import DEFAULT_C, fit_logistic
from appliance.factory.oos import as_stored, calibrate_unknown, scale_of, score_rows, scores

REPO = Path(__file__).resolve().parents[1]
# In-scope accuracy loss budgets (points) beside the product's 0.5, for the trade-off.
LOSS_BUDGETS = (1.0, 2.0, 5.0)
DATA = REPO / "appliance" / "data" / "banking77"


def read(path: Path) -> tuple[list[str], list[str]]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["category"] for r in rows]


def first_per_label(texts: list[str], labels: list[str], limit: int) -> tuple[list[str], list[str]]:
    seen: Counter[str] = Counter()
    kept = []
    for text, label in zip(texts, labels, strict=True):
        seen[label] += 1
        if seen[label] <= limit:
            kept.append((text, label))
    return [t for t, _ in kept], [x for _, x in kept]


def embeddings(cache: Path, limit: int | None, model: str | None = None) -> dict[str, Any]:
    """Train and test texts, labels and fp32 embeddings of the shipped MiniLM (or of ``model``'s
    encoder), cached in ``cache``."""
    if cache.is_file() and model is None:  # a model name may be published again: never cached
        with np.load(cache, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    from appliance.engines.encoder import EncoderConfig, OnnxEncoder
    from appliance.factory.pipeline import _window, base_encoders, default_base
    from appliance.store import ModelStore

    base = default_base()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as home:
        store = ModelStore(None if model else Path(home))
        if model:
            folder = store.encoder_folder(store.load(model).data["encoders"]["fp32"])
        else:
            ids = base_encoders(store, base, lambda m: print(m, file=sys.stderr))
            folder = store.encoder_folder(ids["fp32"])
        encoder = OnnxEncoder(folder, "model.onnx", EncoderConfig(max_length=_window(base)))
        for split in ("train", "test"):
            texts, labels = read(DATA / f"{split}.csv")
            if limit is not None:
                texts, labels = first_per_label(texts, labels, limit)
            t = time.perf_counter()
            out[f"x_{split}"] = encoder.embed(texts)[0]
            print(f"embedded {len(texts)} {split} texts in {time.perf_counter() - t:.0f} s", file=sys.stderr)
            out[f"labels_{split}"] = np.array(labels)
    if model is None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **out)
    return out


def split(data: dict[str, Any], held_out: int, seed: int) -> dict[str, np.ndarray]:
    """Held-out labels out of training; in-scope training rows split 90/10 (fit / held out), as
    ``appliance train`` does without ``--eval-data``; test rows split in scope / out of scope."""
    rng = np.random.default_rng(seed)
    names = np.unique(data["labels_train"])
    unknown = rng.choice(names, held_out, replace=False)
    known = [n for n in names if n not in set(unknown)]
    index = {n: i for i, n in enumerate(known)}
    inside = ~np.isin(data["labels_train"], unknown)
    x, y = data["x_train"][inside], np.array([index[n] for n in data["labels_train"][inside]])
    order = rng.permutation(len(y))
    held = order[: len(y) // 10]
    fit = order[len(y) // 10 :]
    test_in = ~np.isin(data["labels_test"], unknown)
    return {
        "x_fit": x[fit], "y_fit": y[fit], "x_held": x[held], "y_held": y[held],
        "x_test": data["x_test"][test_in],
        "y_test": np.array([index[n] for n in data["labels_test"][test_in]]),
        "x_oos": data["x_test"][~test_in], "n_classes": np.array(len(known)),
        "unknown": np.array(sorted(unknown)),
    }  # fmt: skip


def candidates(
    head: Head, fit_x: np.ndarray, fit_y: np.ndarray, n: int
) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Every measured score (higher: more in scope), from one head and the fit rows' embeddings.
    The two the product offers come from :mod:`appliance.factory.oos`; the rest are defined here."""
    from scipy.special import logsumexp

    refs = as_stored(fit_x)
    means = np.stack([fit_x[fit_y == c].mean(axis=0) for c in range(n)])
    centroids = l2_normalize(means)
    residual = fit_x - means[fit_y]
    cov = residual.T @ residual / len(residual)
    shrunk = 0.5 * cov + 0.5 * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    precision = np.linalg.inv(shrunk)

    def mahalanobis(x: np.ndarray) -> np.ndarray:
        d = x[:, None, :] - means[None]
        return -np.einsum("bcd,de,bce->bc", d, precision, d).min(axis=1)

    def knn(k: int) -> Callable[[np.ndarray], np.ndarray]:
        return lambda x: np.sort(x @ refs.T, axis=1)[:, -k]

    def logits(x: np.ndarray) -> np.ndarray:
        return head_logits(x, head.weight, head.bias)

    return {
        "max_prob": lambda x: head.probs(x).max(axis=1),
        "max_logit": lambda x: logits(x).max(axis=1),
        "energy T=1": lambda x: logsumexp(logits(x), axis=1),
        "energy T=10": lambda x: 10.0 * logsumexp(logits(x) / 10.0, axis=1),
        "centroid cosine": lambda x: (x @ centroids.T).max(axis=1),
        "knn k=1": knn(1),
        "knn k=10": knn(10),
        "mahalanobis (shared cov, shrunk 0.5)": mahalanobis,
    }


def row(name: str, held: np.ndarray, held_ok: np.ndarray, test: np.ndarray, test_ok: np.ndarray,
        oos: np.ndarray) -> dict[str, Any]:  # fmt: skip
    from sklearn.metrics import roc_auc_score

    threshold, _ = threshold_for_loss(held, held_ok)
    ceiling, _ = threshold_for_loss(test, test_ok)
    wider = {}
    for budget in LOSS_BUDGETS:
        at, _ = threshold_for_loss(held, held_ok, budget)
        wider[f"{budget:g}"] = {
            "oos_recall": float((oos < at).mean()),
            "in_scope_loss_points": 100.0 * float((test_ok & (test < at)).mean()),
        }
    return {
        "score": name,
        "oos_recall": float((oos < threshold).mean()),
        "in_scope_loss_points": 100.0 * float((test_ok & (test < threshold)).mean()),
        "at_loss_budgets": wider,
        "ceiling_recall": float((oos < ceiling).mean()),
        "auroc": float(roc_auc_score(np.r_[np.ones(len(test)), np.zeros(len(oos))], np.r_[test, oos])),
    }


def measure(s: dict[str, np.ndarray], seed: int) -> dict[str, Any]:
    n = int(s["n_classes"])

    def fit(x: np.ndarray, y: np.ndarray, classes: int) -> Head:
        return fit_logistic(x, y, classes, DEFAULT_C)

    t = time.perf_counter()
    head = fit(s["x_fit"], s["y_fit"], n)
    fit_s = time.perf_counter() - t
    held_ok = head.probs(s["x_held"]).argmax(axis=1) == s["y_held"]
    test_ok = head.probs(s["x_test"]).argmax(axis=1) == s["y_test"]
    rows = []
    for name, score in candidates(head, s["x_fit"], s["y_fit"], n).items():
        rows.append(row(name, score(s["x_held"]), held_ok, score(s["x_test"]), test_ok, score(s["x_oos"])))
    # the product's kinds, exactly as ``--reject-unknown`` publishes them
    refs = as_stored(s["x_fit"])
    held = score_rows(head, refs, s["x_held"])
    for kind in OOS_SCORES:
        scale = scale_of(held)
        args = [scores(kind, score_rows(head, refs, s[k]), scale) for k in ("x_held", "x_test", "x_oos")]
        rows.append(row(f"{kind} (product)", args[0], held_ok, args[1], test_ok, args[2]))
    t = time.perf_counter()
    spec, _ = calibrate_unknown(
        "oos", s["x_fit"], s["y_fit"], n, fit, head, s["x_held"], s["y_held"], seed=seed
    )
    folds_s = time.perf_counter() - t
    test_scored = score_rows(head, refs, s["x_test"])
    oos_scored = score_rows(head, refs, s["x_oos"])
    scale = spec.scale or (0.0, 1.0, 0.0, 1.0)
    chosen = {
        "kind": spec.score,
        "threshold": spec.threshold,
        "fold_recall_estimate": spec.oos_recall,
        "test_oos_recall": float((scores(spec.score, oos_scored, scale) < spec.threshold).mean()),
        "test_in_scope_loss_points": 100.0
        * float((test_ok & (scores(spec.score, test_scored, scale) < spec.threshold)).mean()),
        "leave_labels_out_seconds": folds_s,
        "head_fit_seconds": fit_s,
    }
    return {
        "unknown_labels": [str(x) for x in s["unknown"]],
        "n_fit": len(s["y_fit"]), "n_held": len(s["y_held"]), "n_test_in": len(s["y_test"]),
        "n_test_oos": len(s["x_oos"]), "test_accuracy": float(test_ok.mean()),
        "scores": rows, "reject_unknown": chosen,
    }  # fmt: skip


def print_table(result: dict[str, Any]) -> None:
    held_out = len(result["unknown_labels"])
    print(f"in-scope test accuracy {result['test_accuracy']:.4f} on {result['n_test_in']} rows; "
          f"{result['n_test_oos']} out-of-scope test rows ({held_out} labels held out)")  # fmt: skip
    wider = "".join(f" {'rec@' + format(b, 'g'):>7s}" for b in LOSS_BUDGETS)
    print(f"{'score':40s} {'oos recall':>10s} {'loss pts':>9s} {'ceiling':>8s} {'AUROC':>6s}{wider}")
    for r in result["scores"]:
        at = "".join(f" {r['at_loss_budgets'][format(b, 'g')]['oos_recall']:7.3f}" for b in LOSS_BUDGETS)
        print(f"{r['score']:40s} {r['oos_recall']:10.3f} {r['in_scope_loss_points']:9.2f} "
              f"{r['ceiling_recall']:8.3f} {r['auroc']:6.3f}{at}")  # fmt: skip
    c = result["reject_unknown"]
    print(f"--reject-unknown chose {c['kind']} (fold estimate {c['fold_recall_estimate']:.3f}): test recall "
          f"{c['test_oos_recall']:.3f} at {c['test_in_scope_loss_points']:.2f} points; folds "
          f"{c['leave_labels_out_seconds']:.0f} s, one head fit {c['head_fit_seconds']:.0f} s")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=Path.home() / ".cache" / "appliance" / "bench-oos",
        help="where the embeddings are cached (one file per --limit)",
    )  # fmt: skip
    parser.add_argument("--limit", type=int, default=None, help="first N rows of each label (smoke runs)")
    parser.add_argument("--held-out", type=int, default=10)
    parser.add_argument(
        "--seeds", default="0", help="comma-separated: which labels are held out, and the splits"
    )
    parser.add_argument("--model", help="embed with this published model's encoder (APPLIANCE_HOME)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    data = embeddings(args.cache_dir / f"embeddings-{args.limit or 'all'}.npz", args.limit, args.model)
    results = []
    for seed in (int(x) for x in args.seeds.split(",")):
        result = measure(split(data, args.held_out, seed), seed) | {"seed": seed}
        print(f"seed {seed}")
        print_table(result)
        results.append(result)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
