"""Per-version figures for ``appliance report NAME``: what each version served and what it cost,
how often it was right where a reviewer later corrected it, where it came from, and how the
challenger did in shadow.

Decision rows and corrections are read from the escalation database, shadow rows from
``loop/shadow.db``, lineage from the manifests; nothing is written.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError
from appliance.loop.shadow import ShadowRow, read_rows, shadow_db, text_sha256
from appliance.store import ModelStore

PER = 1000


@dataclass
class VersionFigures:
    version: int
    decisions: int = 0
    specialist: int = 0
    generalist: int = 0
    core_seconds: float = 0.0
    price: float = 0.0
    corrected: int = 0
    corrected_right: int = 0
    lineage: dict[str, Any] = field(default_factory=dict)
    shadow: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        n = self.decisions
        return {
            "version": self.version,
            "decisions": n,
            "automation_rate": self.specialist / n if n else None,
            "escalation_rate": self.generalist / n if n else None,
            f"price_per_{PER}": PER * self.price / n if n else None,
            f"core_seconds_per_{PER}": PER * self.core_seconds / n if n else None,
            "corrected": self.corrected,
            "accuracy_on_corrected": self.corrected_right / self.corrected if self.corrected else None,
            "lineage": self.lineage,
            "shadow": self.shadow,
        }


@dataclass(frozen=True)
class Corrected:
    """A corrected decision: which version served it, what it said, what was right."""

    model_version: int
    request_id: str
    text_sha256: str | None
    served_label: str | None
    label: str


def decision_totals(db: Path, name: str, since: float, until: float) -> dict[int, VersionFigures]:
    out: dict[int, VersionFigures] = {}
    if not db.is_file():
        return out
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT model_version, route, COUNT(*), SUM(cost_core_seconds), SUM(price) FROM decisions"
            " WHERE model = ? AND created_epoch >= ? AND created_epoch < ? GROUP BY model_version, route",
            (name, since, until),
        ).fetchall()
    except sqlite3.DatabaseError:
        return out
    finally:
        conn.close()
    for version, route, n, core, price in rows:
        figures = out.setdefault(int(version), VersionFigures(int(version)))
        figures.decisions += int(n)
        figures.core_seconds += float(core or 0.0)
        figures.price += float(price or 0.0)
        if route == "specialist":
            figures.specialist += int(n)
        elif route == "generalist":
            figures.generalist += int(n)
    return out


def corrected_decisions(db: Path, name: str, since: float) -> list[Corrected]:
    """The latest label correction of each corrected decision of ``name``."""
    from appliance.router.escalations import EscalationStore

    if not db.is_file():
        return []
    try:
        store = EscalationStore(db)
        try:
            latest = {c.target: c for c in store.iter_corrections(name, since) if c.label}
        finally:
            store.close()
    except ApplianceError:
        return []
    return [
        Corrected(
            c.model_version,
            c.request_id,
            text_sha256(c.text) if c.text is not None else None,
            c.served_label,
            str(c.label),
        )
        for c in latest.values()
    ]


def shadow_figures(rows: Iterable[ShadowRow], corrected: list[Corrected]) -> dict[int, dict[str, Any]]:
    """Per challenger version: agreement with the champion, coverage at its own threshold, its
    accuracy on decisions that were later corrected, and its compute (counted apart)."""
    by_text = {(c.request_id, c.text_sha256): c for c in corrected if c.text_sha256}
    by_request: dict[str, list[Corrected]] = defaultdict(list)
    for c in corrected:
        by_request[c.request_id].append(c)
    grouped: dict[int, list[ShadowRow]] = defaultdict(list)
    for row in rows:
        grouped[row.challenger_version].append(row)
    out: dict[int, dict[str, Any]] = {}
    for version, rs in sorted(grouped.items()):
        per_request: dict[str, int] = defaultdict(int)
        for r in rs:
            per_request[r.request_id] += 1
        judged = []
        for r in rs:
            match = by_text.get((r.request_id, r.text_sha256))
            if match is None and per_request[r.request_id] == 1 and len(by_request[r.request_id]) == 1:
                match = by_request[r.request_id][0]  # texts not kept: one text per request still pairs
            if match is not None:
                judged.append(r.challenger_label == match.label)
        n = len(rs)
        out[version] = {
            "texts": n,
            "agreement": sum(r.challenger_label == r.champion_label for r in rs) / n,
            "coverage": sum(r.challenger_confidence >= r.challenger_threshold for r in rs) / n,
            "corrected": len(judged),
            "accuracy_on_corrected": sum(judged) / len(judged) if judged else None,
            f"core_seconds_per_{PER}": PER * sum(r.core_seconds for r in rs) / n,
            "champion_versions": sorted({r.champion_version for r in rs}),
        }
    return out


def lineage_of(store: ModelStore, name: str, version: int) -> dict[str, Any]:
    try:
        spec = store.load(f"{name}:{version}", verify=False).spec
    except ApplianceError:
        return {"published": False}
    lineage = spec.lineage
    out: dict[str, Any] = {
        "published": True,
        "stage": getattr(spec, "stage", None),
        "created_at": spec.created_at,
    }
    if lineage is not None:
        out.update(lineage.model_dump(exclude={"trained_from"}))
        out["trained_from"] = lineage.trained_from.source
    return out


def version_report(
    name: str, db: Path, home: Path, since: float, until: float, store: ModelStore | None = None
) -> list[dict[str, Any]]:
    store = store or ModelStore(home)
    figures = decision_totals(db, name, since, until)
    corrected = corrected_decisions(db, name, since)
    for c in corrected:
        f = figures.setdefault(c.model_version, VersionFigures(c.model_version))
        f.corrected += 1
        f.corrected_right += int(c.served_label == c.label)
    shadow = shadow_figures(read_rows(shadow_db(home), name, since), corrected)
    for version, numbers in shadow.items():
        figures.setdefault(version, VersionFigures(version)).shadow = numbers
    for version in store.versions(name):
        figures.setdefault(version, VersionFigures(version))
    serving = store.serving_version(name)
    out = []
    for version in sorted(figures):
        f = figures[version]
        f.lineage = lineage_of(store, name, version)
        out.append({**f.to_dict(), "serving": version == serving})
    return out


def render_versions(rows: list[dict[str, Any]], currency: str) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    def num(x: float | None, digits: int) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    lines = [
        "",
        f"{'version':<9} {'decisions':>9} {'automated':>9} {'escalated':>9} {'acc(corr)':>9} {'n corr':>6} "
        f"{currency + '/1k':>10}  lineage",
    ]
    for r in rows:
        lin = r["lineage"]
        parent = lin.get("parent_version")
        origin = f"{lin.get('stage') or '-'}; parent {parent or '-'}; {lin.get('corrections', 0)} corrections"
        mark = "*" if r["serving"] else " "
        lines.append(
            f"{mark}{r['version']:<8} {r['decisions']:>9} {pct(r['automation_rate']):>9} "
            f"{pct(r['escalation_rate']):>9} {pct(r['accuracy_on_corrected']):>9} {r['corrected']:>6} "
            f"{num(r[f'price_per_{PER}'], 6):>10}  {origin}"
        )
    shadowed = [r for r in rows if r["shadow"]]
    if shadowed:
        header = f"{'shadow':<9} {'texts':>9} {'agree':>9} {'coverage':>9} {'acc(corr)':>9} {'n corr':>6} "
        lines += ["", header + f"{'core-s/1k':>10}"]
        for r in shadowed:
            s = r["shadow"]
            lines.append(
                f" {r['version']:<8} {s['texts']:>9} {pct(s['agreement']):>9} {pct(s['coverage']):>9} "
                f"{pct(s['accuracy_on_corrected']):>9} {s['corrected']:>6} "
                f"{num(s[f'core_seconds_per_{PER}'], 3):>10}"
            )
    lines.append("* serving now; shadow compute is counted apart from the decisions'")
    return "\n".join(lines)
