"""Cascade benchmark: what a decision costs on each route, and what the cascade's accuracy is.

On the shipped Banking77 (official test set), in one run on one box:

1. The specialist (MiniLM-L6 on ONNX Runtime + linear head) classifies every test text, timed
   per batch; each text is charged its token share of ``wall × threads`` core-seconds, as the
   serving runtime charges it. Texts at or above the manifest's calibrated threshold are
   automated; the rest are escalated.
2. The generalist (the tiny random Llama on vLLM, label-constrained zero-shot) answers a seeded
   random sample of the escalated texts (``--generalist-sample``). Automated texts and the sample
   go through the real :class:`appliance.router.cascade.Cascade` into an escalation database, and
   ``appliance report --json`` prices the two routes from it with
   :class:`appliance.router.cost.CostModel`.
3. FLOPs per decision are counted from the model shapes: the specialist, the tiny generalist, and
   a 7–8B generalist (Llama-3-8B's published shape) with the same prompt and answer lengths. The
   8B figures are computed, not measured: a compute-bound lower bound at the fp32 matrix-product
   rate measured here, and on an accelerator at an assumed effective rate.

Accuracy: the specialist's on the automated share, the tiny generalist's on the escalated sample
(near chance: its weights are random), and the resulting end-to-end figure; then, computed, the
end-to-end figure if the generalist had an assumed accuracy (``--assumed-generalist-accuracy``).

By default the specialist is trained here (head mode, full train set) with its threshold
calibrated on a stratified 10% of the train set, so that the test set is unseen by both the head
and the threshold. ``--calibration test`` calibrates on the test file instead (as
``appliance train --eval-data test.csv`` does; the automation rate is then in-sample), and
``--model NAME[:VERSION]`` benchmarks a model already published in ``--home``.

    python -m bench.cascade --json-out cascade.json
    python -m bench.cascade --quick --json        # CI smoke: small specialist, 5 generalist texts
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from appliance.engines.generalist import GeneralistEngine
from appliance.engines.generalist_api import Demonstration, ZeroShotResult
from appliance.engines.generalist_args import GeneralistArgs

if TYPE_CHECKING:
    from appliance.engines.specialist import Specialist

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "appliance" / "data" / "banking77"
MODEL_NAME = "banking77-cascade"

# Zero-shot accuracies assumed for a real generalist, used only for computed end-to-end figures.
# 0.435 and 0.65: gpt-4.1-nano on Banking77 with a plain prompt and with the best of 12 generated
# prompts, 120 training queries (Synth's GEPA prompt-optimisation cookbook, a vendor write-up, not
# a peer-reviewed result). 1.0: a perfect generalist, the cascade's ceiling.
DEFAULT_ASSUMED_ACCURACY = (0.435, 0.65, 1.0)
# Assumed for the 8B-on-an-accelerator estimate: effective dense bf16 throughput of an H100-class
# GPU on prefill (about 40% of its 989 TFLOP/s peak), and that box's hourly price per GPU.
DEFAULT_ACCELERATOR_TFLOPS = 400.0
DEFAULT_ACCELERATOR_PRICE_PER_HOUR = 4.0


# --------------------------------------------------------------------------- FLOP counting


@dataclass(frozen=True)
class EncoderShape:
    """A BERT-style encoder (post-LN, learned positions), as its config.json describes it."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    positions: int
    token_types: int

    @classmethod
    def from_config(cls, folder: Path) -> EncoderShape:
        c = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return cls(
            c["num_hidden_layers"],
            c["hidden_size"],
            c["intermediate_size"],
            c["vocab_size"],
            c["max_position_embeddings"],
            c.get("type_vocab_size", 2),
        )

    @property
    def matmul_params_per_layer(self) -> int:
        return 4 * self.hidden * self.hidden + 2 * self.hidden * self.intermediate

    @property
    def params(self) -> int:
        h = self.hidden
        layer = self.matmul_params_per_layer + 4 * h + self.intermediate + h + 4 * h  # + biases, 2 LNs
        embeddings = (self.vocab + self.positions + self.token_types) * h + 2 * h
        pooler = h * h + h
        return self.layers * layer + embeddings + pooler

    def flops(self, tokens: int, labels: int) -> float:
        """One text of ``tokens`` word pieces, unpadded, plus the linear head over ``labels``.

        Embedding lookups are not multiply-adds, so only the layers' weights count (2 FLOPs per
        weight per token), plus attention: every token attends to every token, QKᵀ and AV.
        """
        n, h = tokens, self.hidden
        weights = 2 * self.layers * self.matmul_params_per_layer * n
        attention = self.layers * 4 * n * n * h
        return float(weights + attention + 2 * h * labels)


@dataclass(frozen=True)
class DecoderShape:
    """A Llama-style decoder (grouped-query attention, gated MLP, RMSNorm)."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False

    @classmethod
    def from_config(cls, name: str, folder: Path) -> DecoderShape:
        c = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        heads = c["num_attention_heads"]
        return cls(
            name,
            c["num_hidden_layers"],
            c["hidden_size"],
            c["intermediate_size"],
            heads,
            c.get("num_key_value_heads", heads),
            c.get("head_dim") or c["hidden_size"] // heads,
            c["vocab_size"],
            bool(c.get("tie_word_embeddings", False)),
        )

    @property
    def matmul_params_per_layer(self) -> int:
        q_and_o = 2 * self.hidden * self.heads * self.head_dim
        k_and_v = 2 * self.hidden * self.kv_heads * self.head_dim
        return q_and_o + k_and_v + 3 * self.hidden * self.intermediate

    @property
    def params(self) -> int:
        layer = self.matmul_params_per_layer + 2 * self.hidden  # + 2 RMSNorm weights
        output = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.layers * layer + self.vocab * self.hidden + output + self.hidden

    def flops(self, prompt_tokens: float, completion_tokens: float) -> float:
        """One zero-shot decision: prefill the prompt, then decode the answer.

        Every position but the last generated one goes through the layers (the last ends the
        answer; nothing runs after it). Position p attends causally to p positions (QKᵀ and AV,
        4 FLOPs per position and attention dimension). Logits are computed only where a token is
        sampled: once per generated token.
        """
        passes = prompt_tokens + completion_tokens - 1
        weights = 2 * self.layers * self.matmul_params_per_layer * passes
        attention = 4 * self.layers * self.heads * self.head_dim * passes * (passes + 1) / 2
        logits = 2 * self.vocab * self.hidden * completion_tokens
        return float(weights + attention + logits)

    def flops_rule_of_thumb(self, prompt_tokens: float, completion_tokens: float) -> float:
        """``2 × params × tokens``: the usual estimate, which counts embeddings and logits everywhere."""
        return 2.0 * self.params * (prompt_tokens + completion_tokens)


# Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json): 8.03B parameters.
LLAMA3_8B = DecoderShape(
    "Llama-3-8B",
    layers=32,
    hidden=4096,
    intermediate=14336,
    heads=32,
    kv_heads=8,
    head_dim=128,
    vocab=128256,
)


def measure_fp32_gflops(size: int = 2048, repeats: int = 3) -> float:
    """The best fp32 matrix-product rate of this process's threads: the box's compute ceiling."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best = math.inf
    for _ in range(repeats):
        began = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - began)
    return 2.0 * size**3 / best / 1e9


# --------------------------------------------------------------------------- data and specialist


@dataclass(frozen=True)
class TestSet:
    texts: list[str]
    labels: list[str]


def load_test(per_label: int | None, seed: int) -> TestSet:
    from appliance import dataset

    data = dataset.load_labelled(DATA / "test.csv", "text", "category")
    if per_label:
        data = dataset.few_shot(data, per_label, seed=seed)
    return TestSet(list(data.texts), list(data.labels))


def train_specialist(args: argparse.Namespace, home: Path) -> str:
    """Train and publish the specialist in ``home``; returns its reference."""
    from appliance.factory.pipeline import TrainSpec, train
    from appliance.store import ModelStore

    spec = TrainSpec(
        data=DATA / "train.csv",
        eval_data=DATA / "test.csv" if args.calibration == "test" else None,
        text_column="text",
        label_column="category",
        name=MODEL_NAME,
        few_shot=args.few_shot,
        seed=args.seed,
    )
    result = train(spec, ModelStore(home), lambda m: print(f"[train] {m}", file=sys.stderr, flush=True))
    return f"{result.manifest.name}:{result.manifest.version}"


@dataclass
class SpecialistRun:
    probs: np.ndarray  # [n, labels]
    truncated: list[bool]
    tokens: list[int]
    core_seconds: np.ndarray  # [n]: each text's share of its batch's wall × threads
    wall_seconds: float
    cpu_seconds: float  # this process's CPU time over the run
    threads: int


def run_specialist(specialist: Specialist, texts: Sequence[str]) -> SpecialistRun:
    """Classify ``texts`` in the encoder's own length-sorted, token-budgeted batches, timed."""
    from appliance.artifact.maths import l2_normalize
    from appliance.router.cost import share

    encoder = specialist.encoder
    threads = encoder.config.intra_op_threads or (os.cpu_count() or 1)
    tokenized = encoder.tokenize(texts)
    batches = encoder.plan_batches(tokenized.lengths)
    warm = batches[len(batches) // 2]  # one mid-length batch, outside the timing
    specialist.head.probs(l2_normalize(encoder.run_padded([tokenized.ids[i] for i in warm])))

    n = len(texts)
    probs = np.empty((n, len(specialist.labels)), dtype=np.float32)
    core = np.empty(n, dtype=np.float64)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for batch in batches:
        began = time.perf_counter()
        pooled = encoder.run_padded([tokenized.ids[i] for i in batch])
        probs[batch] = specialist.head.probs(l2_normalize(pooled))
        core[batch] = share(time.perf_counter() - began, threads, [tokenized.lengths[i] for i in batch])
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return SpecialistRun(probs, tokenized.truncated, tokenized.lengths, core, wall, cpu, threads)


# --------------------------------------------------------------------------- the cascade


class RecordingGeneralist(GeneralistEngine):
    """The engine, keeping every answer it gives the cascade (token counts, engine time)."""

    def __init__(self, args: GeneralistArgs) -> None:
        super().__init__(args)
        self.answers: dict[str, ZeroShotResult] = {}

    async def classify(
        self,
        text: str,
        labels: Sequence[str],
        descriptions: Mapping[str, str] | None = None,
        request_id: str | None = None,
        demonstrations: Sequence[Demonstration] = (),
    ) -> ZeroShotResult:
        result = await super().classify(text, labels, descriptions, request_id, demonstrations)
        self.answers[text] = result
        return result


@dataclass
class CascadeRun:
    automated: list[Any]  # Decisions, in the order of the automated indices
    escalated: list[Any]  # Decisions, in the order of the sampled indices
    answers: dict[str, Any]  # text -> ZeroShotResult
    engine_start_s: float
    generalist_wall_s: float


async def run_cascade(
    args: argparse.Namespace,
    tiny_llm: Path,
    specialist: Specialist,
    texts: Sequence[str],
    run: SpecialistRun,
    automated: Sequence[int],
    sampled: Sequence[int],
    warmup_text: str,
    db: Path,
    cost: Any,
) -> CascadeRun:
    from appliance.router.cascade import Cascade, ModelRef
    from appliance.router.escalations import EscalationStore
    from appliance.types import SpecialistAnswer

    ref = ModelRef.of(specialist)
    labels = np.asarray(ref.labels)

    def answer(i: int) -> SpecialistAnswer:
        order = np.argsort(-run.probs[i])[: args.top_k]
        top = [(str(labels[j]), float(run.probs[i, j])) for j in order]
        return SpecialistAnswer(top, None, run.truncated[i], float(run.core_seconds[i]), 0.0)

    engine = RecordingGeneralist(
        GeneralistArgs(
            path=str(tiny_llm),
            max_model_len=args.max_model_len,
            kv_cache_gib=1.0,
            max_concurrency=args.generalist_concurrency,
            enforce_eager=not args.compile,
        )
    )
    await engine.start()
    try:
        with EscalationStore(db) as store:
            cascade = Cascade(engine, store, cost, max_concurrency=args.generalist_concurrency)
            await cascade.check_model(ref)
            # The first request builds the label grammar; keep it out of the measured sample.
            await engine.classify(warmup_text, ref.labels, ref.label_descriptions or None)
            engine.answers.clear()

            automated_decisions: list[Any] = []
            for start in range(0, len(automated), args.request_size):
                chunk = automated[start : start + args.request_size]
                automated_decisions += await cascade.decide(
                    ref, [answer(i) for i in chunk], "cascade", texts=[texts[i] for i in chunk]
                )
            began = time.perf_counter()
            escalated = await cascade.decide(
                ref, [answer(i) for i in sampled], "cascade", texts=[texts[i] for i in sampled]
            )
            generalist_wall = time.perf_counter() - began
            await cascade.close()
    finally:
        await engine.stop()
    return CascadeRun(
        automated_decisions, escalated, engine.answers, engine.start_seconds or 0.0, generalist_wall
    )


def appliance_report(db: Path, home: Path) -> dict[str, Any]:
    """``appliance report --json`` over the run's escalation database, in a child process."""
    env = {**os.environ, "APPLIANCE_HOME": str(home)}
    cmd = [sys.executable, "-m", "appliance.cli", "report", "--db", str(db), "--hours", "24", "--json"]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"appliance report failed ({done.returncode}): {done.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


# --------------------------------------------------------------------------- figures


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def accuracy_figures(
    truth: np.ndarray,
    predicted: np.ndarray,
    confidence: np.ndarray,
    threshold: float,
    sampled: Sequence[int],
    generalist_labels: Sequence[int],  # label ids, as ``truth``
    assumed: Sequence[float],
    target_precision: float,
) -> dict[str, Any]:
    from appliance.factory.evaluate import calibrate_threshold

    correct = predicted == truth
    auto = confidence >= threshold
    coverage = float(auto.mean())
    spec_auto = float(correct[auto].mean()) if auto.any() else math.nan
    spec_escalated = float(correct[~auto].mean()) if (~auto).any() else math.nan
    gen_hits = sum(label == truth[i] for i, label in zip(sampled, generalist_labels, strict=True))
    gen_acc = gen_hits / len(sampled) if len(sampled) else math.nan
    low, high = wilson(gen_hits, len(sampled))

    def blend(generalist_accuracy: float) -> float:
        automated_part = coverage * spec_auto if auto.any() else 0.0
        return automated_part + (1.0 - coverage) * generalist_accuracy

    in_sample = calibrate_threshold(confidence, correct.astype(np.float64), target_precision)
    return {
        "test_texts": len(truth),
        "threshold": threshold,
        "automated": int(auto.sum()),
        "escalated": int((~auto).sum()),
        "automation_rate": coverage,
        "specialist_accuracy_all": float(correct.mean()),
        "specialist_accuracy_automated": spec_auto,
        "specialist_accuracy_escalated": spec_escalated,
        "generalist_sample": len(sampled),
        "generalist_correct": int(gen_hits),
        "generalist_accuracy_escalated": gen_acc,
        "generalist_accuracy_ci95": [low, high],
        "chance_accuracy": 1.0 / len(np.unique(truth)) if len(truth) else math.nan,
        "end_to_end_accuracy": blend(gen_acc),
        "end_to_end_accuracy_ci95": [blend(low), blend(high)],
        # The accuracy a generalist needs on the escalated share for the cascade to beat the
        # specialist answering everything.
        "break_even_generalist_accuracy": spec_escalated,
        "assumed": [
            {"generalist_accuracy": a, "end_to_end_accuracy": blend(a), "computed": True} for a in assumed
        ],
        "test_calibrated": {
            "note": "threshold calibrated on these test texts themselves: an in-sample figure",
            "threshold": in_sample.threshold,
            "automation_rate": in_sample.coverage,
            "precision": in_sample.precision,
        },
    }


def cost_figures(
    args: argparse.Namespace,
    cost: Any,
    run: SpecialistRun,
    cascade: CascadeRun,
    report: dict[str, Any],
    sampled: Sequence[int],
    gflops: float,
    encoder_shape: EncoderShape,
    tiny: DecoderShape,
    labels: int,
    automation_rate: float,
) -> dict[str, Any]:
    from appliance.router.cost import CostModel

    spec_core = float(run.core_seconds.mean())
    answers = list(cascade.answers.values())
    # A generalist decision carries the specialist's cost too (both ran); its own part is the rest.
    gen_total = mean([d.cost.core_seconds for d in cascade.escalated])
    spec_of_escalated = mean([float(run.core_seconds[i]) for i in sampled])
    gen_core = gen_total - spec_of_escalated
    prompt = mean([a.prompt_tokens for a in answers])
    completion = mean([a.completion_tokens for a in answers])

    spec_flops = mean([encoder_shape.flops(t, labels) for t in run.tokens])
    tiny_flops = tiny.flops(prompt, completion)
    big_flops = LLAMA3_8B.flops(prompt, completion)
    cores = cost.cores
    # Compute-bound lower bound on this box: all cores at the measured fp32 matrix-product rate.
    big_box_s = big_flops / (gflops * 1e9)
    accel = CostModel(price_per_hour=args.accelerator_price_per_hour, currency=cost.currency, accelerators=1)
    big_accel_s = big_flops / (args.assumed_accelerator_tflops * 1e12)

    def route(core_seconds: float, flops: float) -> dict[str, float]:
        return {
            "core_seconds": core_seconds,
            "price": cost.price(max(0.0, core_seconds)).price,
            "flops": flops,
            "achieved_gflops_per_core": flops / core_seconds / 1e9 if core_seconds > 0 else math.nan,
        }

    routes = report["routes"]
    return {
        "currency": cost.currency,
        "price_per_hour": cost.price_per_hour,
        "cores": cores,
        "price_per_core_second": cost.price_per_core_second,
        "fp32_matmul_gflops_measured": gflops,
        "specialist": {
            **route(spec_core, spec_flops),
            "mean_tokens": mean(run.tokens),
            "texts_per_s": len(run.tokens) / run.wall_seconds,
            "cpu_seconds_per_text": run.cpu_seconds / len(run.tokens),
            "threads": run.threads,
        },
        "generalist_tiny": {
            **route(gen_core, tiny_flops),
            "params": tiny.params,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "engine_seconds_mean": mean([a.engine_seconds for a in answers]),
            "decisions_per_s": len(cascade.escalated) / cascade.generalist_wall_s
            if cascade.generalist_wall_s > 0
            else math.nan,
            "concurrency": args.generalist_concurrency,
            "engine_start_s": cascade.engine_start_s,
            "flops_rule_of_thumb": tiny.flops_rule_of_thumb(prompt, completion),
        },
        "generalist_8b_estimate": {
            "computed": True,
            "model": LLAMA3_8B.name,
            "params": LLAMA3_8B.params,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "flops": big_flops,
            "flops_rule_of_thumb": LLAMA3_8B.flops_rule_of_thumb(prompt, completion),
            "flops_vs_specialist": big_flops / spec_flops,
            "this_box_seconds_lower_bound": big_box_s,
            "this_box_core_seconds_lower_bound": big_box_s * cores,
            "this_box_price_lower_bound": cost.price(big_box_s * cores).price,
            "accelerator_tflops_assumed": args.assumed_accelerator_tflops,
            "accelerator_price_per_hour_assumed": args.accelerator_price_per_hour,
            "accelerator_seconds": big_accel_s,
            "accelerator_price": accel.price(0.0, big_accel_s).price,
            "fp32_weights_gib": LLAMA3_8B.params * 4 / 2**30,
            "bf16_weights_gib": LLAMA3_8B.params * 2 / 2**30,
        },
        "per_decision_blend": {
            # Every decision pays the specialist; the escalated share also pays the generalist.
            "tiny": spec_core + (1.0 - automation_rate) * gen_core,
            "8b_this_box_lower_bound": spec_core + (1.0 - automation_rate) * big_box_s * cores,
        },
        "appliance_report": {
            name: {
                "decisions": routes[name]["decisions"],
                "core_seconds_per_1000": routes[name]["core_seconds_per_1000"],
                "price_per_1000": routes[name]["price_per_1000"],
            }
            for name in ("specialist", "generalist")
        },
    }


# --------------------------------------------------------------------------- output


def print_table(result: dict[str, Any]) -> None:
    acc, cost = result["accuracy"], result["cost"]
    s, g, b = cost["specialist"], cost["generalist_tiny"], cost["generalist_8b_estimate"]
    cur = cost["currency"]
    print(f"model {result['model']}  threshold {acc['threshold']:.4f}  ({result['calibration']})")
    print(
        f"test texts {acc['test_texts']}: automated {acc['automated']} ({acc['automation_rate']:.1%}), "
        f"escalated {acc['escalated']}; generalist sample {acc['generalist_sample']}"
    )
    print()
    print(f"{'route':<34} {'FLOPs':>10} {'core-s':>10} {cur + '/decision':>16} {'tokens':>12}")
    print(
        f"{'specialist (measured)':<34} {s['flops']:>10.3g} {s['core_seconds']:>10.3g} "
        f"{s['price']:>16.3g} {s['mean_tokens']:>12.1f}"
    )
    print(
        f"{'generalist, tiny (measured, own)':<34} {g['flops']:>10.3g} {g['core_seconds']:>10.3g} "
        f"{g['price']:>16.3g} {g['prompt_tokens']:>7.0f}+{g['completion_tokens']:<4.1f}"
    )
    print(
        f"{'generalist, 8B here (computed)':<34} {b['flops']:>10.3g} "
        f"{b['this_box_core_seconds_lower_bound']:>10.3g} {b['this_box_price_lower_bound']:>16.3g} "
        f"{'>= bound':>12}"
    )
    print(
        f"{'generalist, 8B on 1 GPU (computed)':<34} {b['flops']:>10.3g} "
        f"{'-':>10} {b['accelerator_price']:>16.3g} {b['accelerator_seconds']:>9.3g} gs"
    )
    for name, row in cost["appliance_report"].items():
        print(
            f"appliance report, {name:<10} {row['decisions']:>6} decisions: "
            f"{row['core_seconds_per_1000']:.3g} core-s and {row['price_per_1000']:.3g} {cur} per 1,000"
            + (" (specialist's part included)" if name == "generalist" else "")
        )
    print(
        f"8B / specialist FLOPs: {b['flops_vs_specialist']:,.0f}x; fp32 ceiling measured "
        f"{cost['fp32_matmul_gflops_measured']:.0f} GFLOP/s -> >= {b['this_box_seconds_lower_bound']:.1f} s "
        f"per 8B decision on this box (fp32 weights {b['fp32_weights_gib']:.0f} GiB)"
    )
    print()
    print(f"{'accuracy':<44} {'value':>8}")
    rows = [
        ("specialist, all test texts", acc["specialist_accuracy_all"]),
        ("specialist, automated share", acc["specialist_accuracy_automated"]),
        ("specialist, escalated share (break-even)", acc["specialist_accuracy_escalated"]),
        (
            f"tiny generalist, escalated sample (n={acc['generalist_sample']})",
            acc["generalist_accuracy_escalated"],
        ),
        ("end to end, tiny generalist (measured)", acc["end_to_end_accuracy"]),
    ]
    rows += [
        (f"end to end, generalist at {a['generalist_accuracy']:.3f} (ASSUMED)", a["end_to_end_accuracy"])
        for a in acc["assumed"]
    ]
    for name, value in rows:
        print(f"{name:<44} {value:>8.4f}")
    low, high = acc["generalist_accuracy_ci95"]
    print(f"tiny generalist 95% CI [{low:.3f}, {high:.3f}]; chance {acc['chance_accuracy']:.4f}")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="CI smoke: few-shot specialist, test subset, 5 texts"
    )
    parser.add_argument("--model", metavar="NAME[:VERSION]", help="a specialist published in --home")
    parser.add_argument("--home", type=Path, help="APPLIANCE_HOME (default: a temporary folder)")
    parser.add_argument("--calibration", choices=("heldout", "test"), default="heldout")
    parser.add_argument("--few-shot", type=int, metavar="K", help="train on K texts per label")
    parser.add_argument("--test-per-label", type=int, metavar="K", help="K test texts per label")
    parser.add_argument("--generalist-sample", type=int, default=100, metavar="N")
    parser.add_argument("--generalist-concurrency", type=int, default=8)
    parser.add_argument("--request-size", type=int, default=32, help="texts per cascade call (automated)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--max-model-len", type=int, help="default: 2048, or less if the model allows less")
    parser.add_argument("--compile", action="store_true", help="let vLLM compile (slower start)")
    parser.add_argument(
        "--assumed-generalist-accuracy",
        default=",".join(f"{a:g}" for a in DEFAULT_ASSUMED_ACCURACY),
        help="comma-separated zero-shot accuracies for the computed end-to-end figures (ASSUMPTIONS)",
    )
    parser.add_argument("--assumed-accelerator-tflops", type=float, default=DEFAULT_ACCELERATOR_TFLOPS)
    parser.add_argument(
        "--accelerator-price-per-hour", type=float, default=DEFAULT_ACCELERATOR_PRICE_PER_HOUR
    )
    parser.add_argument("--price-per-hour", type=float, help="the box's price (default: CostModel's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.few_shot = args.few_shot or 10
        args.test_per_label = args.test_per_label or 4
        args.generalist_sample = min(args.generalist_sample, 5)
    try:
        args.assumed = [float(a) for a in args.assumed_generalist_accuracy.split(",") if a.strip()]
    except ValueError:
        parser.error("--assumed-generalist-accuracy takes comma-separated numbers such as 0.65,0.8")
    if not all(0.0 <= a <= 1.0 for a in args.assumed):
        parser.error("--assumed-generalist-accuracy values must lie in [0, 1]")
    if args.generalist_sample < 1 or args.generalist_concurrency < 1 or args.request_size < 1:
        parser.error("--generalist-sample, --generalist-concurrency and --request-size must be at least 1")
    return args


def benchmark(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    from appliance.engines.specialist import load_specialist
    from appliance.engines.tiny_llm import build_tiny_llm
    from appliance.factory.pipeline import default_base
    from appliance.router.cost import CostModel
    from appliance.store import ModelStore

    started = time.perf_counter()
    ref = args.model or train_specialist(args, home)
    specialist = load_specialist(ref, ModelStore(home))
    test = load_test(args.test_per_label, args.seed)
    index = {label: i for i, label in enumerate(specialist.labels)}
    unknown = sorted(set(test.labels) - set(index))
    if unknown:
        raise SystemExit(f"the test set has labels the specialist lacks: {unknown[:5]}")
    truth = np.array([index[label] for label in test.labels])

    print(f"[specialist] {ref}: {len(test.texts)} test texts", file=sys.stderr, flush=True)
    run = run_specialist(specialist, test.texts)
    predicted, confidence = run.probs.argmax(axis=1), run.probs.max(axis=1)
    automated_mask = confidence >= specialist.threshold
    automated = [int(i) for i in np.flatnonzero(automated_mask)]
    escalated = np.flatnonzero(~automated_mask)
    if len(escalated) == 0:
        raise SystemExit("no test text fell below the threshold: nothing to escalate")
    rng = np.random.default_rng(args.seed)
    picked = rng.choice(len(escalated), size=min(args.generalist_sample, len(escalated)), replace=False)
    sampled = [int(escalated[j]) for j in sorted(picked)]
    # The warm-up request uses an escalated text outside the sample (or an automated one).
    spare = [int(i) for i in escalated if int(i) not in set(sampled)] or automated or sampled
    tiny_path = build_tiny_llm(home / "tiny_llm", seed=args.seed)
    cost = CostModel(price_per_hour=args.price_per_hour) if args.price_per_hour is not None else CostModel()

    gflops = measure_fp32_gflops()
    db = home / "cascade-bench" / f"escalations-{int(time.time())}.db"
    print(f"[generalist] {len(sampled)} of {len(escalated)} escalated texts", file=sys.stderr, flush=True)
    cascade = asyncio.run(
        run_cascade(
            args, tiny_path, specialist, test.texts, run, automated, sampled, test.texts[spare[0]], db, cost
        )
    )
    report = appliance_report(db, home)

    generalist_labels = [d.label for d in cascade.escalated]
    accuracy = accuracy_figures(
        truth,
        predicted,
        confidence,
        specialist.threshold,
        sampled,
        [index[label] for label in generalist_labels],
        args.assumed,
        specialist.spec.calibration.target_precision,
    )
    encoder_shape = EncoderShape.from_config(default_base())
    tiny = DecoderShape.from_config("tiny random Llama", tiny_path)
    costs = cost_figures(
        args, cost, run, cascade, report, sampled, gflops, encoder_shape, tiny, len(specialist.labels),
        accuracy["automation_rate"],
    )  # fmt: skip
    routes_seen = {d.route.value for d in cascade.automated} | {d.route.value for d in cascade.escalated}
    return {
        "model": ref,
        "calibration": "manifest threshold"
        + (
            ""
            if args.model
            else f", calibrated on {'the test file' if args.calibration == 'test' else 'a 10% train split'}"
        ),
        "manifest_calibration": specialist.spec.calibration.model_dump(),
        "precision": specialist.precision,
        "quick": args.quick,
        "accuracy": accuracy,
        "cost": costs,
        "shapes": {
            "specialist_encoder": {**asdict(encoder_shape), "params": encoder_shape.params},
            "generalist_tiny": {**asdict(tiny), "params": tiny.params},
            "generalist_8b": {**asdict(LLAMA3_8B), "params": LLAMA3_8B.params},
        },
        "routes_seen": sorted(routes_seen),
        "sample": [
            {
                "text": test.texts[i],
                "truth": test.labels[i],
                "generalist": label,
                "specialist": specialist.labels[predicted[i]],
            }
            for i, label in zip(sampled, generalist_labels, strict=True)
        ],
        "machine": {"cpus": os.cpu_count(), "load_avg": list(os.getloadavg())},
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from appliance.config import apply_offline_env

    apply_offline_env()
    with tempfile.TemporaryDirectory(prefix="cascade-bench-") as tmp:
        home = (args.home or Path(tmp)).resolve()
        os.environ["APPLIANCE_HOME"] = str(home)
        result = benchmark(args, home)
    print_table(result)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2, default=float) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(result, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
