"""Extract against Classify over the real server, on one shared encoder and the same texts.

Starts the shipped application on a local Ray (``appliance.serve.lifecycle.running``, TLS and
tokens as deployed) serving a span extractor and a classifier, then drives it with the product's
``AsyncClient`` in closed loops at ``--concurrency`` (32) calls in flight:

* ``classify`` / ``extract``: single-text calls, then ``--batch``-text calls (the same texts);
* ``combined``: one Extract call with ``classify_model`` (both answers; one encoder pass per text
  when the two models share an encoder, as ``shared_encoder`` says) against ``separate``: a
  Classify and an Extract call for the same text, sent together.

Every mode runs ``--repeats`` times; the medians of texts/s and of the p50/p99 latencies are
reported with every raw figure, the CPU's ISA flags (lscpu) and the load average before and
after. Texts are the Restaurant8k test set's.

    python -m bench.extract_serving --home ~/.local/share/appliance --extractor restaurant8k \\
        --classifier banking77 --requests 2000 --json-out extract_serving.json
    python -m bench.extract_serving --build --requests 40 --repeats 1     # smoke: builds small models
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from appliance._proto.appliance.v1 import appliance_pb2 as pb
from appliance.client import AsyncClient, Connection
from bench.soak import cpu_info

DATA = Path(__file__).resolve().parents[1] / "appliance" / "data" / "restaurant8k"
Call = Callable[[list[str]], Awaitable[object]]


@dataclass(frozen=True)
class Run:
    mode: str
    batch: int
    requests: int
    texts: int
    wall_s: float
    texts_per_s: float
    p50_ms: float
    p99_ms: float


def restaurant_texts(limit: int) -> list[str]:
    rows = json.loads((DATA / "test.json").read_text(encoding="utf-8"))
    return [row["userInput"]["text"] for row in rows if row["userInput"]["text"].strip()][:limit]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100.0 * len(ordered)))]


async def closed_loop(
    mode: str, call: Call, batches: list[list[str]], concurrency: int, requests: int
) -> Run:
    """``requests`` calls, at most ``concurrency`` in flight, cycling through ``batches``."""
    latencies: list[float] = []
    texts = 0
    next_index = 0

    async def worker() -> None:
        nonlocal next_index, texts
        while next_index < requests:
            batch = batches[next_index % len(batches)]
            next_index += 1
            began = time.perf_counter()
            await call(batch)
            latencies.append(1000.0 * (time.perf_counter() - began))
            texts += len(batch)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return Run(
        mode,
        len(batches[0]),
        requests,
        texts,
        wall,
        texts / wall,
        percentile(latencies, 50),
        percentile(latencies, 99),
    )


def chunks(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i : i + size] for i in range(0, len(texts) - size + 1, size)] or [texts[:size]]


async def measure(args: argparse.Namespace, connection: Connection) -> dict[str, Any]:
    texts = restaurant_texts(args.texts)
    async with AsyncClient(connection) as client:
        extractor = await client.get_model(args.extractor)
        classifier = await client.get_model(args.classifier)
        shared = extractor.encoder_id == classifier.encoder_id

        async def classify(batch: list[str]) -> object:
            return await client.classify(args.classifier, batch)

        async def extract(batch: list[str]) -> object:
            return await client.extract(args.extractor, batch, policy="specialist_only")

        async def combined(batch: list[str]) -> object:
            return await client.extract(
                args.extractor, batch, policy="specialist_only", classify_model=args.classifier
            )

        async def separate(batch: list[str]) -> object:
            return await asyncio.gather(classify(batch), extract(batch))

        modes: list[tuple[str, Call, int]] = [
            ("classify", classify, 1),
            ("extract", extract, 1),
            ("classify", classify, args.batch),
            ("extract", extract, args.batch),
            ("combined", combined, 1),
            ("separate", separate, 1),
        ]
        warm = chunks(texts, 1)[: args.concurrency]
        for _, call, _ in modes:  # every path once, so no mode pays a first-call cost
            await asyncio.gather(*(call(b) for b in warm))
        runs: list[Run] = []
        for repeat in range(args.repeats):
            for mode, call, batch in modes:
                requests = max(1, args.requests // batch)
                run = await closed_loop(mode, call, chunks(texts, batch), args.concurrency, requests)
                runs.append(run)
                print(
                    f"[{repeat}] {mode:9s} batch {batch:3d}: {run.texts_per_s:8.1f} texts/s  "
                    f"p50 {run.p50_ms:7.1f} ms  p99 {run.p99_ms:7.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    rows = []
    for mode, _, batch in modes:
        mine = [r for r in runs if r.mode == mode and r.batch == batch]
        rows.append(
            {
                "mode": mode,
                "batch": batch,
                "median_texts_per_s": statistics.median(r.texts_per_s for r in mine),
                "median_p50_ms": statistics.median(r.p50_ms for r in mine),
                "median_p99_ms": statistics.median(r.p99_ms for r in mine),
                "raw": [asdict(r) for r in mine],
            }
        )
    return {
        "extractor": f"{extractor.name}:{extractor.version}",
        "classifier": f"{classifier.name}:{classifier.version}",
        "shared_encoder": shared,  # combined answers from one encoder pass per text only when True
        "precision": {
            "extractor": pb.Precision.Name(extractor.precision),
            "classifier": pb.Precision.Name(classifier.precision),
        },
        "concurrency": args.concurrency,
        "texts": len(texts),
        "rows": rows,
    }


def build_models(home: Path) -> tuple[str, str]:
    """Small models for a smoke run: a head-mode extractor and a classifier on its encoder."""
    from appliance.factory import pipeline
    from appliance.factory.extract import ExtractSpec, train_extractor
    from appliance.factory.pipeline import TrainSpec
    from appliance.store import ModelStore

    store = ModelStore(home)
    data = Path(__file__).resolve().parents[1] / "appliance" / "data" / "banking77"
    if not store.versions("bench-r8k"):
        slots = ExtractSpec(data=DATA / "train_4.json", name="bench-r8k", limit=200)
        train_extractor(slots, store, progress=lambda _: None)
    if not store.versions("bench-intents"):
        # Published at the extractor's precision, whatever the int8 gate would choose: only a
        # classifier on the very same encoder artifact shares the extractor's pass.
        precision = store.load("bench-r8k").spec.precision
        gate = mock.patch.object(pipeline, "gate", lambda *_: (precision, f"{precision}: the extractor's"))
        spec = TrainSpec(
            data=data / "train.csv",
            text_column="text",
            label_column="category",
            name="bench-intents",
            few_shot=8,  # 8 examples of each of the 77 labels: trains in seconds
        )
        with gate:
            pipeline.train(spec, store)
    return "bench-r8k", "bench-intents"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, help="APPLIANCE_HOME holding both models")
    parser.add_argument("--extractor", default="restaurant8k")
    parser.add_argument("--classifier", default="banking77")
    parser.add_argument("--build", action="store_true", help="train small models into --home (or a temp one)")
    parser.add_argument("--requests", type=int, default=2000, help="texts per mode and repeat")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--texts", type=int, default=512, help="Restaurant8k test texts cycled through")
    parser.add_argument("--json-out", type=Path)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    home = args.home or Path(tempfile.mkdtemp(prefix="bench-extract-serving-"))
    os.environ["APPLIANCE_HOME"] = str(home)  # the local admin token is created under it
    if args.build:
        args.extractor, args.classifier = build_models(home)
    from appliance.serve.app import AppArgs
    from appliance.serve.lifecycle import running, wait_until_ready

    load_before = os.getloadavg()
    app = AppArgs(
        host="127.0.0.1", port=0, home=str(home), models=[args.extractor, args.classifier], metrics_port=None
    )
    with running(app) as live:
        if not wait_until_ready(timeout=300.0):
            raise RuntimeError(f"the appliance did not load {app.models} within 300 s")
        token = (home / "client" / "token").read_text().strip()
        connection = Connection(f"127.0.0.1:{live.port}", tls=True, ca=home / "pki" / "ca.crt", token=token)
        result = asyncio.run(measure(args, connection))
    out = {
        "benchmark": "extract_serving",
        "machine": {**cpu_info(), "load_before": load_before, "load_after": os.getloadavg()},
        **result,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
