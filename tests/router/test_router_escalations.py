"""The escalation store: durable across a restart, WAL mode, documented schema, migrations."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import threading
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from appliance.errors import FailedPrecondition, NotFound
from appliance.router import escalations as esc
from appliance.router.cascade import Cascade, ModelRef
from appliance.router.cost import CostModel
from appliance.router.escalations import DecisionRecord, EscalationRecord, EscalationStore
from appliance.router.metrics import RouterMetrics
from appliance.types import Cost, Policy, SpecialistAnswer

DOCUMENTED_ESCALATION_COLUMNS = {
    "id", "created_at", "created_epoch", "model", "model_version", "text_sha256", "text",
    "specialist_top", "specialist_confidence", "threshold", "generalist_label", "generalist_confidence",
    "final_label", "route", "policy", "cost_core_seconds", "cost_accelerator_seconds", "price", "request_id",
}  # fmt: skip


def escalation(
    text: str = "where is my card?", epoch: float | None = None, model: str = "bank"
) -> EscalationRecord:
    return EscalationRecord(
        model=model,
        model_version=3,
        text=text,
        specialist_top=[("card_arrival", 0.41), ("card_linking", 0.3)],
        specialist_confidence=0.41,
        threshold=0.8,
        generalist_label="card_arrival",
        generalist_confidence=0.9,
        final_label="card_arrival",
        route="generalist",
        policy="cascade",
        cost=Cost(core_seconds=1.5, accelerator_seconds=0.0, price=0.0002, currency="USD"),
        request_id="req-1",
        generalist_prompt_tokens=40,
        generalist_completion_tokens=3,
        created_epoch=epoch,
    )


def columns(db: Path, table: str) -> set[str]:
    with closing(sqlite3.connect(db)) as conn:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def test_a_record_survives_closing_and_reopening_the_store(tmp_path: Path) -> None:
    db = tmp_path / "state" / "escalations.db"
    store = EscalationStore(db)
    record = escalation()
    assert store.record_escalation(record) == record.id
    store.close()

    reopened = EscalationStore(db)
    [got] = list(reopened.iter_escalations())
    reopened.close()
    assert got.id == record.id
    assert got.specialist_top == [("card_arrival", 0.41), ("card_linking", 0.3)]
    assert (got.generalist_label, got.final_label, got.policy) == ("card_arrival", "card_arrival", "cascade")
    assert got.cost == record.cost
    assert got.text is None  # texts are not kept unless asked for
    assert got.created_at.endswith("Z")


def test_the_sha256_is_of_the_utf8_text_and_the_text_is_kept_only_when_asked(tmp_path: Path) -> None:
    with EscalationStore(tmp_path / "kept.db", store_texts=True) as store:
        store.record_escalation(escalation("carte bloquée"))
        [got] = list(store.iter_escalations())
    assert got.text == "carte bloquée"
    assert got.text_sha256 == hashlib.sha256("carte bloquée".encode()).hexdigest()


def test_the_record_is_on_disk_before_record_returns_seen_by_a_separate_connection(tmp_path: Path) -> None:
    db = tmp_path / "e.db"
    with EscalationStore(db) as store:
        record_id = store.record_escalation(escalation())
        # Another connection (as another process would) sees the committed row right away.
        with closing(sqlite3.connect(db)) as other:
            assert other.execute("SELECT id FROM escalations").fetchall() == [(record_id,)]


def test_wal_mode_and_full_sync_are_on(tmp_path: Path) -> None:
    db = tmp_path / "e.db"
    with EscalationStore(db) as store:
        assert store._writer(durable=True).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._writer(durable=True).execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert store._writer(durable=False).execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    with closing(sqlite3.connect(db)) as conn:  # WAL is a property of the file, not just of our connection
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_the_schema_has_the_documented_tables_and_columns(tmp_path: Path) -> None:
    db = tmp_path / "e.db"
    EscalationStore(db).close()
    assert columns(db, "escalations") >= DOCUMENTED_ESCALATION_COLUMNS
    assert {"escalation_id", "corrected_label", "source", "created_at"} <= columns(db, "corrections")
    assert {"created_epoch", "model", "route", "cost_core_seconds", "price", "latency_ms"} <= columns(
        db, "decisions"
    )
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == esc.SCHEMA_VERSION
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'escalations'").fetchone()[0]
    assert "NULL unless store_texts" in sql  # the comments document the columns in the file itself


def test_corrections_attach_to_an_existing_escalation_only(tmp_path: Path) -> None:
    with EscalationStore(tmp_path / "e.db") as store:
        record_id = store.record_escalation(escalation())
        store.add_correction(record_id, "card_linking", "human:alice")
        assert [c[:2] for c in store.corrections(record_id)] == [("card_linking", "human:alice")]
        with pytest.raises(NotFound, match="no escalation with id 'nope'"):
            store.add_correction("nope", "card_linking", "human:alice")


def test_escalations_are_filtered_by_window_and_model(tmp_path: Path) -> None:
    t0 = datetime(2025, 3, 1, tzinfo=UTC).timestamp()
    with EscalationStore(tmp_path / "e.db") as store:
        for hour, model in [(0, "bank"), (1, "bank"), (2, "other"), (3, "bank")]:
            store.record_escalation(escalation(f"text {hour}", epoch=t0 + 3600 * hour, model=model))
        since = datetime(2025, 3, 1, 1, tzinfo=UTC)
        got = list(store.iter_escalations(since=since, until=t0 + 3 * 3600, model="bank"))
        assert [g.created_epoch for g in got] == [t0 + 3600]
        assert len(list(store.iter_escalations(model="bank"))) == 3
        assert len(list(store.iter_escalations(since=t0 + 2 * 3600))) == 2


def test_decisions_are_written_in_one_batch_with_the_escalations(tmp_path: Path) -> None:
    db = tmp_path / "e.db"
    rec = escalation()
    cost = Cost(core_seconds=0.01, price=0.000001)
    rows = [
        DecisionRecord("bank", 3, "specialist", "cascade", cost, 2.0, "req-1"),
        DecisionRecord("bank", 3, "generalist", "cascade", rec.cost, 50.0, "req-1", escalation_id=rec.id),
    ]
    with EscalationStore(db) as store:
        assert store.record([rec], rows) == [rec.id]
        store.record_decisions(
            [DecisionRecord("bank", 3, "specialist", "cascade", cost, 1.0, "req-2", fallback=True)]
        )
    with closing(sqlite3.connect(db)) as conn:
        got = conn.execute(
            "SELECT route, fallback, escalation_id, request_id FROM decisions ORDER BY id"
        ).fetchall()
    assert got == [
        ("specialist", 0, None, "req-1"),
        ("generalist", 0, rec.id, "req-1"),
        ("specialist", 1, None, "req-2"),
    ]


def test_writes_from_many_threads_all_land(tmp_path: Path) -> None:
    with EscalationStore(tmp_path / "e.db") as store:

        def write(k: int) -> None:
            for j in range(5):
                store.record_escalation(escalation(f"thread {k} text {j}"))

        threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(list(store.iter_escalations())) == 20


def test_a_migration_hook_upgrades_an_old_database_in_order(tmp_path: Path) -> None:
    db = tmp_path / "e.db"
    EscalationStore(db).close()
    migrations = {
        esc.SCHEMA_VERSION: "ALTER TABLE escalations ADD COLUMN reviewer TEXT;",
        esc.SCHEMA_VERSION + 1: "CREATE TABLE review_queue (escalation_id TEXT);",
    }
    conn = sqlite3.connect(db, isolation_level=None)
    assert esc.migrate(conn, migrations, target=esc.SCHEMA_VERSION + 2) == esc.SCHEMA_VERSION + 2
    assert esc.user_version(conn) == esc.SCHEMA_VERSION + 2
    conn.close()
    assert "reviewer" in columns(db, "escalations")
    assert columns(db, "review_queue") == {"escalation_id"}


def test_a_missing_migration_or_a_newer_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "e.db"
    EscalationStore(db).close()
    conn = sqlite3.connect(db, isolation_level=None)
    with pytest.raises(
        FailedPrecondition,
        match=f"no migration from escalation schema version {esc.SCHEMA_VERSION} to {esc.SCHEMA_VERSION + 1}",
    ):
        esc.migrate(conn, {}, target=esc.SCHEMA_VERSION + 1)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(FailedPrecondition, match="version 99, newer than this appliance"):
        EscalationStore(db)


# ----------------------------------------------------------------------------- a damaged database


def test_a_damaged_database_makes_a_lenient_store_unusable_until_it_is_fixed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "e.db"
    db.write_bytes(b"this is not an SQLite database" * 100)
    with pytest.raises(sqlite3.DatabaseError):
        EscalationStore(db)  # strict, as the CLI and tests open it
    monkeypatch.setattr(esc, "REOPEN_INTERVAL_S", 0.0)
    store = EscalationStore(db, strict=False)
    assert store.problem is not None and store.problem.startswith("escalation store unusable: ")
    with pytest.raises(FailedPrecondition, match=r"escalation store unusable: .*not a database"):
        store.record_escalation(escalation())
    cost = Cost(core_seconds=0.1)
    with pytest.raises(FailedPrecondition):
        store.record_decisions([DecisionRecord("bank", 3, "specialist", "cascade", cost, 1.0, "r")])
    db.unlink()  # the operator moves the damaged file away
    assert store.problem is None
    rec = escalation()
    assert store.record_escalation(rec) == rec.id
    store.close()


def test_decision_rows_the_store_refuses_are_dropped_without_failing_the_cascade(tmp_path: Path) -> None:
    db = tmp_path / "e.db"
    db.write_bytes(b"garbage" * 1000)
    store = EscalationStore(db, strict=False)
    cascade = Cascade(None, store, CostModel(cores=2), RouterMetrics(CollectorRegistry()))
    ref = ModelRef(name="bank", version=1, labels=["a", "b"], threshold=0.5)
    answer = SpecialistAnswer(
        top=[("a", 0.9)], probs=None, truncated=False, core_seconds=0.01, latency_ms=1.0
    )

    async def run() -> None:
        decisions = await cascade.decide(ref, [answer], Policy.SPECIALIST_ONLY, texts=["x"])
        assert decisions[0].label == "a"
        await cascade.close()  # flushes the rows the store refuses: logged, not raised

    asyncio.run(run())
    store.close()
