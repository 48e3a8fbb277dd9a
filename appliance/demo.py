"""``appliance demo``: build the Banking77 specialist and the Restaurant8k extractor if absent, serve
them in the background, classify three texts and extract the fields of two booking requests."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from appliance.config import state_dir

DEMO_MODEL = "banking77"
DEMO_TEXTS = (
    "I still have not received my new card, I ordered over a week ago.",
    "Why was I charged a fee for withdrawing cash?",
    "How do I top up my account with Apple Pay?",
)
DEMO_EXTRACTOR = "restaurant8k"
BOOKING_REQUESTS = (
    "Hi, could I book a table for 4 people this Friday at 7:30pm?",
    "A table for two tomorrow at 8pm please, the name is Maria Lopez.",
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo", help="build the demo classifier and extractor if absent, serve them, classify and extract"
    )
    demo.add_argument("--port", type=int, default=50051)
    demo.set_defaults(func=run_demo)


def ensure_demo_model() -> None:
    """Train the Banking77 head-mode specialist from the shipped data unless it is published."""
    from appliance.factory.pipeline import TrainSpec, train
    from appliance.store import ModelStore

    store = ModelStore()
    if store.versions(DEMO_MODEL):
        return
    data = Path(__file__).resolve().parent / "data" / "banking77"
    print(f"building the {DEMO_MODEL} demo specialist (head mode, shipped data); about 2 minutes", flush=True)
    train(
        TrainSpec(
            data=data / "train.csv",
            eval_data=data / "test.csv",
            text_column="text",
            label_column="category",
            name=DEMO_MODEL,
        ),
        store,
        progress=lambda msg: print(f"  {msg}", flush=True),
    )


def ensure_demo_extractor() -> None:
    """Train the Restaurant8k head-mode extractor from the shipped 1/16 split unless it is published."""
    from appliance.factory.extract import ExtractSpec, train_extractor
    from appliance.store import ModelStore

    store = ModelStore()
    if store.versions(DEMO_EXTRACTOR):
        return
    data = Path(__file__).resolve().parent / "data" / "restaurant8k" / "train_4.json"
    print(f"building the {DEMO_EXTRACTOR} demo extractor (head mode, 512 shipped examples)", flush=True)
    train_extractor(
        ExtractSpec(data=data, name=DEMO_EXTRACTOR), store, progress=lambda msg: print(f"  {msg}", flush=True)
    )


def run_demo(ns: argparse.Namespace) -> int:
    from appliance.client import Client
    from appliance.serve.runfile import read_run_file

    ensure_demo_model()
    ensure_demo_extractor()
    if read_run_file() is None:
        log = state_dir("run") / "serve.log"
        print(f"starting the appliance on 127.0.0.1:{ns.port} (log: {log})", flush=True)
        with log.open("ab") as out:
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "appliance.cli",
                    "serve",
                    "--port",
                    str(ns.port),
                    "--model",
                    DEMO_MODEL,
                    "--model",
                    DEMO_EXTRACTOR,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # keeps serving after this command returns
            )
        deadline = time.monotonic() + 600
        while read_run_file() is None:
            if time.monotonic() > deadline:
                print(f"error: the appliance did not come up; see {log}", file=sys.stderr)
                return 1
            time.sleep(1.0)
    with Client() as client:  # an appliance that was already running loads the extractor on first use
        response = client.classify(DEMO_MODEL, list(DEMO_TEXTS), top_k=3)
        extracted = client.extract(DEMO_EXTRACTOR, list(BOOKING_REQUESTS))
    print(f"\n{response.model}:{response.version} over gRPC ({client.connection.address}):")
    for text, r in zip(DEMO_TEXTS, response.results, strict=True):
        alternatives = ", ".join(f"{label} {score:.2f}" for label, score in r.top[1:])
        print(f"  {text!r}")
        print(f"    -> {r.label} ({r.confidence:.2f}, route {r.route}, {r.latency_ms:.1f} ms)")
        print(f"       next: {alternatives}")
    print(f"\n{extracted.model}:{extracted.version}, the fields of two booking requests:")
    for text, e in zip(BOOKING_REQUESTS, extracted.results, strict=True):
        print(f"  {text!r}  ({e.latency_ms:.1f} ms)")
        for span in e.spans:
            print(f"    {span.label:<10} {span.text!r} [{span.start}:{span.end}] {span.confidence:.2f}")
        if not e.spans:
            print("    (no fields found)")
    print("\nThe appliance keeps running. Try:")
    print('  appliance classify --model banking77 "I lost my card"')
    print(f'  appliance extract --model {DEMO_EXTRACTOR} "a table for 6 on Saturday at noon"')
    print("  appliance status")
    print("  appliance stop")
    return 0
