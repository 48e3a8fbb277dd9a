"""``appliance models list|show|rm``."""

from __future__ import annotations

import argparse
import json
import sys

from appliance.errors import ApplianceError
from appliance.store import Manifest, ModelStore


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    models = sub.add_parser("models", help="manage the model store")
    msub = models.add_subparsers(dest="models_command", required=True)
    ls = msub.add_parser("list", help="published models and their versions")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=run_list)
    show = msub.add_parser("show", help="a model's verified manifest")
    show.add_argument("model", help="NAME or NAME:VERSION")
    show.set_defaults(func=run_show)
    rm = msub.add_parser("rm", help="delete a version (NAME:VERSION) or every version (NAME)")
    rm.add_argument("model")
    rm.set_defaults(func=run_rm)
    verify = msub.add_parser("verify", help="run a version's self-check set on this CPU")
    verify.add_argument("model", help="NAME or NAME:VERSION")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=run_verify)


def run_list(args: argparse.Namespace) -> int:
    store = ModelStore()
    rows = []
    for name in store.names():
        versions = store.versions(name)
        if not versions:
            continue
        manifest = store.load(f"{name}:{versions[-1]}", verify=False).data
        rows.append(
            {
                "name": name,
                "versions": versions,
                "latest": versions[-1],
                "precision": manifest.get("precision"),
                "accuracy": manifest.get("metrics", {}).get("accuracy"),
                "created_at": manifest.get("created_at"),
            }
        )
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{'NAME':<24}{'LATEST':>7}  {'VERSIONS':<16}{'PRECISION':<10}{'ACCURACY':>9}  CREATED")
        for r in rows:
            acc = f"{r['accuracy']:.4f}" if isinstance(r["accuracy"], float) else "-"
            vs = ",".join(map(str, r["versions"]))
            print(
                f"{r['name']:<24}{r['latest']:>7}  {vs:<16}{r['precision']!s:<10}{acc:>9}  {r['created_at']}"
            )
    return 0


def run_show(args: argparse.Namespace) -> int:
    try:
        manifest = ModelStore().load(args.model)
    except ApplianceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(manifest.data, indent=2))
    for notice in forgotten_data(manifest):
        print(f"notice: {notice}", file=sys.stderr)
    return 0


def forgotten_data(manifest: Manifest) -> list[str]:
    """What a version's lineage names that the dataset store no longer has (deleted: right to forget)."""
    from appliance.datasets.store import DatasetStore

    lineage = manifest.spec.lineage
    if lineage is None:
        return []
    store = DatasetStore(manifest.folder.parents[2])
    named = (("training", lineage.train_dataset), ("golden", lineage.golden_dataset))
    return [
        f"its {role} set {digest[:12]} was deleted from the dataset store: it cannot be retrained from it"
        for role, digest in named
        if digest is not None and not store.exists(digest)
    ]


def run_rm(args: argparse.Namespace) -> int:
    try:
        removed = ModelStore().remove(args.model)
    except ApplianceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    name = args.model.partition(":")[0]
    print(f"removed {name} versions {', '.join(map(str, removed))}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """Exit 0 when this CPU agrees with the factory at least as often as the bound asks, else 1."""
    from appliance.engines.specialist import load_specialist, self_check

    try:
        specialist = load_specialist(args.model)
    except ApplianceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = self_check(specialist)
    info = specialist.spec.self_check
    if result is None or info is None:
        print(f"error: {specialist.spec.ref} was published without a self-check set", file=sys.stderr)
        return 2
    if args.json:
        factory = {
            "fp32_agreement": info.factory_fp32_agreement,
            "accuracy": info.factory_accuracy,
            "cpu": info.factory_cpu,
        }
        print(json.dumps({"model": specialist.spec.ref, **result.to_dict(), "factory": factory}))
    else:
        print(f"{specialist.spec.ref}: {result.describe()}")
        print(
            f"in the factory: accuracy {info.factory_accuracy:.4f}, agreement with fp32 "
            f"{info.factory_fp32_agreement:.4f} ({info.factory_cpu})"
        )
    return 0 if result.passed else 1
