"""``appliance demo``: build the Banking77 specialist if absent, serve it in the background, classify."""

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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser("demo", help="build the Banking77 specialist if absent, serve it, classify")
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


def run_demo(ns: argparse.Namespace) -> int:
    from appliance.client import Client
    from appliance.serve.lifecycle import read_run_file

    ensure_demo_model()
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
    with Client() as client:
        response = client.classify(DEMO_MODEL, list(DEMO_TEXTS), top_k=3)
    print(f"\n{response.model}:{response.version} over gRPC ({client.connection.address}):")
    for text, r in zip(DEMO_TEXTS, response.results, strict=True):
        alternatives = ", ".join(f"{label} {score:.2f}" for label, score in r.top[1:])
        print(f"  {text!r}")
        print(f"    -> {r.label} ({r.confidence:.2f}, route {r.route}, {r.latency_ms:.1f} ms)")
        print(f"       next: {alternatives}")
    print("\nThe appliance keeps running. Try:")
    print('  appliance classify --model banking77 "I lost my card"')
    print("  appliance status")
    print("  appliance stop")
    return 0
