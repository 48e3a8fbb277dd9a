"""``appliance classify`` and ``appliance extract``: texts from the command line or a file, results
as JSON lines."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:  # imported when a command runs: the parser itself stays quick to build
    from appliance.client import Client

BATCH = 64
POLICY_CHOICES = ("specialist_only", "cascade", "generalist_only")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    classify = sub.add_parser("classify", help="classify texts with a served model (JSON lines out)")
    _common(classify, "classify")
    classify.add_argument("--top-k", type=int, default=1)
    classify.set_defaults(func=run_classify)

    extract = sub.add_parser(
        "extract", help="extract fields (spans) from texts with a served span extractor (JSON lines out)"
    )
    _common(extract, "extract fields from")
    extract.add_argument(
        "--classify-model", default="", help="also classify each text with this classifier (one encoder pass)"
    )
    extract.add_argument("--top-k", type=int, default=1, help="for --classify-model")
    extract.set_defaults(func=run_extract)


def _common(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--model", required=True, help="NAME or NAME:VERSION")
    parser.add_argument("texts", nargs="*", help=f"texts to {verb}")
    parser.add_argument("--file", type=Path, help="one text per line")
    parser.add_argument("--policy", choices=POLICY_CHOICES)
    parser.add_argument("--allow-fallback", action="store_true")
    parser.add_argument(
        "--address",
        help="host:port, a comma list of them, or dns:///NAME:PORT; several are balanced and failed over "
        "(default: the local appliance)",
    )
    parser.add_argument(
        "--server-name", help="the name every node's certificate carries (needed with several endpoints)"
    )


Answer = Callable[["Client", list[str]], Iterator[dict[str, Any]]]


def run_classify(ns: argparse.Namespace) -> int:
    def answer(client: Client, chunk: list[str]) -> Iterator[dict[str, Any]]:
        response = client.classify(
            ns.model, chunk, top_k=ns.top_k, policy=ns.policy, allow_fallback=ns.allow_fallback
        )
        for text, result in zip(chunk, response.results, strict=True):
            yield {"text": text, "model": f"{response.model}:{response.version}", **result.to_dict()}

    return _run(ns, answer)


def run_extract(ns: argparse.Namespace) -> int:
    def answer(client: Client, chunk: list[str]) -> Iterator[dict[str, Any]]:
        response = client.extract(
            ns.model,
            chunk,
            policy=ns.policy,
            allow_fallback=ns.allow_fallback,
            classify_model=ns.classify_model,
            top_k=ns.top_k,
        )
        for text, result in zip(chunk, response.results, strict=True):
            row = {"text": text, "model": f"{response.model}:{response.version}", **result.to_dict()}
            if response.classify_model:
                row["classify_model"] = f"{response.classify_model}:{response.classify_version}"
            yield row

    return _run(ns, answer)


def _texts(ns: argparse.Namespace) -> list[str]:
    texts = list(ns.texts)
    if ns.file is not None:
        texts += [
            line.rstrip("\n") for line in ns.file.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    return texts


def _run(ns: argparse.Namespace, answer: Answer) -> int:
    """Send the texts in calls of ``BATCH`` and print one JSON line per text; 1 on a failed call."""
    from appliance.client import Client, Connection

    texts = _texts(ns)
    if not texts:
        print("error: give texts as arguments or with --file", file=sys.stderr)
        return 2
    try:
        with Client(Connection.discover(address=ns.address, server_name=ns.server_name)) as client:
            for start in range(0, len(texts), BATCH):
                for row in answer(client, texts[start : start + BATCH]):
                    print(json.dumps(row, ensure_ascii=False), flush=True)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
