"""``appliance classify``: texts from the command line or a file, results as JSON lines."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc

BATCH = 64


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    classify = sub.add_parser("classify", help="classify texts with a served model (JSON lines out)")
    classify.add_argument("--model", required=True, help="NAME or NAME:VERSION")
    classify.add_argument("texts", nargs="*", help="texts to classify")
    classify.add_argument("--file", type=Path, help="one text per line")
    classify.add_argument("--top-k", type=int, default=1)
    classify.add_argument("--policy", choices=("specialist_only", "cascade", "generalist_only"))
    classify.add_argument("--allow-fallback", action="store_true")
    classify.add_argument("--address", help="host:port (default: the local appliance)")
    classify.set_defaults(func=run_classify)


def run_classify(ns: argparse.Namespace) -> int:
    from appliance.client import Client, Connection

    texts = list(ns.texts)
    if ns.file is not None:
        texts += [
            line.rstrip("\n") for line in ns.file.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    if not texts:
        print("error: give texts as arguments or with --file", file=sys.stderr)
        return 2
    try:
        with Client(Connection.discover(address=ns.address)) as client:
            for start in range(0, len(texts), BATCH):
                chunk = texts[start : start + BATCH]
                response = client.classify(
                    ns.model, chunk, top_k=ns.top_k, policy=ns.policy, allow_fallback=ns.allow_fallback
                )
                for text, result in zip(chunk, response.results, strict=True):
                    row = {"text": text, "model": f"{response.model}:{response.version}", **result.to_dict()}
                    print(json.dumps(row), flush=True)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
