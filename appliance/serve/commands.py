"""``appliance serve``, ``status``, ``stop`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from appliance.config import appliance_home, state_dir
from appliance.errors import InvalidArgument

DEMO_MODEL = "banking77"
DEMO_TEXTS = (
    "I still have not received my new card, I ordered over a week ago.",
    "Why was I charged a fee for withdrawing cash?",
    "How do I top up my account with Apple Pay?",
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="start the appliance (a local Ray, or join a cluster)")
    serve.add_argument("--port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--address", help="Ray cluster address to join (default: start a local Ray)")
    serve.add_argument("--config", type=Path, help="Ray Serve config file (deploy/serve/appliance.yaml)")
    serve.add_argument("--model", action="append", dest="models", help="model to load at start (repeatable)")
    serve.add_argument("--generalist", type=Path, help="local Hugging Face causal-LM folder for the cascade")
    serve.add_argument(
        "--generalist-max-model-len",
        type=int,
        help="the generalist's context window in tokens (default: 2048, or less if the model allows less)",
    )
    serve.add_argument("--insecure-loopback", action="store_true", help="plaintext gRPC, loopback binds only")
    serve.add_argument("--mtls", action="store_true", help="require client certificates from the local CA")
    serve.set_defaults(func=run_serve)

    status = sub.add_parser("status", help="is the appliance up, and what does it serve")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=run_status)

    stop = sub.add_parser("stop", help="stop the running appliance gracefully")
    stop.set_defaults(func=run_stop)

    demo = sub.add_parser("demo", help="build the Banking77 specialist if absent, serve it, classify")
    demo.add_argument("--port", type=int, default=50051)
    demo.set_defaults(func=run_demo)


def load_app_args(config: Path | None) -> dict[str, Any]:
    """The ``args`` of the first application in a Serve config file."""
    if config is None:
        return {}
    data = yaml.safe_load(config.read_text())
    apps = data.get("applications") or []
    if not apps:
        raise ValueError(f"{config}: no applications")
    return dict(apps[0].get("args") or {})


def app_args_from(ns: argparse.Namespace) -> Any:
    from appliance.serve.app import AppArgs

    args = load_app_args(ns.config)
    overrides = {
        "port": ns.port,
        "host": ns.host,
        "models": ns.models,
        "insecure_loopback": ns.insecure_loopback or None,
        "require_client_cert": ns.mtls or None,
    }
    args.update({k: v for k, v in overrides.items() if v is not None})
    generalist = {
        "path": str(ns.generalist.resolve()) if ns.generalist is not None else None,
        "max_model_len": ns.generalist_max_model_len,
    }
    generalist = {k: v for k, v in generalist.items() if v is not None}
    if generalist:
        args["generalist"] = {**(args.get("generalist") or {}), **generalist}
    args.setdefault("home", str(appliance_home()))
    app_args = AppArgs.model_validate(args)
    if app_args.generalist is not None:
        app_args.generalist.window()  # a window the model cannot take fails here, not in a replica
    return app_args


def run_serve(ns: argparse.Namespace) -> int:
    from appliance.serve.lifecycle import read_run_file, serve_forever

    running = read_run_file()
    if running is not None:
        print(
            f"error: an appliance is already running (pid {running['pid']}, port {running['port']})",
            file=sys.stderr,
        )
        return 1
    try:
        args = app_args_from(ns)
    except (ValueError, OSError, InvalidArgument) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return serve_forever(args, ns.address)


def run_status(ns: argparse.Namespace) -> int:
    from appliance.client import Client
    from appliance.serve.lifecycle import read_run_file

    info = read_run_file()
    if info is None:
        print("appliance: not running")
        return 3
    with Client() as client:
        health = client.health("appliance.v1.InferenceService")
        models = [
            {"name": m.name, "version": m.version, "loaded": m.loaded} for m in client.list_models().models
        ]
    report = {**info, "health": health, "models": models}
    if ns.json:
        print(json.dumps(report))
    else:
        print(f"appliance: running, pid {info['pid']}, {info['host']}:{info['port']}, inference {health}")
        for m in models:
            print(f"  {m['name']}:{m['version']} {'loaded' if m['loaded'] else 'published'}")
    return 0


def run_stop(ns: argparse.Namespace) -> int:
    from appliance.serve.lifecycle import stop_server

    if stop_server():
        print("appliance: stopped")
        return 0
    print("appliance: not running")
    return 0


def ensure_demo_model() -> None:
    """Train the Banking77 head-mode specialist from the shipped data unless it is published."""
    from appliance.factory.pipeline import TrainSpec, train
    from appliance.store import ModelStore

    store = ModelStore()
    if store.versions(DEMO_MODEL):
        return
    data = Path(__file__).resolve().parents[1] / "data" / "banking77"
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
