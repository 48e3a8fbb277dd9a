"""How close the encoder engine comes to what this machine can compute.

Three figures, on the same texts (default: the Banking77 test set):

* **engine**: the serving engine offline, no server: tokenize, batches sorted by length and cut by
  the token budget (``OnnxEncoder.embed``), ONNX Runtime, then the specialist's head;
* **physical ceiling**: the model's FLOPs per text divided by a GEMM rate measured here. The linear
  layers (21.2 MFLOP per token for MiniLM-L6) run at the rate of the published precision (an fp32
  ``MatMul``, or for int8 an ONNX Runtime ``MatMulInteger`` u8×s8 — what dynamic quantization
  runs); the attention score and mix products (``4 · seq² · hidden`` per layer) stay fp32.
  Padding, softmax, layer norm, GELU and tokenization count as zero work, so no engine reaches it;
* **served** (optional): a throughput measured through the server (``bench.load --json-out``), to
  print served/engine.

    python -m bench.ceiling --home ~/.appliance --model banking77
    python -m bench.ceiling --home ~/.appliance --model banking77 --served-json load.json

``--json`` prints one JSON object as the last line. The function API (``gemm_rates``,
``ModelShape``, ``engine_throughput``, ``measure``) is what ``bench.compare`` calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.load import load_texts


# One encoder layer's linear GEMMs at the width ORT runs them after fusion (Q, K and V in one
# [hidden, 3·hidden] product), for a batch of M tokens: (K, N) pairs.
def layer_gemms(hidden: int, intermediate: int) -> list[tuple[int, int]]:
    return [(hidden, 3 * hidden), (hidden, hidden), (hidden, intermediate), (intermediate, hidden)]


GEMM_ROWS = 1024  # tokens per GEMM: a full batch of short texts under the default token budget


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int

    @classmethod
    def from_config(cls, folder: Path) -> ModelShape:
        config = json.loads((folder / "config.json").read_text())
        return cls(config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"])

    @property
    def linear_flops_per_token(self) -> float:
        """Multiply-adds of Q, K, V, the attention output and the two FFN products, ×2."""
        return 2.0 * self.layers * sum(k * n for k, n in layer_gemms(self.hidden, self.intermediate))

    def attention_flops(self, seq: int) -> float:
        """Q·Kᵀ and P·V over one text of ``seq`` tokens, all layers."""
        return 4.0 * self.layers * seq * seq * self.hidden


@dataclass(frozen=True)
class GemmRates:
    """GFLOP/s of the whole machine (``cores`` cores); int8 counts a multiply-add as two
    operations, like fp32. Each rate is the better of one GEMM using every core, and one GEMM per
    core side by side (a single-thread rate times the cores): the physical ceiling is what the
    cores can do, however the work is split."""

    fp32_ort: float
    fp32_torch: float | None
    int8_ort: float
    cores: int
    single_thread: dict[str, float | None]

    @property
    def fp32(self) -> float:
        return max(self.fp32_ort, self.fp32_torch or 0.0)


def _best_seconds(run: Callable[[], object], budget_s: float, repeats: int = 5) -> float:
    """Median of ``repeats`` timings, each a loop of calls lasting about ``budget_s / repeats``."""
    run()
    start = time.perf_counter()
    run()
    once = max(time.perf_counter() - start, 1e-6)
    loops = max(1, int(budget_s / repeats / once))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            run()
        times.append((time.perf_counter() - start) / loops)
    return statistics.median(times)


def _ort_matmul(m: int, k: int, n: int, int8: bool, threads: int) -> Callable[[], object]:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if int8:
        a = rng.integers(0, 255, (m, k), dtype=np.uint8)
        b = rng.integers(-127, 127, (k, n), dtype=np.int8)
        a_zero = numpy_helper.from_array(np.array(128, dtype=np.uint8), "a_zero")
        node = helper.make_node("MatMulInteger", ["a", "b", "a_zero"], ["y"])
        inits = [numpy_helper.from_array(b, "b"), a_zero]
        in_type, out_type = TensorProto.UINT8, TensorProto.INT32
    else:
        a = rng.standard_normal((m, k), dtype=np.float32)
        node = helper.make_node("MatMul", ["a", "b"], ["y"])
        inits = [numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "b")]
        in_type, out_type = TensorProto.FLOAT, TensorProto.FLOAT
    graph = helper.make_graph(
        [node],
        "gemm",
        [helper.make_tensor_value_info("a", in_type, [m, k])],
        [helper.make_tensor_value_info("y", out_type, [m, n])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"a": a})


def _rate(
    make: Callable[[int, int, int], Callable[[], object]],
    shapes: Sequence[tuple[int, int, int]],
    budget_s: float,
) -> float:
    """GFLOP/s over a set of GEMMs run back to back (the model's mix, not one lucky shape)."""
    flops = sum(2.0 * m * k * n for m, k, n in shapes)
    seconds = sum(_best_seconds(make(m, k, n), budget_s / len(shapes)) for m, k, n in shapes)
    return flops / seconds / 1e9


def _rates_at(shapes: list[tuple[int, int, int]], threads: int, budget_s: float) -> dict[str, float | None]:
    rates: dict[str, float | None] = {
        "fp32_ort": _rate(lambda m, k, n: _ort_matmul(m, k, n, False, threads), shapes, budget_s),
        "int8_ort": _rate(lambda m, k, n: _ort_matmul(m, k, n, True, threads), shapes, budget_s),
        "fp32_torch": None,
    }
    try:
        import torch
    except ImportError:
        return rates
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)

    def torch_mm(m: int, k: int, n: int) -> Callable[[], object]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        return lambda: torch.mm(a, b)

    rates["fp32_torch"] = _rate(torch_mm, shapes, budget_s)
    torch.set_num_threads(previous)
    return rates


def gemm_rates(shape: ModelShape, cores: int, rows: int = GEMM_ROWS, budget_s: float = 2.0) -> GemmRates:
    """Machine GEMM rates for one layer's linear products at ``rows`` tokens; each library,
    precision and thread count gets about ``budget_s`` seconds of timing."""
    shapes = [(rows, k, n) for k, n in layer_gemms(shape.hidden, shape.intermediate)]
    one = _rates_at(shapes, 1, budget_s)
    every = _rates_at(shapes, cores, budget_s) if cores > 1 else one

    def best(key: str) -> float | None:
        a, b = one[key], every[key]
        return None if a is None or b is None else max(cores * a, b)

    return GemmRates(
        fp32_ort=best("fp32_ort") or 0.0,
        fp32_torch=best("fp32_torch"),
        int8_ort=best("int8_ort") or 0.0,
        cores=cores,
        single_thread=one,
    )


def ceiling_per_s(shape: ModelShape, lengths: Sequence[int], precision: str, rates: GemmRates) -> float:
    """Texts/s if every FLOP of the model ran at the measured GEMM rate and nothing else cost time."""
    linear_rate = rates.int8_ort if precision == "int8" else rates.fp32
    seconds = sum(
        shape.linear_flops_per_token * n / (linear_rate * 1e9) + shape.attention_flops(n) / (rates.fp32 * 1e9)
        for n in lengths
    )
    return len(lengths) / seconds


def engine_throughput(specialist: object, texts: Sequence[str], repeats: int = 3) -> list[float]:
    """Texts/s of the offline path (tokenize, sorted token-budget batches, ORT, head), per repeat."""
    probs = specialist.probs  # type: ignore[attr-defined]
    probs(list(texts[:64]))  # warm-up, not timed
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        probs(list(texts))
        rates.append(len(texts) / (time.perf_counter() - start))
    return rates


@dataclass
class Ceiling:
    model: str
    precision: str
    texts: int
    mean_tokens: float
    mflop_per_text: float
    gemm_gflops: dict[str, float | None]  # the machine's (all cores)
    gemm_gflops_one_core: dict[str, float | None]
    cores: int
    engine_threads: str
    engine_per_s: float
    engine_runs: list[float]
    ceiling_per_s: float
    engine_over_ceiling: float
    ceiling_fp32_per_s: float  # the same count at the fp32 rate, for context
    served_per_s: float | None = None
    served_over_engine: float | None = None
    specialist: Any = field(default=None, repr=False)  # the loaded engine, for more runs

    def to_dict(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if k != "specialist"}

    def add_engine_run(self, texts: Sequence[str]) -> None:
        """One more offline run (e.g. between server runs, so both see the same machine load)."""
        self.engine_runs += engine_throughput(self.specialist, texts, 1)
        self.engine_per_s = statistics.median(self.engine_runs)
        self.engine_over_ceiling = self.engine_per_s / self.ceiling_per_s

    def summary(self) -> str:
        g = self.gemm_gflops
        torch_fp32 = f", torch fp32 {g['fp32_torch']:.1f}" if g.get("fp32_torch") else ""
        lines = [
            f"model {self.model} ({self.precision}), {self.texts} texts, {self.mean_tokens:.1f} tokens/text, "
            f"{self.mflop_per_text:.0f} MFLOP/text",
            f"GEMM rate ({self.cores} cores, model shapes): ORT fp32 {g['fp32_ort']:.1f}"
            f"{torch_fp32}, ORT int8 MatMulInteger {g['int8_ort']:.1f} GFLOP/s",
            f"physical ceiling   {self.ceiling_per_s:8.1f} texts/s ({self.precision}; "
            f"at the fp32 rate {self.ceiling_fp32_per_s:.1f})",
            f"engine (offline)   {self.engine_per_s:8.1f} texts/s  runs {_fmt(self.engine_runs)}"
            f"  ({self.engine_threads})",
            f"engine / ceiling   {self.engine_over_ceiling:8.2f}",
        ]
        if self.served_per_s is not None and self.served_over_engine is not None:
            lines += [
                f"served             {self.served_per_s:8.1f} texts/s",
                f"served / engine    {self.served_over_engine:8.2f}",
            ]
        return "\n".join(lines)


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.1f}" for v in values) + "]"


def measure(
    model: str,
    home: Path | None,
    texts: Sequence[str],
    repeats: int = 3,
    threads: int = 1,
    gemm_budget_s: float = 2.0,
) -> Ceiling:
    """Engine throughput and physical ceiling for the published ``model`` on ``texts``.

    ``threads`` ORT threads per session call; the encoder runs ``cores // threads`` calls side by
    side (1, the default, is how the server runs it)."""
    from appliance.config import apply_offline_env
    from appliance.engines.encoder import EncoderConfig, cores
    from appliance.engines.specialist import load_specialist
    from appliance.store import ModelStore

    apply_offline_env()
    store = ModelStore(home)
    specialist = load_specialist(model, store, EncoderConfig(intra_op_threads=threads))
    folder = store.encoder_folder(specialist.manifest.encoder_id)
    shape = ModelShape.from_config(folder if (folder / "config.json").is_file() else _base_folder())
    lengths = specialist.encoder.tokenize(texts).lengths
    runs = engine_throughput(specialist, texts, repeats)  # first: the GEMM runs leave torch threads
    rates = gemm_rates(shape, cores(), budget_s=gemm_budget_s)
    engine = statistics.median(runs)
    ceiling = ceiling_per_s(shape, lengths, specialist.precision, rates)
    mean_tokens = float(np.mean(lengths))
    flops = shape.linear_flops_per_token * mean_tokens + float(
        np.mean([shape.attention_flops(n) for n in lengths])
    )
    result = Ceiling(
        model=f"{specialist.name}:{specialist.version}",
        precision=specialist.precision,
        texts=len(texts),
        mean_tokens=mean_tokens,
        mflop_per_text=flops / 1e6,
        gemm_gflops={"fp32_ort": rates.fp32_ort, "fp32_torch": rates.fp32_torch, "int8_ort": rates.int8_ort},
        gemm_gflops_one_core=rates.single_thread,
        cores=rates.cores,
        engine_threads=f"{specialist.encoder.config.threads} ORT thread(s) x "
        f"{specialist.encoder.config.parallel} batch(es) at once",
        engine_per_s=engine,
        engine_runs=runs,
        ceiling_per_s=ceiling,
        engine_over_ceiling=engine / ceiling,
        ceiling_fp32_per_s=ceiling_per_s(shape, lengths, "fp32", rates),
    )
    result.specialist = specialist
    return result


def _base_folder() -> Path:
    """Encoder folders carry no config.json; the architecture comes from the packaged base."""
    from appliance.factory.pipeline import default_base

    return default_base()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ceiling", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--home", type=Path, help="APPLIANCE_HOME holding the model (default: the usual)")
    parser.add_argument("--model", default="banking77", help="published specialist NAME[:VERSION]")
    parser.add_argument("--texts", type=Path, help="one text per line, or a CSV with a 'text' column")
    parser.add_argument("--repeats", type=int, default=3, help="engine runs; the median is reported")
    parser.add_argument(
        "--threads", type=int, default=1, help="ORT threads per session call (default 1, as served; 0: all)"
    )
    served = parser.add_mutually_exclusive_group()
    served.add_argument("--served-per-s", type=float, help="a served throughput, texts/s")
    served.add_argument("--served-json", type=Path, help="a bench.load --json-out result")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line, last")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        texts = load_texts(args.texts)
        result = measure(args.model, args.home, texts, repeats=args.repeats, threads=args.threads)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    served = args.served_per_s
    if args.served_json:
        served = float(json.loads(args.served_json.read_text())["texts_per_s"])
    if served is not None:
        result.served_per_s = served
        result.served_over_engine = served / result.engine_per_s
    print(result.summary())
    if args.json:
        print(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
