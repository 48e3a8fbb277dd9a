"""The workflow runs table: one row per call and one per step per text, for ``appliance report``.

``$APPLIANCE_HOME/workflow-runs/runs.db`` (SQLite, WAL, private). A run is one text through the
workflow; a call of n texts is n runs. Accuracy is measured where corrections exist: a classify
step's answer is matched to the escalation store's ``corrections`` by its escalation id, or by its
request id, position in the step's call and model (the ``decisions`` rows).
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config import appliance_home
from appliance.files import create_private_file
from appliance.workflows.runner import RunResult

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id            TEXT PRIMARY KEY,
    workflow      TEXT NOT NULL,
    version       INTEGER NOT NULL,    -- 0 when the call failed before a version was chosen
    request_id    TEXT NOT NULL,
    created_epoch REAL NOT NULL,
    texts         INTEGER NOT NULL,    -- runs in this call
    code          TEXT NOT NULL,       -- OK or the gRPC status of a failed call
    failed_step   TEXT,                -- the step a failed run names
    price         REAL NOT NULL,
    currency      TEXT NOT NULL,
    latency_ms    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_workflow_time ON runs (workflow, created_epoch);
CREATE TABLE IF NOT EXISTS run_steps (
    run_id        TEXT NOT NULL REFERENCES runs (id),
    text_index    INTEGER NOT NULL,
    step          TEXT NOT NULL,
    kind          TEXT NOT NULL,
    status        TEXT NOT NULL,       -- ok | skipped | failed | fallback
    model         TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    route         TEXT NOT NULL,       -- specialist | generalist | '' (branch, skipped)
    label         TEXT,                -- a classify step's answer
    item          INTEGER NOT NULL,    -- the text's position in the step's backend call
    escalation_id TEXT NOT NULL,
    price         REAL NOT NULL,
    latency_ms    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS run_steps_by_run ON run_steps (run_id);
"""


def default_db() -> Path:
    return appliance_home() / "workflow-runs" / "runs.db"  # RunLog makes the folder, privately


class RunLog:
    """Appends runs; thread-safe, one connection per process."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_db()
        create_private_file(self.path)
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(SCHEMA)
        self._lock = threading.Lock()

    def record(self, result: RunResult) -> str:
        run_id = uuid.uuid4().hex
        total = result.total_cost
        rows = [
            (
                run_id,
                i,
                r.step,
                r.kind,
                r.status,
                r.model,
                r.version,
                r.route.value if r.route is not None else "",
                (r.output or {}).get("label") if r.kind == "classify" else None,
                r.item,
                r.escalation_id,
                r.cost.price,
                r.latency_ms,
            )
            for i, run in enumerate(result.runs)
            for r in run.receipts
        ]
        with self._lock:
            self._conn.execute("BEGIN")
            self._conn.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, 'OK', NULL, ?, ?, ?)",
                (
                    run_id,
                    result.workflow,
                    result.version,
                    result.request_id,
                    time.time(),
                    len(result.runs),
                    total.price,
                    total.currency,
                    result.latency_ms,
                ),
            )
            self._conn.executemany(
                "INSERT INTO run_steps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows
            )
            self._conn.execute("COMMIT")
        return run_id

    def record_failure(
        self,
        workflow: str,
        version: int,
        request_id: str,
        texts: int,
        code: str,
        step: str | None,
        latency_ms: float,
    ) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, '', ?)",
                (uuid.uuid4().hex, workflow, version, request_id, time.time(), texts, code, step, latency_ms),
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()


# ------------------------------------------------------------------------------ the report


@dataclass
class StepSummary:
    kind: str
    statuses: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    routes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    corrected: int = 0
    correct: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "statuses": dict(self.statuses),
            "routes": dict(self.routes),
            "corrected": self.corrected,
            "accuracy": self.correct / self.corrected if self.corrected else None,
        }


def summarize(
    path: Path, since: float, until: float, corrections_db: Path | None = None
) -> list[dict[str, Any]]:
    """Per workflow: calls, runs, failed runs, cost per 1,000 runs, per-step statuses and routes,
    and accuracy on the classify answers that were corrected."""
    if not path.is_file():
        return []
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        corrections = _corrections(corrections_db)
        out: dict[str, dict[str, Any]] = {}
        for workflow, calls, runs, failed, price, currency in conn.execute(
            "SELECT workflow, COUNT(*), SUM(texts), SUM(CASE WHEN code = 'OK' THEN 0 ELSE texts END),"
            " SUM(price), MAX(currency) FROM runs WHERE created_epoch >= ? AND created_epoch < ?"
            " GROUP BY workflow ORDER BY workflow",
            (since, until),
        ):
            answered = runs - failed
            out[workflow] = {
                "workflow": workflow,
                "calls": calls,
                "runs": runs,
                "failed_runs": failed,
                "currency": currency or "",
                "price_per_1000_runs": 1000.0 * price / answered if answered else None,
                "steps": {},
            }
        steps: dict[tuple[str, str], StepSummary] = {}
        query = (
            "SELECT r.workflow, r.request_id, s.step, s.kind, s.status, s.route, s.model, s.label, s.item,"
            " s.escalation_id FROM run_steps AS s JOIN runs AS r ON r.id = s.run_id"
            " WHERE r.created_epoch >= ? AND r.created_epoch < ?"
        )
        for workflow, request_id, step, kind, status, route, model, label, item, escalation in conn.execute(
            query, (since, until)
        ):
            summary = steps.setdefault((workflow, step), StepSummary(kind))
            summary.statuses[status] += 1
            if route:
                summary.routes[route] += 1
            right = corrections.get(("e", escalation)) if escalation else None
            right = right or corrections.get(("d", request_id, item, model))
            if label is not None and right is not None:
                summary.corrected += 1
                summary.correct += int(label == right)
        for (workflow, step), summary in steps.items():
            if workflow in out:
                out[workflow]["steps"][step] = summary.as_dict()
        return list(out.values())
    finally:
        conn.close()


def _corrections(path: Path | None) -> dict[tuple[Any, ...], str]:
    """Corrected labels by escalation id and by (request id, item, model); {} without a store."""
    if path is None or not path.is_file():
        return {}
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    out: dict[tuple[Any, ...], str] = {}
    try:
        for escalation, label in conn.execute(
            "SELECT escalation_id, corrected_label FROM corrections"
            " WHERE escalation_id IS NOT NULL AND corrected_label IS NOT NULL ORDER BY id"
        ):
            out[("e", escalation)] = label
        try:
            rows = conn.execute(
                "SELECT d.request_id, d.item, c.model, c.corrected_label FROM corrections AS c"
                " JOIN decisions AS d ON d.id = c.decision_id"
                " WHERE c.corrected_label IS NOT NULL ORDER BY c.id"
            ).fetchall()
        except sqlite3.OperationalError:  # a store from before decisions were recorded
            rows = []
        for request_id, item, model, label in rows:
            out[("d", request_id, item, model)] = label
    except sqlite3.DatabaseError:
        return {}
    finally:
        conn.close()
    return out


def render(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "workflows   no runs in the window"
    lines = ["workflows"]
    for row in rows:
        per = row["price_per_1000_runs"]
        cost = f"{per:.6f} {row['currency']}" if per is not None else "-"
        lines.append(
            f"  {row['workflow']:<24} runs {row['runs']:>7}  failed {row['failed_runs']:>5}  "
            f"per 1,000 runs {cost}"
        )
        for step, s in row["steps"].items():
            routes = ", ".join(f"{k} {v}" for k, v in sorted(s["routes"].items())) or "-"
            statuses = ", ".join(f"{k} {v}" for k, v in sorted(s["statuses"].items()))
            accuracy = (
                f"  accuracy {s['accuracy']:.3f} on {s['corrected']} corrected" if s["corrected"] else ""
            )
            lines.append(f"    {step:<20} {s['kind']:<9} {statuses:<28} routes: {routes}{accuracy}")
    return "\n".join(lines)
