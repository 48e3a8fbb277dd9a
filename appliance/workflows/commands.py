"""``appliance workflows publish|list|show|rm`` and ``appliance run WORKFLOW "text" ...``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    workflows = sub.add_parser("workflows", help="publish and manage workflow definitions")
    wsub = workflows.add_subparsers(dest="workflows_command", required=True)
    publish = wsub.add_parser("publish", help="check a workflow file against the store and publish it")
    publish.add_argument("file", type=Path, help="the workflow's YAML (docs/WORKFLOWS.md)")
    publish.add_argument("--json", action="store_true")
    publish.set_defaults(func=run_publish)
    ls = wsub.add_parser("list", help="published workflows and their versions")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=run_list)
    show = wsub.add_parser("show", help="a workflow version, verified: its definition and checked models")
    show.add_argument("workflow", help="NAME or NAME:VERSION")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=run_show)
    rm = wsub.add_parser("rm", help="delete a version (NAME:VERSION) or every version (NAME)")
    rm.add_argument("workflow")
    rm.set_defaults(func=run_rm)
    _register_tune(wsub)

    run = sub.add_parser("run", help="run a published workflow on the appliance over texts (JSON out)")
    run.add_argument("workflow", help="NAME or NAME:VERSION")
    run.add_argument("texts", nargs="*", help="texts; each is one run")
    run.add_argument("--file", type=Path, help="one text per line")
    run.add_argument("--timeout", type=float, default=60.0, help="seconds for the whole call (default 60)")
    run.add_argument("--address", help="host:port (default: the local appliance)")
    run.add_argument("--server-name", help="the name the server's certificate carries")
    run.set_defaults(func=run_workflow)


def _register_tune(wsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``workflows tune`` lives in its own module, which adds its parser to this group."""
    try:
        from appliance.workflows.tune import register as register_tune
    except ModuleNotFoundError as exc:
        if exc.name != "appliance.workflows.tune":
            raise
        return
    register_tune(wsub)


def _fail(exc: ApplianceError) -> int:
    print(f"error: {exc.message}", file=sys.stderr)
    return 1


def run_publish(args: argparse.Namespace) -> int:
    from appliance.workflows.store import publish

    try:
        published = publish(args.file)
    except ApplianceError as exc:
        return _fail(exc)
    models = published.manifest.data.get("models", {})
    if args.json:
        print(json.dumps({"workflow": published.name, "version": published.version, "models": models}))
    else:
        checked = ", ".join(sorted(set(models.values()))) or "none"
        print(f"published {published.ref} ({len(published.spec.steps)} steps; models checked: {checked})")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from appliance.workflows.store import WorkflowStore

    store = WorkflowStore()
    rows: list[dict[str, Any]] = []
    for name in store.names():
        versions = store.versions(name)
        if versions:
            data = store.load(f"{name}:{versions[-1]}", verify=False).data
            steps = data.get("spec", {}).get("steps", [])
            rows.append(
                {
                    "name": name,
                    "versions": versions,
                    "latest": versions[-1],
                    "steps": len(steps),
                    "created_at": data.get("created_at"),
                }
            )
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'NAME':<24}{'LATEST':>7}  {'VERSIONS':<16}{'STEPS':>6}  CREATED")
    for r in rows:
        vs = ",".join(map(str, r["versions"]))
        print(f"{r['name']:<24}{r['latest']:>7}  {vs:<16}{r['steps']:>6}  {r['created_at']}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from appliance.workflows.store import load

    try:
        stored = load(args.workflow)
    except ApplianceError as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps({**stored.manifest.data, "definition": stored.text}, ensure_ascii=False))
        return 0
    data = stored.manifest.data
    print(f"{stored.ref}  created {data.get('created_at')}  from {data.get('source')}  (signature verified)")
    for step, model in sorted(data.get("models", {}).items()):
        print(f"  {step:<20} checked against {model}")
    print()
    print(stored.text, end="" if stored.text.endswith("\n") else "\n")
    return 0


def run_rm(args: argparse.Namespace) -> int:
    from appliance.workflows.store import WorkflowStore

    try:
        removed = WorkflowStore().remove(args.workflow)
    except ApplianceError as exc:
        return _fail(exc)
    name = args.workflow.partition(":")[0]
    print(f"removed {', '.join(f'{name}:{v}' for v in removed)}")
    return 0


def run_workflow(args: argparse.Namespace) -> int:
    """One call for all the texts; prints the whole response as one JSON object."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    from appliance.client import Client, Connection

    texts = list(args.texts)
    if args.file is not None:
        texts += [line for line in args.file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        print("error: give texts as arguments or with --file", file=sys.stderr)
        return 2
    try:
        with Client(Connection.discover(address=args.address, server_name=args.server_name)) as client:
            response = client.run_workflow(args.workflow, texts, timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    out: dict[str, Any] = MessageToDict(response, preserving_proto_field_name=True)
    for result in out.get("results", []):
        for step in result.get("steps", []):
            step["output"] = json.loads(step.pop("output_json", "{}") or "{}")
    print(json.dumps(out, ensure_ascii=False))
    return 0
