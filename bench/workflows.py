"""Workflow benchmark: a support-ticket workflow, the tuned mix, retrieval-augmented escalation,
and the runner's own overhead, on Banking77 (official test set), in one run on one box.

1. Every test text goes once through each model and the answers are cached (as
   ``appliance workflows tune`` caches them): the specialist (ONNX, head mode, trained here with
   its demonstration index), and two tiny random Llamas on vLLM of two sizes, "small" and "large",
   label-constrained zero-shot. A generalist's price per text is measured: the engine's wall time
   over the batch, times the cores it holds, over the texts, plus the specialist's pass.
2. The support-ticket workflow: classify the intent (cascade at the model's calibrated threshold
   to "small"), then generate a reply only for the escalated intents (``URGENT``: card lost,
   stolen, compromised or swallowed). Per step and in total, price per 1,000 runs and accuracy
   (the reply step's: it fired exactly when the true intent is urgent), against the generalist
   alone on every step and the specialist alone (the reply, a generation, is the generalist's in
   every mode). The reply's price is the mean of replies measured here.
3. Tuning: every specialist/cascade/generalist mix (``appliance.workflows.tune``) over the cache,
   with a third, *computed* generalist: Llama-3-8B priced from its FLOPs at this box's measured
   fp32 matrix-product rate (bench/cascade.py), answering right with an assumed accuracy
   (``--assumed-8b-accuracy``, seeded). Frontier table and PNG, and the chosen mix for each target.
4. Retrieval-augmented escalation: "small" on the escalated texts with k = 0, 4, 8 demonstrations
   (the nearest training examples by the specialist's encoder): accuracy and prompt tokens.
5. Overhead: a one-step workflow (the runner over the in-process serving runtime) against a
   direct Classify on the same texts, one text per call: this process's CPU time per call.

The tiny generalists' weights are random: their accuracy is chance, so the tuned mixes that use
them say what the machinery does, not what a real generalist would do; the computed 8B rows are
labelled so.

    python -m bench.workflows --json-out bench/workflows_results.json       # the full run
    python -m bench.workflows --quick --json                                 # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.engines.generalist import GeneralistEngine
from appliance.engines.generalist_api import Demonstration
from appliance.engines.generalist_args import GeneralistArgs
from appliance.router.cost import CostModel
from appliance.workflows.spec import StepPolicy
from appliance.workflows.tune import Answers, StepOutputs, choose, configurations, frontier, plot, table
from bench.cascade import DATA, LLAMA3_8B, DecoderShape, load_test, measure_fp32_gflops, run_specialist

MODEL_NAME = "banking77-workflow"
URGENT = frozenset({"lost_or_stolen_card", "compromised_card", "card_swallowed", "lost_or_stolen_phone"})
TARGETS = (0.90, 0.93, 0.95)
REPLY_PROMPT = "A bank customer wrote: {text}\nTheir issue: {intent}.\nWrite a one-sentence reply:"
STEP = "intent"


@dataclass
class EngineRun:
    labels: list[str]
    prices: np.ndarray  # per text: the specialist's pass plus the engine's share
    prompt_tokens: list[int]
    wall_s: float


async def ask_all(
    engine: GeneralistEngine,
    texts: Sequence[str],
    labels: Sequence[str],
    cost: CostModel,
    specialist_core: np.ndarray,
    concurrency: int,
    demos: Sequence[Sequence[Demonstration]] | None = None,
) -> EngineRun:
    """Every text through the engine, ``concurrency`` at a time, priced by its share of the wall."""
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> tuple[str, int]:
        async with slots:
            shown = demos[i] if demos is not None else ()
            r = await engine.classify(texts[i], labels, demonstrations=shown)
            return r.label, r.prompt_tokens

    began = time.perf_counter()
    got = await asyncio.gather(*(one(i) for i in range(len(texts))))
    wall = time.perf_counter() - began
    engine_core = wall * cost.cores / max(1, len(texts))  # the engine held every core for the wall
    prices = np.array([cost.price(engine_core + float(c)).price for c in specialist_core])
    return EngineRun([g[0] for g in got], prices, [g[1] for g in got], wall)


async def reply_price(
    engine: GeneralistEngine, texts: Sequence[str], intents: Sequence[str], cost: CostModel
) -> dict[str, float]:
    """Mean measured price and tokens of a reply, over the given texts, 8 at a time."""
    slots = asyncio.Semaphore(8)

    async def one(text: str, intent: str) -> int:
        async with slots:
            last = None
            async for chunk in engine.generate(
                prompt=REPLY_PROMPT.format(text=text, intent=intent), max_tokens=40
            ):
                last = chunk
            assert last is not None
            return last.completion_tokens

    began = time.perf_counter()
    tokens = await asyncio.gather(*(one(t, i) for t, i in zip(texts, intents, strict=True)))
    wall = time.perf_counter() - began
    n = max(1, len(texts))
    return {
        "replies": len(texts),
        "price": cost.price(wall * cost.cores / n).price,
        "completion_tokens": float(np.mean(tokens)) if tokens else 0.0,
        "wall_s": wall,
    }


def computed_8b(
    truth: Sequence[str],
    labels: Sequence[str],
    accuracy: float,
    prompt: float,
    gflops: float,
    cost: CostModel,
    seed: int,
) -> tuple[Answers, dict[str, Any]]:
    """Llama-3-8B's answers and price, computed: right with probability ``accuracy`` (else another
    label), priced at the compute-bound time of its FLOPs on this box's measured fp32 rate."""
    rng = np.random.default_rng(seed)
    out = []
    for t in truth:
        if rng.random() < accuracy:
            out.append(t)
        else:
            out.append(str(rng.choice([label for label in labels if label != t])))
    flops = LLAMA3_8B.flops(prompt, 1.0 + 4.0)
    core_seconds = flops / (gflops * 1e9) * cost.cores  # all cores busy for the compute-bound time
    price = cost.price(core_seconds).price
    return Answers(out, np.full(len(truth), price)), {
        "computed": True,
        "model": LLAMA3_8B.name,
        "assumed_accuracy": accuracy,
        "flops": flops,
        "core_seconds": core_seconds,
        "price": price,
    }


def workflow_modes(
    outputs: StepOutputs, small: str, reply: dict[str, float], specialist_threshold: float
) -> dict[str, Any]:
    """The support-ticket workflow's per-step and total figures in each mode, from the cache."""
    truth = np.array(outputs.truth, dtype=object)
    spec = np.array(outputs.specialist.labels, dtype=object)
    gen = np.array(outputs.generalists[small].labels, dtype=object)
    cascade = outputs.confidence >= specialist_threshold
    modes = {
        "workflow (cascade + reply)": (
            np.where(cascade, spec, gen),
            np.where(cascade, outputs.specialist.prices, outputs.generalists[small].prices),
        ),
        "generalist alone": (gen, outputs.generalists[small].prices),
        "specialist alone": (spec, outputs.specialist.prices),
    }
    urgent_truth = np.array([t in URGENT for t in truth])
    out: dict[str, Any] = {}
    for mode, (labels, prices) in modes.items():
        replied = np.array([label in URGENT for label in labels])
        classify_per_1000 = 1000.0 * float(np.mean(prices))
        reply_per_1000 = 1000.0 * float(np.mean(replied)) * reply["price"]
        out[mode] = {
            "classify": {"price_per_1000": classify_per_1000, "accuracy": float(np.mean(labels == truth))},
            "reply": {
                "price_per_1000": reply_per_1000,
                "accuracy": float(np.mean(replied == urgent_truth)),
                "share_replied": float(np.mean(replied)),
            },
            "total_price_per_1000": classify_per_1000 + reply_per_1000,
            "escalated": float(np.mean(~cascade)) if mode.startswith("workflow") else None,
        }
    mix = out["workflow (cascade + reply)"]["total_price_per_1000"]
    out["ratios"] = {
        "generalist_alone_over_workflow": out["generalist alone"]["total_price_per_1000"] / mix,
        "workflow_over_specialist_alone": mix / out["specialist alone"]["total_price_per_1000"],
    }
    return out


async def overhead(home: Path, ref: str, texts: Sequence[str], calls: int) -> dict[str, Any]:
    """CPU per call: a one-step workflow through the runner against a direct Classify, in process."""
    from appliance.serve.runtime import RuntimeSettings, ServingRuntime
    from appliance.store import ModelStore
    from appliance.types import Policy

    try:
        from appliance.workflows.runner import WorkflowRunner
        from appliance.workflows.store import WorkflowStore, publish_text
    except ImportError as exc:
        return {"skipped": f"the workflow runner is not available here: {exc}"}
    spec = f"name: one-step\nsteps:\n  - id: intent\n    kind: classify\n    model: {ref}\n"
    store = ModelStore(home)
    workflow = publish_text(spec, "one-step.yaml", store=WorkflowStore(home), models=store)
    runtime = ServingRuntime(RuntimeSettings(models=(ref,), follow_interval_s=0), store=store)
    await runtime.start()
    runner = WorkflowRunner(runtime)
    try:
        picks = [texts[i % len(texts)] for i in range(calls)]
        for text in picks[:20]:  # warm both paths
            await runtime.classify(ref, [text], policy=Policy.SPECIALIST_ONLY)
            await runner.run(workflow, [text])

        async def timed(call: Any) -> float:
            began = time.process_time()
            for text in picks:
                await call(text)
            return (time.process_time() - began) / len(picks)

        direct = await timed(lambda t: runtime.classify(ref, [t], policy=Policy.SPECIALIST_ONLY))
        flow = await timed(lambda t: runner.run(workflow, [t]))
    finally:
        await runtime.close()
    return {
        "calls": calls,
        "direct_cpu_ms_per_call": 1000.0 * direct,
        "workflow_cpu_ms_per_call": 1000.0 * flow,
        "overhead": flow / direct - 1.0,
        "within_10_percent": flow <= 1.10 * direct,
    }


def train_specialist(home: Path, few_shot: int | None, seed: int) -> str:
    from appliance.factory.pipeline import TrainSpec, train
    from appliance.store import ModelStore

    spec = TrainSpec(
        data=DATA / "train.csv",
        text_column="text",
        label_column="category",
        name=MODEL_NAME,
        few_shot=few_shot,
        seed=seed,
        demonstrations=True,
    )
    result = train(spec, ModelStore(home), lambda m: print(f"[train] {m}", file=sys.stderr, flush=True))
    return f"{result.manifest.name}:{result.manifest.version}"


async def benchmark(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    from appliance.engines.specialist import load_specialist
    from appliance.engines.tiny_llm import LARGER_SHAPE, MODEL_SHAPE, build_tiny_llm
    from appliance.router.retrieval import SpecialistRetriever
    from appliance.store import ModelStore

    ref = train_specialist(home, args.few_shot, args.seed)
    specialist = load_specialist(ref, ModelStore(home))
    labels = list(specialist.labels)
    test = load_test(args.test_per_label, args.seed)
    texts, truth = test.texts, test.labels
    cost = CostModel(**({"price_per_hour": args.price_per_hour} if args.price_per_hour else {}))
    run = run_specialist(specialist, texts)
    top = run.probs.argmax(axis=1)
    spec_labels = [labels[i] for i in top]
    confidence = run.probs.max(axis=1)
    spec_prices = np.array([cost.price(float(c)).price for c in run.core_seconds])

    shapes = {"small": MODEL_SHAPE, "large": LARGER_SHAPE}
    engines: dict[str, GeneralistEngine] = {}
    runs: dict[str, EngineRun] = {}
    info: dict[str, Any] = {}
    for name, shape in shapes.items():
        folder = build_tiny_llm(home / f"llm-{name}", seed=args.seed, shape=shape)
        engine = GeneralistEngine(
            GeneralistArgs(
                path=str(folder), name=name, enforce_eager=not args.compile, max_concurrency=args.concurrency
            )
        )
        await engine.start()
        engines[name] = engine
        print(
            f"[{name}] started in {engine.start_seconds:.1f} s; answering {len(texts)} texts", file=sys.stderr
        )
        runs[name] = await ask_all(engine, texts, labels, cost, run.core_seconds, args.concurrency)
        info[name] = {
            "params": DecoderShape.from_config(name, folder).params,
            "wall_s": runs[name].wall_s,
            "prompt_tokens": float(np.mean(runs[name].prompt_tokens)),
            "accuracy": float(np.mean(np.array(runs[name].labels) == np.array(truth))),
            "price_per_1000": 1000.0 * float(np.mean(runs[name].prices)),
        }
    try:
        gflops = measure_fp32_gflops()
        big, info["8b (computed)"] = computed_8b(
            truth, labels, args.assumed_8b_accuracy, info["small"]["prompt_tokens"], gflops, cost, args.seed
        )
        outputs = StepOutputs(
            step=STEP,
            truth=list(truth),
            specialist=Answers(spec_labels, spec_prices),
            confidence=confidence,
            keep=np.zeros(len(texts), dtype=bool),
            generalists={**{n: Answers(r.labels, r.prices) for n, r in runs.items()}, "8b-computed": big},
            threshold=specialist.threshold,
        )
        configs = configurations([outputs], [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99])
        points = frontier(configs)
        chosen = {f"{t:.2f}": (c.to_dict() if (c := choose(configs, t, None)) else None) for t in TARGETS}
        plot_path = args.plot or Path(tempfile.gettempdir()) / "workflows_frontier.png"
        plot(
            configs,
            points,
            None,
            None,
            plot_path,
            f"Banking77: {len(texts)} test texts, {len(configs)} mixes",
        )
        print(table(points, None, cost.currency), file=sys.stderr)

        urgent_pred = [i for i, label in enumerate(spec_labels) if label in URGENT][: args.replies] or [0]
        reply = await reply_price(
            engines["small"], [texts[i] for i in urgent_pred], [spec_labels[i] for i in urgent_pred], cost
        )
        ticket = workflow_modes(outputs, "small", reply, specialist.threshold)

        escalated = [i for i, c in enumerate(confidence) if c < specialist.threshold][: args.rag_sample]
        rag: dict[str, Any] = {"texts": len(escalated)}
        retriever = SpecialistRetriever()
        esc_texts = [texts[i] for i in escalated]
        for k in (0, 4, 8):
            demos = retriever.nearest(specialist, esc_texts, k) if k else [[] for _ in esc_texts]
            got = await ask_all(
                engines["small"],
                esc_texts,
                labels,
                cost,
                run.core_seconds[escalated],
                args.concurrency,
                demos,
            )
            rag[f"k={k}"] = {
                "accuracy": float(np.mean(np.array(got.labels) == np.array([truth[i] for i in escalated]))),
                "prompt_tokens": float(np.mean(got.prompt_tokens)) if got.prompt_tokens else 0.0,
                "price_per_1000": 1000.0 * float(np.mean(got.prices)) if len(got.prices) else 0.0,
                "demonstration_label_is_true": float(
                    np.mean(
                        [bool(d) and d[0].label == truth[i] for d, i in zip(demos, escalated, strict=True)]
                    )
                )
                if k
                else None,
            }
    finally:
        for engine in engines.values():
            await engine.stop()
    return {
        "model": ref,
        "texts": len(texts),
        "specialist": {
            "accuracy": float(np.mean(np.array(spec_labels) == np.array(truth))),
            "threshold": specialist.threshold,
            "price_per_1000": 1000.0 * float(np.mean(spec_prices)),
        },
        "generalists": info,
        "support_ticket": {"reply": reply, "modes": ticket},
        "tune": {
            "configurations": len(configs),
            "frontier": [{"describe": c.describe(), **c.to_dict()} for c in points],
            "chosen": chosen,
            "plot": str(plot_path),
        },
        "rag": rag,
        "overhead": await overhead(home, ref, texts, args.overhead_calls),
        "currency": cost.currency,
        "price_per_hour": cost.price_per_hour,
        "cores": cost.cores,
        "fp32_matmul_gflops_measured": gflops,
        "policies": [p.value for p in StepPolicy],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke: 8 train and 2 test texts per label, few calls"
    )
    parser.add_argument("--home", type=Path, help="APPLIANCE_HOME (default: a temporary folder)")
    parser.add_argument("--few-shot", type=int, metavar="K", help="train on K texts per label")
    parser.add_argument("--test-per-label", type=int, metavar="K", help="K test texts per label")
    parser.add_argument("--concurrency", type=int, default=8, help="generalist requests in flight")
    parser.add_argument("--replies", type=int, default=64, help="replies generated to price the reply step")
    parser.add_argument("--rag-sample", type=int, default=300, help="escalated texts for the k comparison")
    parser.add_argument("--overhead-calls", type=int, default=500)
    parser.add_argument(
        "--assumed-8b-accuracy", type=float, default=0.65, help="ASSUMPTION for computed rows"
    )
    parser.add_argument("--price-per-hour", type=float)
    parser.add_argument("--compile", action="store_true", help="let vLLM compile (slower start)")
    parser.add_argument("--plot", type=Path, help="the frontier PNG (default: in the temp folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.few_shot = args.few_shot or 8
        args.test_per_label = args.test_per_label or 1
        args.replies, args.rag_sample, args.overhead_calls = 4, 8, 30
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-workflows-") as tmp:
        home = args.home or Path(tmp)
        os.environ["APPLIANCE_HOME"] = str(home)
        result = asyncio.run(benchmark(args, home))
    text = json.dumps(result, indent=2, default=float)
    if args.json_out:
        args.json_out.write_text(text + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(result, default=float))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
