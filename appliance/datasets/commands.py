"""``appliance datasets list|show|rm``: the training and golden sets kept in the dataset store."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from appliance.config import appliance_home
from appliance.datasets.store import DatasetInfo, DatasetStore
from appliance.errors import ApplianceError
from appliance.store import ModelStore


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    datasets = sub.add_parser("datasets", help="the training and golden sets kept for retraining")
    dsub = datasets.add_subparsers(dest="datasets_command", required=True)
    ls = dsub.add_parser("list", help="stored datasets, oldest first")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=run_list)
    show = dsub.add_parser("show", help="a dataset's counts, names and the models trained on it")
    show.add_argument("digest", help="its sha256, or at least 8 leading hex digits of it")
    show.add_argument("--rows", type=int, default=0, metavar="N", help="also print its first N rows")
    show.set_defaults(func=run_show)
    rm = dsub.add_parser("rm", help="delete a dataset (models trained on it say so in `models show`)")
    rm.add_argument("digest")
    rm.set_defaults(func=run_rm)


def users(models: ModelStore, digest: str) -> list[str]:
    """The model versions whose lineage names ``digest`` (training or golden set)."""
    found = []
    for name in models.names():
        for version in models.versions(name):
            lineage = models.load(f"{name}:{version}", verify=False).spec.lineage
            if lineage is not None and digest in (lineage.train_dataset, lineage.golden_dataset):
                found.append(f"{name}:{version}")
    return found


def _json(info: DatasetInfo) -> dict[str, Any]:
    return {
        "digest": info.digest,
        "kind": info.kind,
        "rows": info.n_rows,
        "labels": len(info.label_counts),
        "created_at": info.created_at,
        "names": [{"name": r.name, "role": r.role, "version": r.version} for r in info.refs],
    }


def run_list(ns: argparse.Namespace) -> int:
    rows = [_json(i) for i in DatasetStore(appliance_home()).list()]
    if ns.json:
        print(json.dumps(rows))
        return 0
    print(f"{'DIGEST':<14}{'KIND':<10}{'ROWS':>7}{'LABELS':>8}  {'CREATED':<27}NAMES")
    for r in rows:
        names = ", ".join(f"{n['name']} #{n['version']} ({n['role']})" for n in r["names"])
        print(
            f"{r['digest'][:12]:<14}{r['kind']:<10}{r['rows']:>7}{r['labels']:>8}  "
            f"{r['created_at']:<27}{names}"
        )
    return 0


def run_show(ns: argparse.Namespace) -> int:
    home = appliance_home()
    store = DatasetStore(home)
    try:
        info = store.info(ns.digest)
        out = {
            **_json(info),
            "label_counts": info.label_counts,
            "models": users(ModelStore(home), info.digest),
        }
        if ns.rows > 0:
            out["first_rows"] = [row.__dict__ for row in store.get(info.digest).rows[: ns.rows]]
    except ApplianceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2, ensure_ascii=False, default=str))
    return 0


def run_rm(ns: argparse.Namespace) -> int:
    home = appliance_home()
    try:
        info = DatasetStore(home).remove(ns.digest)
    except ApplianceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    trained = users(ModelStore(home), info.digest)
    print(f"removed dataset {info.digest[:12]} ({info.n_rows} rows)")
    if trained:
        print(f"models trained or evaluated on it, which cannot be retrained from it: {', '.join(trained)}")
    return 0
