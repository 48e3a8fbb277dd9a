"""Retraining benchmark: a simulated deployment on Banking77 with reviewers, a gate and promotion.

One command, in-process, head mode (frozen MiniLM-L6 + logistic-regression head):

1. Every Banking77 text (train and test) is embedded ONCE by the fp32 ONNX encoder the factory
   exports, and cached (``--cache-dir``); later runs read the cache. The specialist's compute per
   decision is measured on that pass (process CPU seconds per text) and kept with the cache.
2. The training file is split once: a stratified 10% calibration set (thresholds), a stratified
   10% golden set (the gate's frozen set, held out once, never trained on), and the rest, the pool.
   The champion is trained on 10 examples per intent from the pool; the rest of the pool arrives
   as live traffic in 5 rounds. The official test set is used only to report.
3. Per round, the serving version decides every text of the round (automated at or above its
   calibrated threshold, else escalated); a reviewer corrects at most ``--review`` (200) queued
   decisions, ground truth standing in for the reviewer; a challenger is trained on the seed
   examples and every label reviewers gave so far, calibrated, and gated against the serving
   version on the golden set by :mod:`appliance.loop.gate` (accuracy within 0.2 points, coverage
   at precision 0.99 no lower, McNemar mid-p); it is promoted if it passes, refused otherwise.
4. Two queues side by side from the same champion: uncertainty-ranked (lowest confidence first)
   and random. The ceiling: the same recipe on the whole pool with true labels. And the last
   round replayed from the uncertainty arm's state before it with a noisy reviewer (``--noise``,
   30% of the labels replaced by another intent at random), to show what the gate does with it.

The head and the threshold are the factory's own functions (``fit_logistic``, ``DEFAULT_C``,
``calibrate_threshold``, ``precision_at``), run in-process on the cached embeddings.

Cost per 1,000 decisions: every decision pays the specialist (measured here); an escalated one
also pays the generalist, COMPUTED as in bench/cascade.py: Llama-3-8B's FLOPs for a 675-token
prompt and a 14-token answer (the lengths measured in bench/CASCADE.md) on one accelerator at an
assumed 400 TFLOP/s and 4 USD/h. Prices of the specialist use :class:`CostModel` (2 USD/h box).

    python -m bench.retrain --out-dir bench/retrain_out            # the real run (minutes)
    python -m bench.retrain --quick --out-dir /tmp/retrain-smoke   # smoke: a small subset
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from appliance.artifact.head import Head  # noqa: E402
from appliance.factory.evaluate import calibrate_threshold, precision_at  # noqa: E402
from appliance.factory.head import DEFAULT_C, fit_logistic  # noqa: E402
from appliance.loop.gate import GateConfig, LabelledTexts, Predictions, Verdict, judge  # noqa: E402
from bench.cascade import (  # noqa: E402
    DEFAULT_ACCELERATOR_PRICE_PER_HOUR,
    DEFAULT_ACCELERATOR_TFLOPS,
    LLAMA3_8B,
)

DATA = REPO / "appliance" / "data" / "banking77"
TARGET = 0.99
PROMPT_TOKENS, COMPLETION_TOKENS = 675.0, 14.0  # the tiny generalist's measured lengths (CASCADE.md)
WINDOW = 128  # the factory's default window; Banking77 texts are far shorter


# -- data and embeddings -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rows:
    texts: list[str]
    y: np.ndarray  # label ids
    x: np.ndarray  # L2-normalised fp32 embeddings


def read_csv(path: Path) -> tuple[list[str], list[str]]:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [r["text"] for r in rows], [r["category"] for r in rows]


def embed_cached(texts: list[str], cache_dir: Path, home: Path) -> tuple[np.ndarray, float]:
    """Embeddings of ``texts`` and the measured CPU seconds per text, computed once per text list."""
    from appliance.engines.encoder import EncoderConfig, OnnxEncoder
    from appliance.factory.pipeline import base_encoders, default_base
    from appliance.store import ModelStore

    key = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    path = cache_dir / f"embeddings-{key}.npz"
    if path.is_file():
        cached = np.load(path)
        return cached["x"], float(cached["cpu_s_per_text"])
    store = ModelStore(home)
    ids = base_encoders(store, default_base(), lambda message: print(f"  {message}", file=sys.stderr))
    encoder = OnnxEncoder(store.encoder_folder(ids["fp32"]), "model.onnx", EncoderConfig(max_length=WINDOW))
    encoder.embed(texts[:64])  # warm-up, not charged
    started = time.process_time()
    x, _ = encoder.embed(texts)
    per_text = (time.process_time() - started) / len(texts)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x.astype(np.float32), cpu_s_per_text=per_text)
    return x, per_text


def stratified_indices(
    y: np.ndarray, fraction: float, rng: np.random.Generator, pool: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, taken): about ``fraction`` of each label's rows of ``pool`` taken, at least one."""
    taken = []
    for label in np.unique(y[pool]):
        rows = pool[y[pool] == label]
        k = max(1, round(fraction * len(rows)))
        taken.extend(rng.choice(rows, size=k, replace=False).tolist())
    taken_arr = np.array(sorted(taken))
    return np.setdiff1d(pool, taken_arr), taken_arr


# -- models ------------------------------------------------------------------------------------------


@dataclass
class Version:
    number: int
    head: Head
    threshold: float
    trained_on: int  # examples
    reviewer_labels: int  # of them, reviewer labels

    def probs(self, x: np.ndarray) -> np.ndarray:
        return self.head.probs(x)


@dataclass(frozen=True)
class EmbeddedPredictor:
    """A version answering texts from the cached embeddings (the gate's Predictor)."""

    version: Version
    rows: dict[str, int]
    x: np.ndarray
    labels: list[str]

    def predict(self, texts: Sequence[str]) -> Predictions:
        probs = self.version.probs(self.x[[self.rows[t] for t in texts]])
        top = probs.argmax(axis=1)
        confidence = probs[np.arange(len(top)), top]
        return Predictions([self.labels[i] for i in top], confidence, self.version.threshold)


@dataclass(frozen=True)
class Costs:
    specialist_cpu_s: float
    specialist_price: float
    generalist_price_computed: float
    currency: str

    def per_thousand(self, automated_share: float) -> float:
        return 1000.0 * (self.specialist_price + (1.0 - automated_share) * self.generalist_price_computed)


@dataclass(frozen=True)
class ArmState:
    """Where an arm stands: the serving version, and the labelled rows (seed + reviewed) so far."""

    serving: Version
    rows: np.ndarray
    given: np.ndarray  # the labels the rows carry (a reviewer's, right or not)
    spent: int  # reviewer labels spent


class Simulation:
    def __init__(
        self, args: argparse.Namespace, train: Rows, test: Rows, labels: list[str], costs: Costs
    ) -> None:
        self.args = args
        self.train, self.test, self.labels, self.costs = train, test, labels, costs
        rng = np.random.default_rng(args.seed)
        everything = np.arange(len(train.y))
        rest, self.calibration = stratified_indices(train.y, 0.1, rng, everything)
        self.pool, self.golden = stratified_indices(train.y, 0.1 / 0.9, rng, rest)
        self.seed_rows = np.concatenate(
            [
                rng.permutation(self.pool[train.y[self.pool] == c])[: args.seed_per_label]
                for c in range(len(labels))
            ]
        )
        traffic = rng.permutation(np.setdiff1d(self.pool, self.seed_rows))
        self.rounds = np.array_split(traffic, args.rounds)
        index: dict[str, int] = {}
        for i, text in enumerate(train.texts):
            index.setdefault(text, i)
        self.index = index
        golden_texts = [train.texts[i] for i in self.golden]
        self.golden_set = LabelledTexts(golden_texts, [labels[train.y[i]] for i in self.golden], "golden")
        self._numbers = 0

    def fit(self, rows: np.ndarray, y: np.ndarray, reviewer_labels: int) -> Version:
        head = fit_logistic(self.train.x[rows], y, len(self.labels), DEFAULT_C)
        probs = head.probs(self.train.x[self.calibration])
        pred = probs.argmax(axis=1)
        correct = (pred == self.train.y[self.calibration]).astype(np.float64)
        threshold = calibrate_threshold(probs[np.arange(len(pred)), pred], correct, TARGET).threshold
        self._numbers += 1
        return Version(self._numbers, head, threshold, len(rows), reviewer_labels)

    def predictor(self, version: Version) -> EmbeddedPredictor:
        return EmbeddedPredictor(version, self.index, self.train.x, self.labels)

    def on_test(self, version: Version) -> dict[str, float]:
        probs = version.probs(self.test.x)
        coverage, precision = precision_at(probs, self.test.y, version.threshold)
        return {
            "test_accuracy": float((probs.argmax(axis=1) == self.test.y).mean()),
            "test_coverage_at_0.99": coverage,
            "test_precision_at_threshold": precision,
        }

    def review(
        self, version: Version, rows: np.ndarray, queue: str, noise: float, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """(reviewed rows, the labels the reviewer gave) for at most ``--review`` decisions."""
        k = min(self.args.review, len(rows))
        if queue == "uncertainty":
            confidence = version.probs(self.train.x[rows]).max(axis=1)
            chosen = rows[np.argsort(confidence, kind="stable")[:k]]
        else:
            chosen = rng.choice(rows, size=k, replace=False)
        given = self.train.y[chosen].copy()
        wrong = rng.random(k) < noise
        shift = rng.integers(1, len(self.labels), size=k)  # another intent, uniformly
        given[wrong] = (given[wrong] + shift[wrong]) % len(self.labels)
        return chosen, given

    def start(self, champion: Version) -> ArmState:
        return ArmState(champion, self.seed_rows.copy(), self.train.y[self.seed_rows].copy(), 0)

    def run_arm(
        self,
        queue: str,
        state: ArmState,
        rounds: Sequence[np.ndarray],
        noise: float,
        seed: int,
        first: int = 1,
    ) -> tuple[list[dict[str, Any]], list[ArmState]]:
        """Rounds ``first``, ``first + 1``, ... from ``state``; the rows reported and the state
        after each round."""
        rng = np.random.default_rng(seed)
        out: list[dict[str, Any]] = []
        if first == 1:
            out.append({"round": 0, "queue": queue, "serving": state.serving.number, "labels_spent": 0})
            out[-1].update(self.on_test(state.serving))
        states = []
        for r, traffic in enumerate(rounds, start=first):
            started = time.perf_counter()
            serving = state.serving
            confidence = serving.probs(self.train.x[traffic]).max(axis=1)
            automated = float((confidence >= serving.threshold).mean())
            reviewed, labels = self.review(serving, traffic, queue, noise, rng)
            spent = state.spent + len(reviewed)
            rows, given = np.concatenate([state.rows, reviewed]), np.concatenate([state.given, labels])
            challenger = self.fit(rows, given, spent)
            corrected = LabelledTexts(
                [self.train.texts[i] for i in reviewed],
                [self.labels[g] for g in labels],
                "reviewed this round",
            )
            versions = (serving.number, challenger.number)
            predictors = (self.predictor(serving), self.predictor(challenger))
            config = GateConfig(target_precision=TARGET)
            verdict = judge("banking77", versions, predictors, self.golden_set, corrected, config)
            state = ArmState(challenger if verdict.passed else serving, rows, given, spent)
            states.append(state)
            out.append(
                {
                    "round": r,
                    "queue": queue,
                    "noise": noise,
                    "traffic": len(traffic),
                    "answered_alone": automated,
                    "labels_spent": spent,
                    f"cost_per_1000_{self.costs.currency}": self.costs.per_thousand(automated),
                    "challenger": challenger.number,
                    "challenger_test": self.on_test(challenger),
                    "gate": _verdict_summary(verdict),
                    "serving": state.serving.number,
                    **self.on_test(state.serving),
                    "seconds": time.perf_counter() - started,
                }
            )
        return out, states


def _verdict_summary(v: Verdict) -> dict[str, Any]:
    return {
        "passed": v.passed,
        "failed_checks": [c.name for c in v.checks if not c.passed],
        "golden_accuracy_delta_points": v.golden.accuracy_delta_points,
        "golden_coverage_delta_points": v.golden.coverage_delta_points,
        "mcnemar_b": v.golden.test.b,
        "mcnemar_c": v.golden.test.c,
        "p_mid": v.golden.test.p_mid,
        "p_exact": v.golden.test.p_exact,
    }


def price(cpu_s_per_text: float, args: argparse.Namespace) -> Costs:
    from appliance.router.cost import CostModel

    box = CostModel()
    accelerator = CostModel(
        price_per_hour=args.accelerator_price_per_hour, currency=box.currency, accelerators=1
    )
    gen_accel_s = LLAMA3_8B.flops(PROMPT_TOKENS, COMPLETION_TOKENS) / (args.assumed_accelerator_tflops * 1e12)
    return Costs(
        specialist_cpu_s=cpu_s_per_text,
        specialist_price=box.price(cpu_s_per_text).price,
        generalist_price_computed=accelerator.price(0.0, gen_accel_s).price,
        currency=box.currency,
    )


# -- the run -----------------------------------------------------------------------------------------


def load(args: argparse.Namespace, home: Path) -> tuple[Rows, Rows, list[str], float]:
    train_texts, train_labels = read_csv(DATA / "train.csv")
    test_texts, test_labels = read_csv(DATA / "test.csv")
    labels = sorted(set(train_labels))
    if args.quick:  # a few intents, few texts: the smoke setting
        rng = np.random.default_rng(args.seed)
        keep = set(rng.choice(labels, size=args.quick_labels, replace=False).tolist())
        labels = sorted(keep)
        train_pairs = [(t, lab) for t, lab in zip(train_texts, train_labels, strict=True) if lab in keep]
        test_pairs = [(t, lab) for t, lab in zip(test_texts, test_labels, strict=True) if lab in keep]
        train_texts, train_labels = (list(v) for v in zip(*train_pairs, strict=True))
        test_texts, test_labels = (list(v) for v in zip(*test_pairs, strict=True))
    index = {label: i for i, label in enumerate(labels)}
    x, cpu_s = embed_cached(train_texts + test_texts, args.cache_dir, home)
    n = len(train_texts)
    train = Rows(train_texts, np.array([index[v] for v in train_labels]), x[:n])
    test = Rows(test_texts, np.array([index[v] for v in test_labels]), x[n:])
    return train, test, labels, cpu_s


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="retrain-home-") as scratch:
        home = args.home or Path(scratch)
        train, test, labels, cpu_s = load(args, home)
    embedded = time.perf_counter() - started
    costs = price(cpu_s, args)
    sim = Simulation(args, train, test, labels, costs)
    champion = sim.fit(sim.seed_rows, train.y[sim.seed_rows], 0)
    uncertainty, states = sim.run_arm("uncertainty", sim.start(champion), sim.rounds, 0.0, args.seed + 1)
    random_queue, _ = sim.run_arm("random", sim.start(champion), sim.rounds, 0.0, args.seed + 1)
    arms = {"uncertainty": uncertainty, "random": random_queue}
    # The last round again, from the same state, with a reviewer who gets --noise of the labels wrong.
    before_last = states[-2] if len(states) > 1 else sim.start(champion)
    noisy, _ = sim.run_arm(
        "uncertainty", before_last, sim.rounds[-1:], args.noise, args.seed + 2, first=len(sim.rounds)
    )
    everything = np.concatenate([sim.seed_rows, *sim.rounds])
    ceiling = sim.fit(everything, train.y[everything], len(everything) - len(sim.seed_rows))
    return {
        "setting": {
            "quick": args.quick,
            "labels": len(labels),
            "train_texts": len(train.texts),
            "test_texts": len(test.texts),
            "calibration": len(sim.calibration),
            "golden": len(sim.golden),
            "seed_examples": len(sim.seed_rows),
            "traffic_per_round": [len(r) for r in sim.rounds],
            "review_per_round": args.review,
            "noise": args.noise,
            "target_precision": TARGET,
            "gate": asdict(GateConfig(target_precision=TARGET)),
            "head_C": DEFAULT_C,
        },
        "costs": {
            **asdict(costs),
            "specialist": "measured: process CPU seconds per text over the one embedding pass",
            "generalist": (
                f"COMPUTED: {LLAMA3_8B.name}, {PROMPT_TOKENS:g}+{COMPLETION_TOKENS:g} tokens, "
                f"{args.assumed_accelerator_tflops:g} TFLOP/s assumed, "
                f"{args.accelerator_price_per_hour:g}/h assumed"
            ),
        },
        "arms": arms,
        "noisy_round": noisy,
        "ceiling": {"trained_on": ceiling.trained_on, **sim.on_test(ceiling)},
        "seconds": {"embed_or_cache": embedded, "total": time.perf_counter() - started},
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ceiling = result["ceiling"]
    currency = result["costs"]["currency"]
    panels = [
        ("test_accuracy", "test accuracy (serving version)", ceiling["test_accuracy"]),
        ("test_coverage_at_0.99", "test coverage at precision 0.99", ceiling["test_coverage_at_0.99"]),
        ("answered_alone", "share of the round's traffic answered alone", None),
        (f"cost_per_1000_{currency}", f"cost per 1,000 decisions ({currency}; generalist computed)", None),
    ]
    for ax, (key, title, line) in zip(axes.flat, panels, strict=True):
        for queue, rows in result["arms"].items():
            points = [(r["labels_spent"], r[key]) for r in rows if key in r]
            ax.plot(*zip(*points, strict=True), marker="o", label=f"{queue} queue")
            for r in rows:
                if r.get("gate") and not r["gate"]["passed"] and key in r:
                    ax.annotate("refused", (r["labels_spent"], r[key]), fontsize=7)
        for r in result["noisy_round"]:
            if key in r:
                verdict = "passed" if r["gate"]["passed"] else "refused"
                ax.scatter([r["labels_spent"]], [r[key]], marker="x", color="red", zorder=3,
                           label=f"last round, {r['noise']:.0%} wrong labels (gate {verdict})")  # fmt: skip
        if line is not None:
            ax.axhline(line, linestyle="--", color="grey", label="ceiling (full pool)")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("reviewer labels spent")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Banking77 retraining loop ({result['setting']['labels']} intents, head mode)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(result: dict[str, Any]) -> str:
    currency = result["costs"]["currency"]
    lines = [
        f"{'queue':<22}{'round':>6}{'labels':>8}{'alone':>8}{'test acc':>10}{'cov@.99':>9}"
        f"{'cost/1k':>10}  gate",
    ]
    for rows in [*result["arms"].values(), result["noisy_round"]]:
        for r in rows:
            gate = r.get("gate")
            verdict = (
                "-"
                if gate is None
                else (
                    ("PASS" if gate["passed"] else f"REFUSED ({', '.join(gate['failed_checks'])})")
                    + f" d_acc {gate['golden_accuracy_delta_points']:+.2f} p_mid {gate['p_mid']:.3g}"
                )
            )
            noise = r.get("noise", 0.0)
            queue = r["queue"] + (f"+{noise:.0%} noise" if noise else "")
            alone = f"{100 * r['answered_alone']:.1f}%" if "answered_alone" in r else "-"
            cost = f"{r[f'cost_per_1000_{currency}']:.4f}" if f"cost_per_1000_{currency}" in r else "-"
            lines.append(
                f"{queue:<22}{r['round']:>6}{r['labels_spent']:>8}{alone:>8}{100 * r['test_accuracy']:>9.2f}%"
                f"{100 * r['test_coverage_at_0.99']:>8.1f}%{cost:>10}  {verdict}"
            )
    c = result["ceiling"]
    lines.append(
        f"ceiling: {c['trained_on']} true labels, test accuracy {100 * c['test_accuracy']:.2f}%, coverage at "
        f"0.99 {100 * c['test_coverage_at_0.99']:.1f}%"
    )
    lines.append(f"total {result['seconds']['total']:.0f} s")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--review", type=int, default=200, help="decisions a reviewer corrects per round")
    parser.add_argument("--seed-per-label", type=int, default=10)
    parser.add_argument("--noise", type=float, default=0.3, help="share of wrong labels in the noisy round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke: --quick-labels intents, --review 20")
    parser.add_argument("--quick-labels", type=int, default=8)
    parser.add_argument(
        "--home", type=Path, help="APPLIANCE_HOME for the exported encoder (default: temporary)"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=Path.home() / ".cache" / "appliance" / "bench-retrain",
        help="where the embeddings are cached",
    )  # fmt: skip
    parser.add_argument("--assumed-accelerator-tflops", type=float, default=DEFAULT_ACCELERATOR_TFLOPS)
    parser.add_argument(
        "--accelerator-price-per-hour", type=float, default=DEFAULT_ACCELERATOR_PRICE_PER_HOUR
    )
    parser.add_argument("--out-dir", type=Path, default=Path("bench/retrain_out"))
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line, last")
    args = parser.parse_args(argv)
    if args.quick and args.review == 200:
        args.review = 20
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from appliance.config import apply_offline_env

    apply_offline_env()
    args = parse_args(argv)
    result = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "retrain.json").write_text(json.dumps(result, indent=2, default=float))
    plot(result, args.out_dir / "retrain.png")
    print(render(result))
    print(f"wrote {args.out_dir / 'retrain.json'} and {args.out_dir / 'retrain.png'}")
    if args.json:
        print(json.dumps(result, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
