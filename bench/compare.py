"""The appliance against a naive deployment of the same model, side by side, with the ceilings.

One run, one machine, the same texts (default: the Banking77 test set), the same specialist, the
same load generator (``bench.load``), single-text Classify requests:

* **ours**: the real Ray Serve application (``appliance.serve.lifecycle.running``), TLS and a
  bearer token as shipped (``--insecure-loopback``: plaintext on 127.0.0.1, no tokens);
* **baseline**: ``bench.baseline_server``, the same MiniLM weights and head in PyTorch eager mode
  behind a minimal synchronous gRPC server, one request at a time (plaintext, no tokens);
* **engine** and **physical ceiling**: ``bench.ceiling`` on the same texts, no server; the engine
  runs once before the servers start and once after each round of closed loops, so that it sees
  the same machine load as they do.

For each server: closed loop at concurrency 32 (its maximum throughput) and at concurrency 1
(latency alone), then an open loop at half that maximum (latency under a realistic load). Each
measurement is repeated ``--repeats`` times, the two servers alternating, and the median is
reported next to the raw runs. Everything is bounded in requests and time, and loopback only.

    python -m bench.compare --home ~/.appliance --model banking77
    python -m bench.compare --home /tmp/home --model b8 --quick --json

With ``--json`` the last line of stdout is one JSON object (keys in ``SUMMARY_KEYS``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench import ceiling, load

REPO = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = (
    "served_per_s",
    "engine_per_s",
    "served_over_engine",
    "baseline_per_s",
    "speedup_vs_baseline",
    "p50_ms_c1",
    "p99_ms",
    "ceiling_per_s",
    "engine_over_ceiling",
)


@dataclass(frozen=True)
class Plan:
    repeats: int
    closed_s: float  # each closed-loop run at concurrency 32
    single_s: float  # each closed-loop run at concurrency 1
    open_s: float  # each open-loop run at half the maximum rate
    texts: int | None  # None: all of them
    gemm_budget_s: float
    warmup: int = 32

    @classmethod
    def full(cls) -> Plan:
        return cls(
            repeats=3,
            closed_s=10.0,
            single_s=6.0,
            open_s=10.0,
            texts=None,
            gemm_budget_s=2.0,
        )

    @classmethod
    def quick(cls) -> Plan:
        return cls(repeats=1, closed_s=2.0, single_s=1.5, open_s=2.0, texts=300, gemm_budget_s=0.3)


# ---------------------------------------------------------------- the two servers


@contextmanager
def ours(home: Path, model: str, insecure: bool) -> Iterator[load.Target]:
    """The shipped application on a local Ray; yields the load generator's target."""
    os.environ["APPLIANCE_HOME"] = str(home)  # the local admin token is created under it
    from appliance.serve.app import AppArgs
    from appliance.serve.lifecycle import running, wait_until_ready

    args = AppArgs(
        host="127.0.0.1",
        port=0,
        home=str(home),
        models=[model],
        insecure_loopback=insecure,
        auth=not insecure,
        metrics_port=None,
    )
    with running(args) as live:
        if not wait_until_ready(timeout=300.0):
            raise RuntimeError(f"the appliance did not load {model} within 300 s")
        address = f"127.0.0.1:{live.port}"
        if insecure:
            yield load.Target(address=address, model=model)
        else:
            token = (home / "client" / "token").read_text().strip()
            yield load.Target(address=address, model=model, ca=home / "pki" / "ca.crt", token=token)


@contextmanager
def baseline(home: Path, model: str) -> Iterator[load.Target]:
    """``bench.baseline_server`` in a child process; yields its target, stops it after."""
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.baseline_server", "--home", str(home), "--model", model, "--port", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_pump, args=(child, lines), daemon=True).start()
    try:
        try:
            line = lines.get(timeout=180.0)
        except queue.Empty:
            raise RuntimeError("the baseline server did not start within 180 s") from None
        if not line.startswith("listening on "):
            raise RuntimeError(f"the baseline server did not start (exit {child.poll()}); see its stderr")
        yield load.Target(address=line.split()[-1], model=model.split(":")[0])
    finally:
        child.terminate()
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _pump(child: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
    """Forward the child's stdout lines; an empty line means it exited."""
    assert child.stdout is not None
    for line in child.stdout:
        lines.put(line)
    lines.put("")


# ---------------------------------------------------------------- measurements


@dataclass
class Runs:
    """The raw load results of one measurement, repeated."""

    results: list[load.LoadResult]

    def median(self, pick: Callable[[load.LoadResult], float]) -> float:
        return statistics.median(pick(r) for r in self.results)

    @property
    def per_s(self) -> float:
        return self.median(lambda r: r.texts_per_s)

    def latency(self, name: str) -> float:
        return self.median(lambda r: r.latency_ms.get(name, float("nan")))

    def raw(self) -> list[dict[str, object]]:
        return [
            {
                "texts_per_s": r.texts_per_s,
                "p50_ms": r.latency_ms.get("p50"),
                "p99_ms": r.latency_ms.get("p99"),
                "ok": r.ok,
                "errors": r.errors,
            }
            for r in self.results
        ]


def _line(result: load.LoadResult) -> str:
    lat = result.latency_ms
    return f"{result.texts_per_s:7.1f} texts/s  p50 {lat['p50']:7.1f} ms  p99 {lat['p99']:7.1f} ms"


def _checked(result: load.LoadResult, what: str) -> load.LoadResult:
    if result.errors:
        raise RuntimeError(f"{what}: {result.errors} {result.error_examples}")
    return result


def measure_servers(
    targets: dict[str, load.Target],
    texts: Sequence[str],
    plan: Plan,
    say: Callable[[str], None],
    between: Callable[[], None] = lambda: None,
) -> dict[str, dict[str, Runs]]:
    """Closed loop at 32 and 1, then open loop at half of each server's median maximum;
    ``between`` runs after each round of closed loops (the offline engine, on the same load)."""
    runs: dict[str, dict[str, Runs]] = {
        name: {"c32": Runs([]), "c1": Runs([]), "half": Runs([])} for name in targets
    }
    order = list(targets)

    async def closed(name: str, concurrency: int, seconds: float) -> load.LoadResult:
        result = await load.run_closed_loop(
            targets[name], texts, concurrency=concurrency, duration=seconds, warmup=plan.warmup
        )
        return _checked(result, f"{name} at concurrency {concurrency}")

    for i in range(plan.repeats):
        for name in order if i % 2 == 0 else order[::-1]:  # alternate who goes first
            for key, concurrency, seconds in (("c32", 32, plan.closed_s), ("c1", 1, plan.single_s)):
                result = asyncio.run(closed(name, concurrency, seconds))
                runs[name][key].results.append(result)
                say(f"  {name:8} concurrency {concurrency:2}:  {_line(result)}")
        between()
    for i in range(plan.repeats):
        for name in order if i % 2 == 0 else order[::-1]:
            rate = runs[name]["c32"].per_s / 2.0
            result = _checked(
                asyncio.run(
                    load.run_open_loop(
                        targets[name], texts, rate=rate, duration=plan.open_s, warmup=plan.warmup, seed=i
                    )
                ),
                f"{name} at {rate:.0f}/s",
            )
            runs[name]["half"].results.append(result)
            say(f"  {name:8} open loop {rate:6.1f}/s:  {_line(result)}")
    return runs


def agreement(targets: dict[str, load.Target], texts: Sequence[str]) -> float:
    """Share of texts on which both servers give the same label (same model, two runtimes)."""
    from appliance._proto.appliance.v1 import appliance_pb2, appliance_pb2_grpc

    async def labels(target: load.Target) -> list[str]:
        async with load._callers(target, 30.0) as callers:
            out: list[str] = []
            for start in range(0, len(texts), 32):
                reply = await next(callers)(list(texts[start : start + 32]))
                assert isinstance(reply, appliance_pb2.ClassifyResponse)
                out += [r.label for r in reply.results]
            return out

    del appliance_pb2_grpc
    a, b = (asyncio.run(labels(t)) for t in targets.values())
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


# ---------------------------------------------------------------- report


def summarize(
    engine: ceiling.Ceiling, runs: dict[str, dict[str, Runs]], agree: float, transport: str
) -> dict[str, object]:
    ours_, base = runs["ours"], runs["baseline"]
    served = ours_["c32"].per_s
    baseline_per_s = base["c32"].per_s
    return {
        "served_per_s": served,
        "engine_per_s": engine.engine_per_s,
        "served_over_engine": served / engine.engine_per_s,
        "baseline_per_s": baseline_per_s,
        "speedup_vs_baseline": served / baseline_per_s,
        "p50_ms_c1": ours_["c1"].latency("p50"),
        "p99_ms": ours_["half"].latency("p99"),
        "ceiling_per_s": engine.ceiling_per_s,
        "engine_over_ceiling": engine.engine_over_ceiling,
        "half_rate_per_s": served / 2.0,
        "p99_ms_c32": ours_["c32"].latency("p99"),
        "per_s_c1": ours_["c1"].per_s,
        "baseline_p50_ms_c1": base["c1"].latency("p50"),
        "baseline_p99_ms_c32": base["c32"].latency("p99"),
        "baseline_p99_ms": base["half"].latency("p99"),
        "baseline_half_rate_per_s": baseline_per_s / 2.0,
        "baseline_per_s_c1": base["c1"].per_s,
        "label_agreement": agree,
        "transport": transport,
        "model": engine.model,
        "precision": engine.precision,
        "texts": engine.texts,
        "mean_tokens": engine.mean_tokens,
        "mflop_per_text": engine.mflop_per_text,
        "gemm_gflops": engine.gemm_gflops,
        "engine_runs": engine.engine_runs,
        "raw": {name: {key: r.raw() for key, r in by.items()} for name, by in runs.items()},
    }


def table(s: dict[str, object]) -> str:
    f = {k: v for k, v in s.items() if isinstance(v, float)}
    rows = [
        ("max throughput, c=32 (texts/s)", f["served_per_s"], f["baseline_per_s"], f["speedup_vs_baseline"]),
        (
            "p99 at c=32 (ms)",
            f["p99_ms_c32"],
            f["baseline_p99_ms_c32"],
            f["p99_ms_c32"] / f["baseline_p99_ms_c32"],
        ),
        (
            "throughput, c=1 (texts/s)",
            f["per_s_c1"],
            f["baseline_per_s_c1"],
            f["per_s_c1"] / f["baseline_per_s_c1"],
        ),
        (
            "p50 at c=1 (ms)",
            f["p50_ms_c1"],
            f["baseline_p50_ms_c1"],
            f["p50_ms_c1"] / f["baseline_p50_ms_c1"],
        ),
        (
            "p99 at half max, open loop (ms)",
            f["p99_ms"],
            f["baseline_p99_ms"],
            f["p99_ms"] / f["baseline_p99_ms"],
        ),
    ]
    lines = [f"{'':34} {'ours':>10} {'baseline':>10} {'ours/base':>10}"]
    lines += [f"{name:34} {a:10.1f} {b:10.1f} {r:10.2f}" for name, a, b, r in rows]
    lines += [
        "",
        f"engine offline (texts/s)           {f['engine_per_s']:10.1f}",
        f"physical ceiling (texts/s)         {f['ceiling_per_s']:10.1f}",
        f"served / engine                    {f['served_over_engine']:10.2f}",
        f"engine / ceiling                   {f['engine_over_ceiling']:10.2f}",
        f"half-max rates (req/s): ours {f['half_rate_per_s']:.1f}, "
        f"baseline {f['baseline_half_rate_per_s']:.1f}",
        f"label agreement ours vs baseline   {f['label_agreement']:10.3f}",
        f"ours: {s['model']} {s['precision']}, {s['transport']}; "
        "baseline: torch eager, plaintext, one request at a time",
    ]
    return "\n".join(lines)


def run(home: Path, model: str, plan: Plan, insecure: bool, say: Callable[[str], None]) -> dict[str, object]:
    texts = load.load_texts()
    if plan.texts is not None:
        texts = texts[: plan.texts]
    say(f"engine and ceiling on {len(texts)} texts")
    engine = ceiling.measure(model, home, texts, repeats=1, gemm_budget_s=plan.gemm_budget_s)
    say(engine.summary())
    transport = "plaintext loopback, no tokens" if insecure else "TLS + bearer token"
    with baseline(home, model) as base_target, ours(home, model, insecure) as our_target:
        targets = {"ours": our_target, "baseline": base_target}
        say(f"servers up: ours {our_target.address} ({transport}), baseline {base_target.address}")
        agree = agreement(targets, texts[:256])

        def engine_round() -> None:
            engine.add_engine_run(texts)
            say(f"  engine   offline:         {engine.engine_runs[-1]:7.1f} texts/s")

        runs = measure_servers(targets, texts, plan, say, between=engine_round)
    return summarize(engine, runs, agree, transport)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--home", type=Path, required=True, help="APPLIANCE_HOME with the published model")
    parser.add_argument("--model", default="banking77", help="published specialist NAME[:VERSION]")
    parser.add_argument("--quick", action="store_true", help="one short repeat on 300 texts (CI smoke)")
    parser.add_argument("--repeats", type=int, help="repeats per measurement (default 3; quick 1)")
    parser.add_argument("--insecure-loopback", action="store_true", help="our server in plaintext, no tokens")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line, last")
    args = parser.parse_args(argv)
    plan = Plan.quick() if args.quick else Plan.full()
    if args.repeats:
        plan = Plan(**{**plan.__dict__, "repeats": args.repeats})
    say = lambda line: print(line, flush=True)  # noqa: E731
    started = time.monotonic()
    summary = run(args.home.resolve(), args.model, plan, args.insecure_loopback, say)
    summary["wall_s"] = time.monotonic() - started
    print(table(summary))
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
