"""The escalation store: every text the generalist answered, and one row per decision.

An embedded SQLite database in WAL mode. Escalation records are the raw material of the
retraining loop (the specialist's view, the generalist's answer, later a human correction), so a
record is on disk before the response that names its id is sent: escalation commits run with
``synchronous=FULL``, which fsyncs the write-ahead log at every commit.

Decision rows feed ``appliance report`` (automation rate, cost per route). They are written in
batches, one transaction per request, through a second connection with ``synchronous=NORMAL``:
such a commit survives a crash of the process but may be lost with the last moments before a power
failure. A decision batch committed with escalations shares their durable transaction.

The store is thread-safe (one lock around its two write connections; reads open their own), and
async code calls it through ``asyncio.to_thread``.

Faults of the database become the caller's status, and never stop the server. The server opens
its store with ``strict=False``: a file that is not a usable escalation database (corrupt, a newer
schema, unreadable) leaves the store *unusable*, every write refused with FAILED_PRECONDITION
"escalation store unusable: ..." (reopening is tried again every few seconds), while the answers
that need no record keep being served. A full disk is RESOURCE_EXHAUSTED: the status gRPC defines
for "the entire file system is out of space", where UNAVAILABLE would tell clients to retry what
only an operator can fix. A failed write is rolled back whole, so what was acknowledged stays and
nothing half-written does; once space is freed, writes succeed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from appliance.errors import (
    ApplianceError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from appliance.files import create_private_file, make_private_dir
from appliance.types import Cost

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
REOPEN_INTERVAL_S = 5.0  # how often an unusable store tries to open its database again

# Corrected labels (or spans) for decisions, from people, the review queue or a stronger model: the
# retraining input. Shared by SCHEMA and the 1 -> 2 migration, which rebuilds the v1 table.
CORRECTIONS_TABLE = """
CREATE TABLE IF NOT EXISTS {table} (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    escalation_id     TEXT REFERENCES escalations (id),  -- the escalation corrected, or NULL
    decision_id       INTEGER,           -- decisions.id of the decision corrected, when known
    request_id        TEXT NOT NULL,     -- the request that carried the text
    model             TEXT NOT NULL,     -- the specialist whose decision is corrected
    model_version     INTEGER NOT NULL,
    corrected_label   TEXT,              -- the right label; NULL for a correction of spans
    corrected_spans   TEXT,              -- JSON [{{label, start, end}}]; NULL for a label
    source            TEXT NOT NULL,     -- who corrected: 'human:alice', 'review-queue', a model name
    created_at        TEXT NOT NULL,     -- UTC, ISO 8601
    created_epoch     REAL NOT NULL
);
"""
CORRECTIONS_INDEXES = """
CREATE INDEX IF NOT EXISTS corrections_by_escalation ON corrections (escalation_id);
CREATE INDEX IF NOT EXISTS corrections_by_decision ON corrections (decision_id);
CREATE INDEX IF NOT EXISTS corrections_by_model_time ON corrections (model, created_epoch);
"""

# The schema as it stands at SCHEMA_VERSION. SQLite keeps these comments in sqlite_master, so the
# database documents itself. Times are stored twice: ISO 8601 UTC text for people, epoch seconds
# for range queries.
SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS escalations (
    id                         TEXT PRIMARY KEY,  -- uuid4, hex; the Decision's escalation_id
    created_at                 TEXT NOT NULL,     -- UTC, ISO 8601 with microseconds
    created_epoch              REAL NOT NULL,     -- the same instant, seconds since the epoch
    model                      TEXT NOT NULL,     -- specialist name
    model_version              INTEGER NOT NULL,  -- specialist version that saw the text
    text_sha256                TEXT NOT NULL,     -- hex sha256 of the UTF-8 text, always kept
    text                       TEXT,              -- the text itself; NULL unless store_texts
    specialist_top             TEXT NOT NULL,     -- JSON [[label, score], ...], best first
    specialist_confidence      REAL NOT NULL,     -- the specialist's top-1 score
    threshold                  REAL NOT NULL,     -- the model's cascade threshold at the time
    generalist_label           TEXT NOT NULL,     -- the generalist's answer
    generalist_confidence      REAL NOT NULL,     -- its probability under the label constraint
    generalist_prompt_tokens   INTEGER NOT NULL,
    generalist_completion_tokens INTEGER NOT NULL,
    final_label                TEXT NOT NULL,     -- the label returned to the caller
    route                      TEXT NOT NULL,     -- the route that answered: 'generalist'
    policy                     TEXT NOT NULL,     -- 'cascade' (below threshold) | 'generalist_only'
    cost_core_seconds          REAL NOT NULL,     -- specialist + generalist, both were spent
    cost_accelerator_seconds   REAL NOT NULL,
    price                      REAL NOT NULL,     -- in `currency`, at the box's hourly price
    currency                   TEXT NOT NULL,
    request_id                 TEXT NOT NULL,     -- the request that carried the text
    kind                       TEXT,              -- 'classify' | 'extract'; NULL in rows from v1
    specialist_spans           TEXT,              -- extract: JSON [{label, start, end, ...}]
    generalist_spans           TEXT               -- extract: the generalist's spans, same JSON
);
CREATE INDEX IF NOT EXISTS escalations_by_time ON escalations (created_epoch);
CREATE INDEX IF NOT EXISTS escalations_by_model_time ON escalations (model, created_epoch);

-- One row per decision, on every route: what `appliance report` reads, and what a correction of a
-- specialist answer names (the request id and the text's position in it).
CREATE TABLE IF NOT EXISTS decisions (
    id                        INTEGER PRIMARY KEY,
    created_epoch             REAL NOT NULL,     -- seconds since the epoch, UTC
    model                     TEXT NOT NULL,
    model_version             INTEGER NOT NULL,
    route                     TEXT NOT NULL,     -- 'specialist' | 'generalist'
    policy                    TEXT NOT NULL,     -- the effective policy
    fallback                  INTEGER NOT NULL,  -- 1: the generalist was needed but absent
    escalation_id             TEXT,              -- escalations.id for generalist answers
    cost_core_seconds         REAL NOT NULL,
    cost_accelerator_seconds  REAL NOT NULL,
    price                     REAL NOT NULL,
    currency                  TEXT NOT NULL,
    latency_ms                REAL NOT NULL,
    request_id                TEXT NOT NULL,
    item                      INTEGER,           -- the text's position in its request; NULL from v1
    label                     TEXT,              -- the label returned to the caller; NULL from v1
    confidence                REAL,              -- its confidence
    margin                    REAL,              -- specialist's top-1 minus top-2 score
    text_sha256               TEXT,              -- hex sha256 of the UTF-8 text
    text                      TEXT               -- the text; NULL unless store_texts
);
CREATE INDEX IF NOT EXISTS decisions_by_time ON decisions (created_epoch);
CREATE INDEX IF NOT EXISTS decisions_by_request ON decisions (request_id, item);
"""
    + CORRECTIONS_TABLE.format(table="corrections")
    + CORRECTIONS_INDEXES
)

# Upgrades, keyed by the version they start from: MIGRATIONS[n] takes a database from n to n+1.
# Each runs in one transaction together with the version bump.
MIGRATIONS: dict[int, str] = {
    # 2: corrections name a decision by request id as well as by escalation id, and may carry spans;
    # decisions keep what correcting a specialist answer needs; escalations say what kind of call.
    1: """
ALTER TABLE escalations ADD COLUMN kind TEXT;
ALTER TABLE escalations ADD COLUMN specialist_spans TEXT;
ALTER TABLE escalations ADD COLUMN generalist_spans TEXT;
ALTER TABLE decisions ADD COLUMN item INTEGER;
ALTER TABLE decisions ADD COLUMN label TEXT;
ALTER TABLE decisions ADD COLUMN confidence REAL;
ALTER TABLE decisions ADD COLUMN margin REAL;
ALTER TABLE decisions ADD COLUMN text_sha256 TEXT;
ALTER TABLE decisions ADD COLUMN text TEXT;
CREATE INDEX IF NOT EXISTS decisions_by_request ON decisions (request_id, item);
"""
    + CORRECTIONS_TABLE.format(table="corrections_v2")
    + """
INSERT INTO corrections_v2 (id, escalation_id, decision_id, request_id, model, model_version,
                            corrected_label, source, created_at, created_epoch)
SELECT c.id, c.escalation_id,
       (SELECT MIN(d.id) FROM decisions AS d WHERE d.escalation_id = c.escalation_id),
       e.request_id, e.model, e.model_version, c.corrected_label, c.source, c.created_at, c.created_epoch
FROM corrections AS c JOIN escalations AS e ON e.id = c.escalation_id;
DROP TABLE corrections;
ALTER TABLE corrections_v2 RENAME TO corrections;
"""
    + CORRECTIONS_INDEXES,
}

ESCALATION_COLUMNS = (
    "id", "created_at", "created_epoch", "model", "model_version", "text_sha256", "text",
    "specialist_top", "specialist_confidence", "threshold", "generalist_label",
    "generalist_confidence", "generalist_prompt_tokens", "generalist_completion_tokens",
    "final_label", "route", "policy", "cost_core_seconds", "cost_accelerator_seconds", "price",
    "currency", "request_id", "kind", "specialist_spans", "generalist_spans",
)  # fmt: skip
DECISION_COLUMNS = (
    "created_epoch", "model", "model_version", "route", "policy", "fallback", "escalation_id",
    "cost_core_seconds", "cost_accelerator_seconds", "price", "currency", "latency_ms", "request_id",
    "item", "label", "confidence", "margin", "text_sha256", "text",
)  # fmt: skip


def database_path(home: Path) -> Path:
    """Where the escalation database of the appliance at ``home`` lives."""
    return Path(home) / "escalations" / "escalations.db"


def _new_id() -> str:
    return uuid.uuid4().hex


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _epoch(when: datetime | float | None) -> float | None:
    if when is None or isinstance(when, int | float):
        return when
    if when.tzinfo is None:
        raise InvalidArgument(f"{when.isoformat()} has no time zone; give times in UTC (e.g. ...Z)")
    return when.timestamp()


@dataclass(frozen=True)
class EscalationRecord:
    """One text the generalist answered, as the cascade hands it to the store."""

    model: str
    model_version: int
    text: str
    specialist_top: list[tuple[str, float]]
    specialist_confidence: float
    threshold: float
    generalist_label: str
    generalist_confidence: float
    final_label: str
    route: str
    policy: str
    cost: Cost
    request_id: str
    generalist_prompt_tokens: int = 0
    generalist_completion_tokens: int = 0
    id: str = field(default_factory=_new_id)
    created_epoch: float | None = None  # None: the time of writing
    kind: str = "classify"  # or "extract"
    specialist_spans: str | None = None  # extract: JSON [{label, start, end, ...}]
    generalist_spans: str | None = None


@dataclass(frozen=True)
class DecisionRecord:
    model: str
    model_version: int
    route: str
    policy: str
    cost: Cost
    latency_ms: float
    request_id: str
    fallback: bool = False
    escalation_id: str = ""
    created_epoch: float | None = None  # None: the time of writing
    # What correcting this decision later needs (its text is kept only when store_texts).
    item: int | None = None  # the text's position in its request
    label: str | None = None  # the label the caller got
    confidence: float | None = None
    margin: float | None = None  # the specialist's top-1 minus top-2 score
    text: str | None = None


@dataclass(frozen=True)
class Escalation:
    """An escalation as stored."""

    id: str
    created_at: str
    created_epoch: float
    model: str
    model_version: int
    text_sha256: str
    text: str | None
    specialist_top: list[tuple[str, float]]
    specialist_confidence: float
    threshold: float
    generalist_label: str
    generalist_confidence: float
    generalist_prompt_tokens: int
    generalist_completion_tokens: int
    final_label: str
    route: str
    policy: str
    cost: Cost
    request_id: str
    kind: str | None = None  # None in rows written before schema 2
    specialist_spans: str | None = None
    generalist_spans: str | None = None


@dataclass(frozen=True)
class CorrectedSpan:
    label: str
    start: int  # characters (code points) of the text, end exclusive
    end: int


@dataclass(frozen=True)
class CorrectionRequest:
    """What a caller asks to correct: a decision named by escalation id, or by request id and the
    text's position in that request (``model`` picks among models answering one request), with the
    right label or spans."""

    source: str  # 'human:<name>', 'review-queue', a model name
    escalation_id: str = ""
    request_id: str = ""
    item: int = 0
    model: str = ""
    label: str | None = None
    spans: tuple[CorrectedSpan, ...] | None = None


@dataclass(frozen=True)
class CorrectionTarget:
    """The decision a correction names, as stored."""

    model: str
    model_version: int
    escalation_id: str | None
    decision_id: int | None
    request_id: str
    served_label: str | None
    route: str
    has_text: bool


@dataclass(frozen=True)
class Correction:
    """A correction as stored, joined with the decision it corrects."""

    id: int
    model: str
    model_version: int
    escalation_id: str | None
    request_id: str
    text: str | None  # None unless the text was kept (store_texts): then it cannot train
    label: str | None
    spans: tuple[CorrectedSpan, ...] | None
    source: str
    created_epoch: float
    served_label: str | None  # what the caller got
    route: str
    decision_id: int | None = None

    @property
    def target(self) -> str:
        """One key per corrected decision: a later correction of the same key overrides."""
        return f"escalation:{self.escalation_id}" if self.escalation_id else f"decision:{self.decision_id}"


@dataclass(frozen=True)
class ReviewCandidate:
    """A decision worth a person's look: escalated, or answered by the specialist with a low margin."""

    decision_id: int
    escalation_id: str | None
    request_id: str
    item: int | None
    model: str
    model_version: int
    text: str | None
    text_sha256: str | None
    served_label: str | None
    route: str
    confidence: float | None
    margin: float  # the specialist's top-1 minus top-2 score: lower is less sure
    created_epoch: float


@dataclass(frozen=True)
class RouteTotals:
    decisions: int = 0
    fallbacks: int = 0
    core_seconds: float = 0.0
    accelerator_seconds: float = 0.0
    price: float = 0.0


@dataclass(frozen=True)
class Summary:
    """Decision totals over a window, per route."""

    routes: dict[str, RouteTotals]
    currencies: list[str]

    @property
    def decisions(self) -> int:
        return sum(r.decisions for r in self.routes.values())


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    # Autocommit mode (isolation_level=None): transactions are the explicit BEGIN/COMMITs below.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise FailedPrecondition(
                f"{path}: SQLite refused WAL mode (got {mode!r}); is it on a network share?"
            )
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
    except BaseException:
        conn.close()  # a file that is not a database fails here
        raise
    return conn


def user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, migrations: dict[int, str], target: int = SCHEMA_VERSION) -> int:
    """Bring the database from its ``user_version`` up to ``target``; returns the new version.

    An empty database (version 0) gets :data:`SCHEMA` and jumps straight to ``target``.
    """
    current = user_version(conn)
    if current > target:
        raise FailedPrecondition(
            f"the escalation database is at schema version {current}, newer than this appliance's "
            f"{target}; upgrade the appliance instead of opening it with an older one"
        )
    if current == 0:
        conn.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}\nPRAGMA user_version = {target};\nCOMMIT;")
        return target
    for version in range(current, target):
        script = migrations.get(version)
        if script is None:
            raise FailedPrecondition(
                f"no migration from escalation schema version {version} to {version + 1}"
            )
        conn.executescript(f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {version + 1};\nCOMMIT;")
    return target


class EscalationStore:
    """``strict``: a database that cannot be opened raises here; otherwise the store starts
    unusable (see :attr:`problem`) and keeps trying to open it. :meth:`reader` only reads."""

    def __init__(
        self, path: Path, store_texts: bool = False, *, strict: bool = True, read_only: bool = False
    ) -> None:
        self.path = Path(path)
        self.store_texts = store_texts
        self._lock = threading.Lock()
        self._connections: tuple[sqlite3.Connection, sqlite3.Connection] | None = None
        self._problem: str | None = None
        self._tried = 0.0
        self._read_only = read_only
        if read_only:
            self._problem = f"{self.path} is open for reading only"
        elif strict:
            self._connections = _open_writers(self.path)
        else:
            with self._lock:
                self._reopen()

    @classmethod
    def reader(cls, path: Path) -> EscalationStore:
        """The store at ``path`` for reading only (a server may be writing it): nothing is created
        or upgraded, and every write is refused."""
        return cls(path, strict=False, read_only=True)

    @property
    def problem(self) -> str | None:
        """Why writes are refused ("escalation store unusable: ..."), or None when it is usable.

        Cheap enough for the event loop: it never waits for a write in progress."""
        if self._connections is None and not self._read_only and self._lock.acquire(blocking=False):
            try:
                self._reopen()
            finally:
                self._lock.release()
        return self._problem

    def _reopen(self) -> None:
        """Try to open the database, at most every REOPEN_INTERVAL_S. Caller holds ``_lock``."""
        if time.monotonic() - self._tried < REOPEN_INTERVAL_S and self._problem is not None:
            return
        self._tried = time.monotonic()
        try:
            self._connections = _open_writers(self.path)
        except (sqlite3.Error, OSError, ApplianceError) as exc:
            detail = exc.message if isinstance(exc, ApplianceError) else f"{self.path}: {exc}"
            problem = f"escalation store unusable: {detail}"
            if problem != self._problem:
                log.error("%s; answers that need a record are refused until it is fixed", problem)
            self._problem = problem
            return
        if self._problem is not None:
            log.warning("escalation store %s is usable again", self.path)
        self._problem = None

    def _writer(self, durable: bool) -> sqlite3.Connection:
        """The durable or the relaxed write connection. Caller holds ``_lock``."""
        if self._connections is None and not self._read_only:
            self._reopen()
        if self._connections is None:
            raise FailedPrecondition(self._problem or "escalation store unusable")
        return self._connections[0 if durable else 1]

    def close(self) -> None:
        with self._lock:
            self._close_writers()

    def _close_writers(self) -> None:
        """Close both write connections. Caller holds ``_lock``."""
        if self._connections is not None:
            for conn in reversed(self._connections):
                conn.close()
            self._connections = None

    def __enter__(self) -> EscalationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing

    def record(
        self, escalations: Sequence[EscalationRecord], decisions: Sequence[DecisionRecord]
    ) -> list[str]:
        """Write one request's escalations and decisions in one transaction; returns the ids.

        With escalations, the commit is durable (fsynced) when this returns.
        """
        now = time.time()
        escalation_rows = [self._escalation_row(e, now) for e in escalations]
        decision_rows = [self._decision_row(d, now) for d in decisions]
        if not escalation_rows and not decision_rows:
            return []
        with self._lock:
            conn = self._writer(durable=bool(escalation_rows))
            with self._transaction(conn):
                conn.executemany(_insert("escalations", ESCALATION_COLUMNS), escalation_rows)
                conn.executemany(_insert("decisions", DECISION_COLUMNS), decision_rows)
        return [e.id for e in escalations]

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT; on any failure (COMMIT's own included) roll back whole, and
        turn a database fault into the caller's status."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:  # SQLite may have rolled back already; the next BEGIN tells
                    log.exception("rollback of a failed escalation write failed")
            if isinstance(exc, sqlite3.Error):
                raise self._fault(exc) from exc
            raise

    def record_escalation(self, escalation: EscalationRecord) -> str:
        return self.record([escalation], [])[0]

    def record_decisions(self, decisions: Sequence[DecisionRecord]) -> None:
        self.record([], decisions)

    def add_correction(self, escalation_id: str, corrected_label: str, source: str) -> int:
        return self.correct(
            CorrectionRequest(source=source, escalation_id=escalation_id, label=corrected_label)
        )[0]

    def correct(self, request: CorrectionRequest) -> tuple[int, bool]:
        """Record a correction, durably (fsynced) before this returns: (its id, whether it is new).

        The same correction again (same decision, label, spans and source) is the first one's id,
        not a second row. NotFound when no decision has that escalation or request id.
        """
        if not request.source:
            raise InvalidArgument("a correction needs a source ('human:<name>', 'review-queue' or a model)")
        if (request.label is None) == (request.spans is None):
            raise InvalidArgument("a correction gives either the right label or the right spans")
        if request.label is not None and not request.label.strip():
            raise InvalidArgument("the corrected label is empty")
        spans = _spans_json(request.spans) if request.spans is not None else None
        now = time.time()
        with self._lock:
            conn = self._writer(durable=True)
            with self._transaction(conn):
                target = _resolve(conn, request)
                same = conn.execute(
                    "SELECT id FROM corrections WHERE COALESCE(escalation_id, '') = ?"
                    " AND COALESCE(decision_id, -1) = ? AND corrected_label IS ? AND corrected_spans IS ?"
                    " AND source = ? ORDER BY id LIMIT 1",
                    (
                        target.escalation_id or "",
                        -1 if target.decision_id is None else target.decision_id,
                        request.label,
                        spans,
                        request.source,
                    ),
                ).fetchone()
                if same is not None:
                    return int(same[0]), False
                cursor = conn.execute(
                    "INSERT INTO corrections (escalation_id, decision_id, request_id, model, model_version,"
                    " corrected_label, corrected_spans, source, created_at, created_epoch)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        target.escalation_id, target.decision_id, target.request_id, target.model,
                        target.model_version, request.label, spans, request.source, _iso(now), now,
                    ),
                )  # fmt: skip
        return int(cursor.lastrowid or 0), True

    def resolve(self, request: CorrectionRequest) -> CorrectionTarget:
        """The decision a correction would name (NotFound if none), read without writing."""
        conn = _open_readonly(self.path)
        try:
            return _resolve(conn, request)
        finally:
            conn.close()

    def _fault(self, exc: sqlite3.Error) -> ApplianceError:
        """The status for a failed write: the disk is full, the file is damaged, or it is busy.
        Caller holds ``_lock``."""
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # the primary code of an extended one
        if code == sqlite3.SQLITE_FULL:
            log.error("escalation store %s: the disk is full (%s)", self.path, exc)
            return ResourceExhausted(f"escalation store full: no space left for {self.path.name} ({exc})")
        if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            log.error("escalation store %s is damaged: %s", self.path, exc)
            self._problem = f"escalation store unusable: {self.path}: {exc}"
            self._tried = time.monotonic()
            self._close_writers()  # refused at once from now on; reopened when the file is fixed
            return FailedPrecondition(self._problem)
        log.error("escalation store %s: write failed: %s", self.path, exc)
        return Unavailable(f"escalation store unavailable: {exc}")

    def _escalation_row(self, e: EscalationRecord, now: float) -> tuple[object, ...]:
        epoch = now if e.created_epoch is None else e.created_epoch
        return (
            e.id, _iso(epoch), epoch, e.model, e.model_version, _sha256(e.text),
            e.text if self.store_texts else None,
            json.dumps([[label, float(score)] for label, score in e.specialist_top]),
            e.specialist_confidence, e.threshold, e.generalist_label, e.generalist_confidence,
            e.generalist_prompt_tokens, e.generalist_completion_tokens, e.final_label, e.route,
            e.policy, e.cost.core_seconds, e.cost.accelerator_seconds, e.cost.price, e.cost.currency,
            e.request_id, e.kind, e.specialist_spans, e.generalist_spans,
        )  # fmt: skip

    def _decision_row(self, d: DecisionRecord, now: float) -> tuple[object, ...]:
        digest = _sha256(d.text) if d.text is not None else None
        return (
            now if d.created_epoch is None else d.created_epoch, d.model, d.model_version, d.route,
            d.policy, int(d.fallback), d.escalation_id or None, d.cost.core_seconds,
            d.cost.accelerator_seconds, d.cost.price, d.cost.currency, d.latency_ms, d.request_id,
            d.item, d.label, d.confidence, d.margin, digest, d.text if self.store_texts else None,
        )  # fmt: skip

    # ------------------------------------------------------------------ reading

    def iter_escalations(
        self,
        since: datetime | float | None = None,
        until: datetime | float | None = None,
        model: str | None = None,
    ) -> Iterator[Escalation]:
        """Escalations with ``since <= created < until``, oldest first (a reader of its own)."""
        where, params = _window(since, until, model)
        conn = _open_readonly(self.path)
        try:
            query = (
                f"SELECT {', '.join(ESCALATION_COLUMNS)} FROM escalations{where} ORDER BY created_epoch, id"
            )
            for row in conn.execute(query, params):
                yield _escalation(row)
        finally:
            conn.close()

    def iter_corrections(
        self, model: str | None = None, since: datetime | float | None = None
    ) -> Iterator[Correction]:
        """Corrections created at or after ``since``, oldest first, with the text where it was kept.

        A decision corrected twice appears twice; the later one (same :attr:`Correction.target`)
        overrides the earlier."""
        clauses: list[str] = ["1 = 1"]
        params: list[object] = []
        if model is not None:
            clauses.append("c.model = ?")
            params.append(model)
        if (start := _epoch(since)) is not None:
            clauses.append("c.created_epoch >= ?")
            params.append(start)
        conn = _open_readonly(self.path)
        try:
            query = (
                "SELECT c.id, c.model, c.model_version, c.escalation_id, c.request_id,"
                " COALESCE(e.text, d.text), c.corrected_label, c.corrected_spans, c.source, c.created_epoch,"
                " COALESCE(e.final_label, d.label), COALESCE(d.route, e.route, ''), c.decision_id"
                " FROM corrections AS c LEFT JOIN escalations AS e ON e.id = c.escalation_id"
                " LEFT JOIN decisions AS d ON d.id = c.decision_id"
                f" WHERE {' AND '.join(clauses)} ORDER BY c.id"
            )
            for row in conn.execute(query, params):
                values = list(row)
                values[7] = _spans(values[7])
                yield Correction(*values)
        finally:
            conn.close()

    def iter_review_candidates(
        self, model: str, max_margin: float, since: datetime | float | None = None
    ) -> Iterator[ReviewCandidate]:
        """Decisions of ``model`` not yet corrected that were escalated or answered with a margin
        below ``max_margin``, least sure first."""
        params: list[object] = [model, max_margin]
        window = ""
        if (start := _epoch(since)) is not None:
            window = " AND d.created_epoch >= ?"
            params.append(start)
        conn = _open_readonly(self.path)
        try:
            query = (
                "SELECT d.id, d.escalation_id, d.request_id, d.item, d.model, d.model_version,"
                " COALESCE(e.text, d.text), COALESCE(e.text_sha256, d.text_sha256),"
                " COALESCE(e.final_label, d.label), d.route, COALESCE(e.specialist_confidence, d.confidence),"
                " d.margin, e.specialist_top, d.created_epoch"
                " FROM decisions AS d LEFT JOIN escalations AS e ON e.id = d.escalation_id"
                " WHERE d.model = ? AND (d.escalation_id IS NOT NULL OR d.margin < ?)"
                f"{window} AND NOT EXISTS (SELECT 1 FROM corrections AS c WHERE c.decision_id = d.id"
                " OR (d.escalation_id IS NOT NULL AND c.escalation_id = d.escalation_id))"
            )
            rows = conn.execute(query, params).fetchall()
        finally:
            conn.close()
        found = [_candidate(row) for row in rows]
        yield from sorted(found, key=lambda c: (c.margin, c.created_epoch))

    def corrections(self, escalation_id: str) -> list[tuple[str, str, str]]:
        """(corrected_label, source, created_at) for one escalation, oldest first."""
        conn = _open_readonly(self.path)
        try:
            rows = conn.execute(
                "SELECT corrected_label, source, created_at FROM corrections"
                " WHERE escalation_id = ? ORDER BY id",
                (escalation_id,),
            ).fetchall()
        finally:
            conn.close()
        return [(str(a), str(b), str(c)) for a, b, c in rows]


def _open_writers(path: Path) -> tuple[sqlite3.Connection, sqlite3.Connection]:
    """The durable (migrated) and the relaxed write connection of the database at ``path``."""
    make_private_dir(path.parent)
    create_private_file(path)  # before SQLite makes it, so that its -wal and -shm share the mode
    durable = _connect(path, "FULL")
    try:
        migrate(durable, MIGRATIONS)
        return durable, _connect(path, "NORMAL")
    except BaseException:
        durable.close()
        raise


def _insert(table: str, columns: Sequence[str]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _spans_json(spans: Sequence[CorrectedSpan]) -> str:
    for span in spans:
        if not span.label or span.start < 0 or span.end <= span.start:
            raise InvalidArgument(
                f"span {span.label!r} [{span.start}, {span.end}): needs a label and 0 <= start < end"
            )
    ordered = sorted(spans, key=lambda x: (x.start, x.end, x.label))
    return json.dumps([{"label": x.label, "start": x.start, "end": x.end} for x in ordered])


def _spans(text: object) -> tuple[CorrectedSpan, ...] | None:
    if text is None:
        return None
    rows = json.loads(str(text))
    return tuple(CorrectedSpan(str(x["label"]), int(x["start"]), int(x["end"])) for x in rows)


# The decision a correction names, with what the caller was served. An escalated decision is found
# from either of its ids, and both name it.
_TARGET = (
    "SELECT COALESCE(d.model, e.model), COALESCE(d.model_version, e.model_version),"
    " COALESCE(e.id, d.escalation_id), d.id, COALESCE(d.request_id, e.request_id),"
    " COALESCE(e.final_label, d.label), COALESCE(d.route, e.route), COALESCE(e.text, d.text) IS NOT NULL"
)


def _resolve(conn: sqlite3.Connection, request: CorrectionRequest) -> CorrectionTarget:
    if request.escalation_id:
        row = conn.execute(
            f"{_TARGET} FROM escalations AS e LEFT JOIN decisions AS d ON d.escalation_id = e.id"
            " WHERE e.id = ? ORDER BY d.id LIMIT 1",
            (request.escalation_id,),
        ).fetchone()
        if row is None:
            raise NotFound(f"no escalation with id {request.escalation_id!r}")
        return _target(row)
    if not request.request_id:
        raise InvalidArgument("a correction names a decision by escalation id or by request id")
    if request.item < 0:
        raise InvalidArgument(f"item {request.item}: a text's position in its request is 0 or more")
    query = (
        f"{_TARGET} FROM decisions AS d LEFT JOIN escalations AS e ON e.id = d.escalation_id"
        " WHERE d.request_id = ? AND d.item = ?"
    )
    params: list[object] = [request.request_id, request.item]
    if request.model:
        query += " AND d.model = ?"
        params.append(request.model)
    rows = conn.execute(query + " ORDER BY d.id DESC", params).fetchall()
    if not rows:
        where = f" for model {request.model!r}" if request.model else ""
        raise NotFound(
            f"no decision for text {request.item} of request {request.request_id!r}{where} (a specialist's "
            "decisions are recorded within a second of the answer)"
        )
    models = {(r[0], r[1]) for r in rows}
    if len(models) > 1:
        raise InvalidArgument(
            f"request {request.request_id!r} has decisions of {len(models)} models for text {request.item}; "
            "name the model"
        )
    return _target(rows[0])


def _candidate(row: Sequence[object]) -> ReviewCandidate:
    decision_id, escalation_id, request_id, item, model, version, text, digest, served, route = row[:10]
    confidence, margin, top, created = row[10:]
    if margin is None:  # an escalation's decision row from schema 1: the margin from its top labels
        scores = [float(score) for _, score in json.loads(str(top))] if top else [0.0]
        margin = scores[0] - (scores[1] if len(scores) > 1 else 0.0)
    return ReviewCandidate(
        decision_id=int(decision_id),  # type: ignore[call-overload]
        escalation_id=None if escalation_id is None else str(escalation_id),
        request_id=str(request_id),
        item=None if item is None else int(item),  # type: ignore[call-overload]
        model=str(model),
        model_version=int(version),  # type: ignore[call-overload]
        text=None if text is None else str(text),
        text_sha256=None if digest is None else str(digest),
        served_label=None if served is None else str(served),
        route=str(route),
        confidence=None if confidence is None else float(confidence),  # type: ignore[arg-type]
        margin=float(margin),  # type: ignore[arg-type]
        created_epoch=float(created),  # type: ignore[arg-type]
    )


def _target(row: Sequence[object]) -> CorrectionTarget:
    model, version, escalation_id, decision_id, request_id, served, route, has_text = row
    return CorrectionTarget(
        model=str(model),
        model_version=int(version),  # type: ignore[call-overload]
        escalation_id=None if escalation_id is None else str(escalation_id),
        decision_id=None if decision_id is None else int(decision_id),  # type: ignore[call-overload]
        request_id=str(request_id),
        served_label=None if served is None else str(served),
        route=str(route),
        has_text=bool(has_text),
    )


def _escalation(row: Sequence[object]) -> Escalation:
    values = dict(zip(ESCALATION_COLUMNS, row, strict=True))
    top = [(str(label), float(score)) for label, score in json.loads(str(values.pop("specialist_top")))]
    cost = Cost(
        core_seconds=float(values.pop("cost_core_seconds")),  # type: ignore[arg-type]
        accelerator_seconds=float(values.pop("cost_accelerator_seconds")),  # type: ignore[arg-type]
        price=float(values.pop("price")),  # type: ignore[arg-type]
        currency=str(values.pop("currency")),
    )
    return Escalation(specialist_top=top, cost=cost, **values)  # type: ignore[arg-type]


def _window(
    since: datetime | float | None, until: datetime | float | None, model: str | None
) -> tuple[str, list[object]]:
    clauses: list[str] = []
    params: list[object] = []
    start, end = _epoch(since), _epoch(until)
    if start is not None:
        clauses.append("created_epoch >= ?")
        params.append(start)
    if end is not None:
        clauses.append("created_epoch < ?")
        params.append(end)
    if model is not None:
        clauses.append("model = ?")
        params.append(model)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _open_readonly(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise NotFound(f"no escalation database at {path}")
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    try:
        version = user_version(conn)
    except sqlite3.DatabaseError as e:
        conn.close()
        raise FailedPrecondition(f"{path} is not an escalation database: {e}") from e
    if version == 0 or version > SCHEMA_VERSION:
        conn.close()
        raise FailedPrecondition(
            f"{path} has escalation schema version {version}; this appliance reads version {SCHEMA_VERSION}"
        )
    return conn


def summarize(
    path: Path,
    since: datetime | float | None = None,
    until: datetime | float | None = None,
    model: str | None = None,
) -> Summary:
    """Decision totals per route over ``since <= time < until``, read without writing."""
    where, params = _window(since, until, model)
    conn = _open_readonly(path)
    try:
        rows = conn.execute(
            "SELECT route, COUNT(*), SUM(fallback), SUM(cost_core_seconds), SUM(cost_accelerator_seconds),"
            f" SUM(price) FROM decisions{where} GROUP BY route ORDER BY route",
            params,
        ).fetchall()
        currencies = [c for (c,) in conn.execute(f"SELECT DISTINCT currency FROM decisions{where}", params)]
    finally:
        conn.close()
    routes = {
        str(route): RouteTotals(int(n), int(fallbacks), float(core), float(accel), float(price))
        for route, n, fallbacks, core, accel, price in rows
    }
    return Summary(routes=routes, currencies=sorted(currencies))
