"""``appliance workflows tune NAME --data LABELLED --target ACCURACY [--budget PRICE]``: the mix, tuned.

Every classify step of a published workflow can be served several ways: the specialist only, a
cascade at a confidence threshold to one of the generalists, or one generalist alone. Tuning runs
each model over the labelled sample once, on the real server, and caches what came back:

- ``specialist_only`` Classify: per text the specialist's label, its confidence and measured price;
- ``generalist_only`` Classify, once per generalist: per text its label and measured price (the
  specialist's pass included: the cascade spends both on an escalated text).

Every candidate is then scored from the cache, with no further calls: a cascade at threshold t
answers a text with the specialist when its confidence is at least t (or it rejected the text as
out of scope), else with the generalist's cached answer and price. A workflow's configuration is
one candidate per classify step; its end-to-end accuracy is the share of texts whose every
labelled step is right, its price the sum of the steps' prices, per 1,000 runs. The other steps
(extract, generate, ...) are the same in every configuration and are not priced here.

The Pareto frontier is the configurations no other one beats on both price and accuracy. The
chosen one is the cheapest that meets ``--target`` (within ``--budget`` when given), or, when
none does, with ``--budget`` alone, the most accurate within it. It is printed with the frontier,
plotted (PNG), and written as the workflow's next version: to a YAML file, and to the store only
with ``--publish``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from appliance.errors import ApplianceError, InvalidArgument
from appliance.workflows.spec import ClassifyStep, StepPolicy, WorkflowSpec

if TYPE_CHECKING:
    from appliance.client import Client

DEFAULT_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)
MAX_CONFIGURATIONS = 200_000
CALL_TEXTS = 64  # texts per Classify call while collecting


# ----------------------------------------------------------------------------- cached outputs


@dataclass(frozen=True)
class Answers:
    """One route's answers to the sample: a label and a measured price per text."""

    labels: list[str]
    prices: np.ndarray  # per text, in the server's currency

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.prices):
            raise InvalidArgument(f"{len(self.labels)} labels but {len(self.prices)} prices")


@dataclass(frozen=True)
class StepOutputs:
    """What the server said for one classify step, for every text of the sample."""

    step: str
    truth: list[str]
    specialist: Answers
    confidence: np.ndarray  # the specialist's top-1 probability per text
    keep: np.ndarray  # texts the specialist answers under any cascade (rejected as out of scope)
    generalists: dict[str, Answers]
    threshold: float | None = None  # the model's calibrated threshold, tried beside the grid

    def __post_init__(self) -> None:
        n = len(self.truth)
        sizes = [len(self.specialist.labels), len(self.confidence), len(self.keep)]
        sizes += [len(a.labels) for a in self.generalists.values()]
        if any(size != n for size in sizes):
            raise InvalidArgument(f"step {self.step}: every route must answer all {n} texts")


@dataclass(frozen=True)
class StepChoice:
    """How one classify step is served."""

    policy: StepPolicy
    threshold: float | None = None
    generalist: str | None = None

    def describe(self) -> str:
        if self.policy is StepPolicy.SPECIALIST:
            return "specialist"
        if self.policy is StepPolicy.GENERALIST:
            return f"generalist {self.generalist}"
        return f"cascade@{self.threshold:g}->{self.generalist}"


@dataclass(frozen=True)
class Scored:
    choice: StepChoice
    correct: np.ndarray  # bool per text
    prices: np.ndarray


def step_candidates(outputs: StepOutputs, thresholds: Sequence[float]) -> list[Scored]:
    """Every way to serve one step, scored per text from the cached outputs."""
    truth = np.array(outputs.truth, dtype=object)
    spec_labels = np.array(outputs.specialist.labels, dtype=object)
    out = [Scored(StepChoice(StepPolicy.SPECIALIST), spec_labels == truth, outputs.specialist.prices)]
    grid = sorted({*thresholds, *([outputs.threshold] if outputs.threshold is not None else [])})
    for name, answers in outputs.generalists.items():
        gen_labels = np.array(answers.labels, dtype=object)
        for t in grid:
            specialist = outputs.keep | (outputs.confidence >= t)
            labels = np.where(specialist, spec_labels, gen_labels)
            prices = np.where(specialist, outputs.specialist.prices, answers.prices)
            out.append(Scored(StepChoice(StepPolicy.CASCADE, float(t), name), labels == truth, prices))
        out.append(Scored(StepChoice(StepPolicy.GENERALIST, None, name), gen_labels == truth, answers.prices))
    return out


@dataclass(frozen=True)
class Configuration:
    choices: dict[str, StepChoice]  # by step id
    accuracy: float  # end to end: every labelled step right
    price_per_1000: float
    step_accuracy: dict[str, float] = field(default_factory=dict)
    step_price_per_1000: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        return ", ".join(f"{step}: {c.describe()}" for step, c in self.choices.items())

    def to_dict(self) -> dict[str, object]:
        return {
            "accuracy": self.accuracy,
            "price_per_1000": self.price_per_1000,
            "steps": {
                step: {
                    "policy": c.policy.value,
                    "threshold": c.threshold,
                    "generalist": c.generalist,
                    "accuracy": self.step_accuracy.get(step),
                    "price_per_1000": self.step_price_per_1000.get(step),
                }
                for step, c in self.choices.items()
            },
        }


def configurations(steps: Sequence[StepOutputs], thresholds: Sequence[float]) -> list[Configuration]:
    """Every combination of the steps' candidates, with end-to-end accuracy and price."""
    if not steps:
        raise InvalidArgument("the workflow has no labelled classify step to tune")
    per_step = [step_candidates(s, thresholds) for s in steps]
    count = int(np.prod([len(c) for c in per_step]))
    if count > MAX_CONFIGURATIONS:
        raise InvalidArgument(
            f"{count} configurations to score (more than {MAX_CONFIGURATIONS}); pass fewer --thresholds "
            "or --generalist names"
        )
    out: list[Configuration] = []
    for combo in itertools.product(*per_step):
        correct = np.logical_and.reduce([c.correct for c in combo])
        prices = np.sum([c.prices for c in combo], axis=0)
        out.append(
            Configuration(
                choices={s.step: c.choice for s, c in zip(steps, combo, strict=True)},
                accuracy=float(np.mean(correct)),
                price_per_1000=1000.0 * float(np.mean(prices)),
                step_accuracy={s.step: float(np.mean(c.correct)) for s, c in zip(steps, combo, strict=True)},
                step_price_per_1000={
                    s.step: 1000.0 * float(np.mean(c.prices)) for s, c in zip(steps, combo, strict=True)
                },
            )
        )
    return out


def frontier(configs: Sequence[Configuration]) -> list[Configuration]:
    """The Pareto frontier, cheapest first: each point is more accurate than every cheaper one.

    Of configurations with equal price and accuracy the first listed is kept."""
    ordered = sorted(configs, key=lambda c: (c.price_per_1000, -c.accuracy))
    out: list[Configuration] = []
    for c in ordered:
        if not out or c.accuracy > out[-1].accuracy:
            out.append(c)
    return out


def choose(
    configs: Sequence[Configuration], target: float | None, budget: float | None
) -> Configuration | None:
    """The cheapest meeting ``target`` (and within ``budget``), else the most accurate within
    ``budget`` when only a budget is given; None when nothing qualifies."""
    if target is None and budget is None:
        raise InvalidArgument("give a target accuracy, a budget, or both")
    points = frontier(configs)
    affordable = [c for c in points if budget is None or c.price_per_1000 <= budget]
    if target is not None:
        meeting = [c for c in affordable if c.accuracy >= target]
        return meeting[0] if meeting else None
    return affordable[-1] if affordable else None


# ----------------------------------------------------------------------------- the server


def collect(
    client: Client,
    spec: WorkflowSpec,
    texts: Sequence[str],
    truth: Mapping[str, Sequence[str]],
    generalists: Sequence[str],
    timeout: float = 600.0,
) -> list[StepOutputs]:
    """Each labelled classify step's model once over the texts per route (see the module docstring)."""
    out: list[StepOutputs] = []
    for step in spec.steps:
        if not isinstance(step, ClassifyStep) or step.id not in truth:
            continue
        threshold = client.get_model(step.model).threshold
        labels: list[str] = []
        confidence: list[float] = []
        prices: list[float] = []
        keep: list[bool] = []
        for part in _chunks(texts):
            for r in client.classify(step.model, part, policy="specialist_only", timeout=timeout).results:
                labels.append(r.label)
                confidence.append(r.top[0][1])
                prices.append(r.price)
                keep.append(r.label != r.top[0][0])  # rejected as out of scope: never escalated
        answers: dict[str, Answers] = {}
        for name in generalists:
            g_labels: list[str] = []
            g_prices: list[float] = []
            for part in _chunks(texts):
                got = client.classify(
                    step.model, part, policy="generalist_only", generalist=name, timeout=timeout
                )
                g_labels += [r.label for r in got.results]
                g_prices += [r.price for r in got.results]
            answers[name] = Answers(g_labels, np.array(g_prices))
        out.append(
            StepOutputs(
                step=step.id,
                truth=list(truth[step.id]),
                specialist=Answers(labels, np.array(prices)),
                confidence=np.array(confidence),
                keep=np.array(keep, dtype=bool),
                generalists=answers,
                threshold=threshold,
            )
        )
    return out


def _chunks(texts: Sequence[str]) -> list[list[str]]:
    return [list(texts[i : i + CALL_TEXTS]) for i in range(0, len(texts), CALL_TEXTS)]


def tuned_spec(spec: WorkflowSpec, chosen: Configuration) -> WorkflowSpec:
    """The workflow with each tuned step's policy, threshold and generalist set as chosen."""
    steps = []
    for step in spec.steps:
        choice = chosen.choices.get(step.id)
        if choice is not None and isinstance(step, ClassifyStep):
            step = step.model_copy(
                update={
                    "policy": choice.policy,
                    "threshold": choice.threshold,
                    "generalist": choice.generalist,
                }
            )
        steps.append(step)
    return spec.model_copy(update={"steps": tuple(steps)})


# ----------------------------------------------------------------------------- output


def table(points: Sequence[Configuration], chosen: Configuration | None, currency: str = "") -> str:
    unit = f" {currency}" if currency else ""
    lines = [f"{'price/1000' + unit:>16}  {'accuracy':>8}  configuration"]
    for c in points:
        mark = "  <- chosen" if c is chosen else ""
        lines.append(f"{c.price_per_1000:>16.6f}  {c.accuracy:>8.4f}  {c.describe()}{mark}")
    return "\n".join(lines)


def plot(
    configs: Sequence[Configuration],
    points: Sequence[Configuration],
    chosen: Configuration | None,
    target: float | None,
    path: Path,
    title: str,
) -> Path:
    """All configurations, the frontier and the chosen point, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # matplotlib comes with the dev extra
        raise InvalidArgument(f"plotting needs matplotlib ({exc}); pass --no-plot, or install it") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(
        [c.price_per_1000 for c in configs],
        [c.accuracy for c in configs],
        s=8,
        c="#bbbbbb",
        label="configurations",
    )
    ax.plot(
        [c.price_per_1000 for c in points],
        [c.accuracy for c in points],
        "o-",
        c="#1f77b4",
        ms=4,
        label="frontier",
    )
    if chosen is not None:
        ax.scatter([chosen.price_per_1000], [chosen.accuracy], marker="*", s=220, c="#d62728", label="chosen")
    if target is not None:
        ax.axhline(target, ls="--", c="#2ca02c", lw=1, label=f"target {target:g}")
    if all(c.price_per_1000 > 0 for c in configs):
        ax.set_xscale("log")  # the generalist costs orders of magnitude more than the specialist
    ax.set_xlabel("price per 1,000 runs (measured)")
    ax.set_ylabel("end-to-end accuracy")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the command


def register(wsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tune = wsub.add_parser(
        "tune", help="score every specialist/cascade/generalist mix on labelled data; pick the cheapest"
    )
    tune.add_argument("workflow", help="NAME or NAME:VERSION of a published workflow")
    tune.add_argument("--data", type=Path, required=True, help="labelled texts (CSV, TSV, JSONL, Parquet)")
    tune.add_argument("--text-column", default="text")
    tune.add_argument(
        "--label-column",
        action="append",
        metavar="[STEP=]COLUMN",
        help="the true labels of a classify step (repeatable); a bare COLUMN is the only classify "
        "step's (default: category)",
    )
    tune.add_argument("--target", type=float, help="end-to-end accuracy to reach, in (0, 1]")
    tune.add_argument("--budget", type=float, help="price per 1,000 runs not to exceed")
    tune.add_argument(
        "--generalist",
        action="append",
        dest="generalists",
        metavar="NAME",
        help="a generalist to try (repeatable; default: default)",
    )
    tune.add_argument(
        "--thresholds",
        help=f"comma-separated cascade thresholds (default {','.join(map(str, DEFAULT_THRESHOLDS))})",
    )
    tune.add_argument("--limit", type=int, help="tune on the first N rows only")
    tune.add_argument("--out", type=Path, help="the tuned workflow's YAML (default NAME.tuned.yaml)")
    tune.add_argument("--plot", type=Path, help="the frontier's PNG (default NAME.frontier.png)")
    tune.add_argument("--no-plot", action="store_true")
    tune.add_argument("--publish", action="store_true", help="publish the tuned workflow as its next version")
    tune.add_argument("--json", action="store_true", help="one JSON summary line on stdout")
    tune.add_argument("--address", help="host:port (default: the local appliance)")
    tune.add_argument("--server-name", help="the name the server's certificate carries")
    tune.add_argument("--timeout", type=float, default=600.0, help="seconds per Classify call")
    tune.set_defaults(func=run_tune)


def _label_columns(spec: WorkflowSpec, flags: Sequence[str] | None) -> dict[str, str]:
    classify = [s.id for s in spec.steps if isinstance(s, ClassifyStep)]
    if not classify:
        raise InvalidArgument(f"workflow {spec.name} has no classify step to tune")
    columns: dict[str, str] = {}
    for flag in flags or ["category"]:
        step, sep, column = flag.partition("=")
        if not sep:
            if len(classify) != 1:
                raise InvalidArgument(
                    f"workflow {spec.name} has {len(classify)} classify steps ({', '.join(classify)}): "
                    "name each as --label-column STEP=COLUMN"
                )
            step, column = classify[0], flag
        if step not in classify:
            raise InvalidArgument(f"--label-column {flag}: {step!r} is not a classify step of {spec.name}")
        columns[step] = column
    return columns


def _thresholds(text: str | None) -> list[float]:
    if not text:
        return list(DEFAULT_THRESHOLDS)
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidArgument(f"--thresholds {text!r}: comma-separated numbers, e.g. 0.5,0.8,0.9") from None
    if not values or not all(0.0 < v <= 1.0 for v in values):
        raise InvalidArgument(f"--thresholds {text!r}: each must lie in (0, 1]")
    return values


def _load_sample(
    path: Path, text_column: str, columns: Mapping[str, str], limit: int | None
) -> tuple[list[str], dict[str, list[str]]]:
    from appliance.dataset.reading import load_labelled

    texts: list[str] | None = None
    truth: dict[str, list[str]] = {}
    for step, column in columns.items():
        data = load_labelled(path, text_column, column)
        if texts is not None and data.texts != texts:
            raise InvalidArgument(f"{path}: the rows kept for column {column!r} differ from the others'")
        texts = data.texts
        truth[step] = data.labels
    assert texts is not None
    if limit is not None:
        texts = texts[:limit]
        truth = {step: labels[:limit] for step, labels in truth.items()}
    return texts, truth


def run_tune(args: argparse.Namespace) -> int:
    import grpc

    from appliance.client import Client, Connection
    from appliance.dataset import DataError
    from appliance.workflows.store import load, publish_text

    try:
        if args.target is not None and not 0.0 < args.target <= 1.0:
            raise InvalidArgument(f"--target {args.target}: an accuracy in (0, 1]")
        if args.target is None and args.budget is None:
            raise InvalidArgument("give --target, --budget, or both")
        stored = load(args.workflow)
        spec = stored.spec
        columns = _label_columns(spec, args.label_column)
        thresholds = _thresholds(args.thresholds)
        texts, truth = _load_sample(args.data, args.text_column, columns, args.limit)
        with Client(Connection.discover(address=args.address, server_name=args.server_name)) as client:
            outputs = collect(client, spec, texts, truth, args.generalists or ["default"], args.timeout)
        configs = configurations(outputs, thresholds)
        points = frontier(configs)
        chosen = choose(configs, args.target, args.budget)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ApplianceError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except OSError as exc:  # no running appliance, an unreadable file
        print(f"error: {exc}", file=sys.stderr)
        return 2

    report: dict[str, object] = {
        "workflow": stored.ref,
        "texts": len(texts),
        "configurations": len(configs),
        "frontier": [c.to_dict() for c in points],
        "chosen": chosen.to_dict() if chosen is not None else None,
        "target": args.target,
        "budget": args.budget,
    }
    out = None if chosen is None else args.out or Path(f"{spec.name}.tuned.yaml")
    if not args.json:
        print(table(points, chosen))
    if not args.no_plot:
        title = f"{spec.name}: {len(texts)} texts, {len(configs)} configurations"
        report["plot"] = str(
            plot(configs, points, chosen, args.target, args.plot or Path(f"{spec.name}.frontier.png"), title)
        )
    if chosen is None:
        report["error"] = "no configuration meets the target within the budget"
        print(
            json.dumps(report) if args.json else f"error: {report['error']}",
            file=sys.stdout if args.json else sys.stderr,
        )
        return 1
    assert out is not None
    text = tuned_spec(spec, chosen).to_yaml()
    out.write_text(text, encoding="utf-8")
    report["out"] = str(out)
    if args.publish:
        try:
            published = publish_text(text, str(out))
        except ApplianceError as exc:
            print(f"error: the tuned workflow was not published: {exc.message}", file=sys.stderr)
            return 1
        report["published"] = published.ref
    if args.json:
        print(json.dumps(report))
    else:
        summary = f"accuracy {chosen.accuracy:.4f}, {chosen.price_per_1000:.6f} per 1,000"
        print(f"chosen: {chosen.describe()} ({summary})")
        print(f"wrote {out}" + (f"; published {report['published']}" if "published" in report else ""))
    return 0
