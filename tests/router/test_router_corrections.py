"""Corrections in the escalation store: by escalation id or request id, idempotent, and the upgrade of a
schema-1 database in place."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from appliance.errors import InvalidArgument, NotFound
from appliance.router import escalations as esc
from appliance.router.escalations import (
    CorrectedSpan,
    CorrectionRequest,
    DecisionRecord,
    EscalationRecord,
    EscalationStore,
)
from appliance.types import Cost

V1_SCHEMA = Path(__file__).parent / "data" / "escalations_v1.sql"
COST = Cost(core_seconds=0.01, price=0.000001)


def escalation(request_id: str = "req-1", text: str = "where is my card?") -> EscalationRecord:
    return EscalationRecord(
        model="bank",
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
        cost=COST,
        request_id=request_id,
    )


def decision(
    request_id: str, item: int, label: str = "balance", escalation_id: str = "", **kw: object
) -> DecisionRecord:
    route = "generalist" if escalation_id else "specialist"
    return DecisionRecord(
        "bank", 3, route, "cascade", COST, 1.0, request_id, escalation_id=escalation_id, item=item,
        label=label, confidence=0.95, margin=0.9, text=f"text {item} of {request_id}", **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_a_specialist_decision_is_corrected_by_request_id_and_position(tmp_path: Path) -> None:
    with EscalationStore(tmp_path / "e.db", store_texts=True) as store:
        store.record_decisions([decision("req-9", 0), decision("req-9", 1, label="refund")])
        cid, new = store.correct(
            CorrectionRequest(source="human:alice", request_id="req-9", item=1, label="card_arrival")
        )
        assert new
        [got] = list(store.iter_corrections(model="bank"))
    assert (got.id, got.label, got.served_label, got.route) == (cid, "card_arrival", "refund", "specialist")
    assert got.text == "text 1 of req-9" and got.escalation_id is None and got.spans is None
    assert got.request_id == "req-9" and got.model_version == 3


def test_without_store_texts_the_correction_is_kept_but_has_no_text(tmp_path: Path) -> None:
    with EscalationStore(tmp_path / "e.db") as store:
        store.record_decisions([decision("r", 0)])
        store.correct(CorrectionRequest(source="human:bob", request_id="r", label="refund"))
        assert store.resolve(CorrectionRequest(source="x", request_id="r")).has_text is False
        [got] = list(store.iter_corrections())
    assert got.text is None and got.label == "refund"
    with closing(sqlite3.connect(tmp_path / "e.db")) as conn:
        assert conn.execute("SELECT text, text_sha256 IS NOT NULL FROM decisions").fetchall() == [(None, 1)]


def test_an_escalated_decision_is_one_target_by_either_id_and_a_duplicate_is_the_same_row(
    tmp_path: Path,
) -> None:
    rec = escalation()
    with EscalationStore(tmp_path / "e.db", store_texts=True) as store:
        store.record([rec], [decision("req-1", 0, label="card_arrival", escalation_id=rec.id)])
        first = store.correct(CorrectionRequest(source="human:a", escalation_id=rec.id, label="lost_card"))
        again = store.correct(CorrectionRequest(source="human:a", request_id="req-1", label="lost_card"))
        other = store.correct(CorrectionRequest(source="human:b", escalation_id=rec.id, label="stolen"))
        got = list(store.iter_corrections())
    assert first == (first[0], True) and again == (first[0], False) and other[1]
    assert len(got) == 2 and {c.target for c in got} == {f"escalation:{rec.id}"}
    assert got[0].text == "where is my card?" and got[0].served_label == "card_arrival"


def test_spans_are_stored_in_order_and_read_back(tmp_path: Path) -> None:
    with EscalationStore(tmp_path / "e.db") as store:
        store.record_decisions([decision("r", 0)])
        spans = (CorrectedSpan("time", 10, 14), CorrectedSpan("people", 0, 3))
        store.correct(CorrectionRequest(source="review-queue", request_id="r", spans=spans))
        [got] = list(store.iter_corrections())
    assert got.label is None and got.spans == tuple(sorted(spans, key=lambda s: s.start))


def test_bad_corrections_are_refused_with_the_reason(tmp_path: Path) -> None:
    with EscalationStore(tmp_path / "e.db") as store:
        store.record_decisions([decision("r", 0)])
        with pytest.raises(NotFound, match="no escalation with id 'nope'"):
            store.correct(CorrectionRequest(source="h", escalation_id="nope", label="x"))
        with pytest.raises(NotFound, match="no decision for text 4 of request 'r'"):
            store.correct(CorrectionRequest(source="h", request_id="r", item=4, label="x"))
        with pytest.raises(InvalidArgument, match="either the right label or the right spans"):
            store.correct(CorrectionRequest(source="h", request_id="r"))
        with pytest.raises(InvalidArgument, match="needs a source"):
            store.correct(CorrectionRequest(source="", request_id="r", label="x"))
        with pytest.raises(InvalidArgument, match="0 <= start < end"):
            store.correct(CorrectionRequest(source="h", request_id="r", spans=(CorrectedSpan("a", 5, 5),)))
        assert list(store.iter_corrections()) == []


def test_a_schema_1_database_is_upgraded_in_place_keeping_its_rows(tmp_path: Path) -> None:
    db = tmp_path / "e.db"
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.executescript(V1_SCHEMA.read_text() + "\nPRAGMA user_version = 1;")
        conn.execute(
            "INSERT INTO escalations VALUES ('e1', '2025-01-01T00:00:00Z', 1735689600, 'bank', 2, 'ab',"
            " 'hi', '[[\"a\", 0.4]]', 0.4, 0.8, 'a', 0.9, 10, 2, 'a', 'generalist', 'cascade', 1, 0, 0.1,"
            " 'USD', 'r1')"
        )
        conn.execute(
            "INSERT INTO decisions (created_epoch, model, model_version, route, policy, fallback,"
            " escalation_id, cost_core_seconds, cost_accelerator_seconds, price, currency, latency_ms,"
            " request_id)"
            " VALUES (1735689600, 'bank', 2, 'generalist', 'cascade', 0, 'e1', 1, 0, 0.1, 'USD', 40, 'r1')"
        )
        conn.execute(
            "INSERT INTO corrections (escalation_id, corrected_label, source, created_at, created_epoch)"
            " VALUES ('e1', 'b', 'human:old', '2025-01-02T00:00:00Z', 1735776000)"
        )
    with EscalationStore(db, store_texts=True) as store:
        [old] = list(store.iter_corrections())
        [kept] = list(store.iter_escalations())
        store.correct(CorrectionRequest(source="human:new", escalation_id="e1", label="c"))
        assert [c.label for c in store.iter_corrections(since=1735776000)] == ["b", "c"]
    assert (old.label, old.source, old.model, old.model_version, old.text) == (
        "b",
        "human:old",
        "bank",
        2,
        "hi",
    )
    assert old.decision_id == 1 and old.request_id == "r1" and old.served_label == "a"
    assert kept.kind is None and kept.specialist_spans is None  # rows from v1 say nothing of their kind
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == esc.SCHEMA_VERSION == 2
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert {"corrections_by_decision", "decisions_by_request"} <= names and "corrections_v2" not in names


def test_escalations_keep_their_kind_and_spans(tmp_path: Path) -> None:
    spans = '[{"label": "time", "start": 0, "end": 4}]'
    rec = EscalationRecord(**{**escalation().__dict__, "kind": "extract", "specialist_spans": spans})
    with EscalationStore(tmp_path / "e.db") as store:
        store.record_escalation(rec)
        [got] = list(store.iter_escalations())
    assert (got.kind, got.specialist_spans, got.generalist_spans) == ("extract", spans, None)
