"""``appliance serve``, ``status`` and ``stop``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from appliance.config import appliance_home
from appliance.errors import InvalidArgument


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="start the appliance (a local Ray, or join a cluster)")
    serve.add_argument("--port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument(
        "--metrics-port", type=int, help="Prometheus port on 127.0.0.1 (default 9464; 0 picks a free one)"
    )
    serve.add_argument("--address", help="Ray cluster address to join (default: start a local Ray)")
    serve.add_argument("--config", type=Path, help="Ray Serve config file (deploy/serve/appliance.yaml)")
    serve.add_argument("--model", action="append", dest="models", help="model to load at start (repeatable)")
    serve.add_argument(
        "--generalist",
        action="append",
        dest="generalists",
        metavar="[NAME=]PATH",
        help="local Hugging Face causal-LM folder for the cascade (repeatable, each NAME=PATH; a bare PATH "
        "is the one named 'default')",
    )
    serve.add_argument(
        "--generalist-max-model-len",
        type=int,
        help="the context window in tokens of the generalists given here (default: 2048, or less if the "
        "model allows less)",
    )
    serve.add_argument("--insecure-loopback", action="store_true", help="plaintext gRPC, loopback binds only")
    serve.add_argument("--mtls", action="store_true", help="require client certificates from the local CA")
    serve.add_argument(
        "--ingress-per-node",
        type=int,
        help="ingress processes on this box, all on --port (default: one per two cores, 1 to 8)",
    )
    serve.set_defaults(func=run_serve)

    status = sub.add_parser("status", help="is the appliance up, and what does it serve")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=run_status)

    stop = sub.add_parser("stop", help="stop the running appliance gracefully")
    stop.set_defaults(func=run_stop)


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
        "metrics_port": ns.metrics_port,
        "models": ns.models,
        "insecure_loopback": ns.insecure_loopback or None,
        "require_client_cert": ns.mtls or None,
        "ingress_per_node": ns.ingress_per_node,
    }
    args.update({k: v for k, v in overrides.items() if v is not None})
    window = {"max_model_len": ns.generalist_max_model_len} if ns.generalist_max_model_len else {}
    given = [parse_generalist_flag(flag) for flag in ns.generalists or []]
    if given or window:
        merge_generalists(args, given, window)
    args.setdefault("home", str(appliance_home()))
    app_args = AppArgs.model_validate(args)
    for generalist in app_args.all_generalists():
        generalist.window()  # a window the model cannot take fails here, not in a replica
    return app_args


def parse_generalist_flag(flag: str) -> tuple[str, str]:
    """``NAME=PATH`` or a bare ``PATH`` (named ``default``) as (name, absolute path)."""
    from appliance.engines.generalist_args import DEFAULT_NAME

    name, sep, path = flag.partition("=")
    if not sep or "/" in name:  # a bare path (which may itself hold '=' further on)
        name, path = DEFAULT_NAME, flag
    if not path:
        raise InvalidArgument(f"--generalist {flag!r}: give NAME=PATH or PATH")
    return name, str(Path(path).resolve())


def merge_generalists(args: dict[str, Any], given: list[tuple[str, str]], window: dict[str, int]) -> None:
    """Flags over the config file: a flag's name replaces that generalist's path (keeping its other
    settings) or adds one; ``window`` applies to the generalists named by flags, or all without any."""
    names = [name for name, _ in given]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise InvalidArgument(f"--generalist names {', '.join(twice)} more than once")
    configured = [*([args["generalist"]] if args.get("generalist") else []), *(args.get("generalists") or [])]
    by_name = {g.get("name", "default"): dict(g) for g in configured}
    for name, path in given:
        by_name[name] = {**by_name.get(name, {"name": name}), "path": path}
    if window and not by_name:
        raise InvalidArgument("--generalist-max-model-len needs a generalist (--generalist or the config's)")
    for name in [n for n, _ in given] or list(by_name):
        by_name[name].update(window)
    # "default" stays the single ``generalist:`` form; the others are the list.
    default = by_name.pop("default", None)
    args["generalist"] = default
    args["generalists"] = list(by_name.values())


def run_serve(ns: argparse.Namespace) -> int:
    from appliance.serve.lifecycle import DeployFailed, serve_forever
    from appliance.serve.runfile import read_run_file

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
    try:
        return serve_forever(args, ns.address)
    except DeployFailed as exc:
        print(f"error: the appliance did not start: {failure_summary(str(exc))}", file=sys.stderr)
        print(str(exc), file=sys.stderr)
        return 1


def failure_summary(report: str) -> str:
    """The line of a replica's traceback that names the exception (its last line)."""
    lines = [line.strip() for line in report.splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


def run_status(ns: argparse.Namespace) -> int:
    from appliance.client import Client
    from appliance.serve.runfile import read_run_file

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
        if info.get("metrics_port") is not None:
            print(f"  metrics: http://127.0.0.1:{info['metrics_port']}/metrics")
        for ref, reason in (info.get("waiting") or {}).items():
            print(f"  waiting for {ref}: {reason}")
        for m in models:
            print(f"  {m['name']}:{m['version']} {'loaded' if m['loaded'] else 'published'}")
    return 0


def run_stop(ns: argparse.Namespace) -> int:
    from appliance.serve.runfile import stop_server

    outcome = stop_server()
    if outcome == "still running":
        print("error: the appliance is still shutting down after 60 s", file=sys.stderr)
        return 1
    print(f"appliance: {outcome}")
    return 0
