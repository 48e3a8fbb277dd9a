"""Shadow: a challenger answers a share of live traffic beside the champion, never to the caller.

The champion's path only samples the request and hands it to a bounded queue without waiting:
when the queue is full the request is dropped from shadow (counted), never delayed. One
background task takes requests off the queue, asks the runtime for the challenger's answers (the
same encoder lane, at most one shadow request at a time) and writes one row per text to its own
SQLite file, ``$APPLIANCE_HOME/loop/shadow.db``, never to the escalation database. The
challenger's core-seconds are kept in those rows: shadow cost is counted apart from the decisions'.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from appliance.files import create_private_file, make_private_dir
from appliance.loop.choices import ShadowChoice
from appliance.types import Decision, SpecialistAnswer

log = logging.getLogger(__name__)

DEFAULT_QUEUE = 64  # requests waiting for the challenger; past it they are dropped

SCHEMA = """
CREATE TABLE IF NOT EXISTS shadow (
    id                     INTEGER PRIMARY KEY,
    created_epoch          REAL NOT NULL,
    model                  TEXT NOT NULL,
    champion_version       INTEGER NOT NULL,
    challenger_version     INTEGER NOT NULL,
    request_id             TEXT NOT NULL,
    item                   INTEGER NOT NULL,  -- the text's position in its request
    text_sha256            TEXT NOT NULL,
    champion_label         TEXT NOT NULL,     -- the label the caller got
    champion_route         TEXT NOT NULL,
    challenger_label       TEXT NOT NULL,
    challenger_confidence  REAL NOT NULL,
    challenger_threshold   REAL NOT NULL,     -- the challenger's calibrated threshold
    core_seconds           REAL NOT NULL      -- the challenger's compute for this text
);
CREATE INDEX IF NOT EXISTS shadow_by_model ON shadow (model, challenger_version, created_epoch);
CREATE INDEX IF NOT EXISTS shadow_by_request ON shadow (request_id, item);
"""
COLUMNS = (
    "created_epoch", "model", "champion_version", "challenger_version", "request_id", "item",
    "text_sha256", "champion_label", "champion_route", "challenger_label", "challenger_confidence",
    "challenger_threshold", "core_seconds",
)  # fmt: skip


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def shadow_db(home: Path) -> Path:
    return home / "loop" / "shadow.db"


@dataclass(frozen=True)
class ShadowRow:
    created_epoch: float
    model: str
    champion_version: int
    challenger_version: int
    request_id: str
    item: int
    text_sha256: str
    champion_label: str
    champion_route: str
    challenger_label: str
    challenger_confidence: float
    challenger_threshold: float
    core_seconds: float


class ShadowStore:
    """The shadow rows' SQLite file (WAL; a lost last moment before a power cut costs nothing served)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _writer(self) -> sqlite3.Connection:
        if self._conn is None:
            make_private_dir(self.path.parent)
            create_private_file(self.path)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(SCHEMA)
            self._conn = conn
        return self._conn

    def write(self, rows: Sequence[ShadowRow]) -> None:
        if not rows:
            return
        values = [tuple(getattr(r, c) for c in COLUMNS) for r in rows]
        sql = f"INSERT INTO shadow ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        with self._lock:
            conn = self._writer()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(sql, values)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def read_rows(path: Path, model: str, since: float | None = None) -> list[ShadowRow]:
    """Every shadow row of ``model`` (from ``since``), oldest first; none when there is no file."""
    if not path.is_file():
        return []
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        query = f"SELECT {', '.join(COLUMNS)} FROM shadow WHERE model = ?"
        params: list[object] = [model]
        if since is not None:
            query += " AND created_epoch >= ?"
            params.append(since)
        try:
            rows = conn.execute(query + " ORDER BY id", params).fetchall()
        except sqlite3.OperationalError:  # created but not yet given its table
            return []
    finally:
        conn.close()
    return [ShadowRow(*row) for row in rows]


class Challenger(Protocol):
    """What the shadow needs from the runtime: the challenger's answers, and its threshold."""

    async def shadow_answers(
        self, name: str, version: int, texts: Sequence[str]
    ) -> tuple[list[SpecialistAnswer], float]: ...


@dataclass(frozen=True)
class _Job:
    model: str
    champion_version: int
    choice: ShadowChoice
    request_id: str
    texts: tuple[str, ...]
    decisions: tuple[Decision, ...]
    at: float


class ShadowRunner:
    def __init__(
        self, target: Challenger, store: ShadowStore, queue_size: int = DEFAULT_QUEUE, seed: int | None = None
    ) -> None:
        self.target = target
        self.store = store
        self.choices: dict[str, ShadowChoice] = {}
        self.dropped = 0
        self.failed = 0
        self.answered = 0
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=queue_size)
        self._rng = random.Random(seed)
        self._task: asyncio.Task[None] | None = None

    def set_choice(self, name: str, choice: ShadowChoice | None) -> None:
        if choice is None:
            if self.choices.pop(name, None) is not None:
                log.info("shadow off for %s", name)
        elif self.choices.get(name) != choice:
            self.choices[name] = choice
            log.info("shadow %s:%s on %.0f%% of traffic", name, choice.version, 100 * choice.fraction)

    def offer(
        self, name: str, version: int, texts: Sequence[str], decisions: Sequence[Decision], request_id: str
    ) -> None:
        """Called on the champion's path: never waits, never raises."""
        choice = self.choices.get(name)
        if choice is None or choice.version == version or self._rng.random() >= choice.fraction:
            return
        job = _Job(name, version, choice, request_id, tuple(texts), tuple(decisions), time.time())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning("shadow queue full: %d requests dropped from shadow so far", self.dropped)
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._work(), name="shadow")

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                await self._answer(job)
            except asyncio.CancelledError:
                raise
            except Exception:  # a challenger that fails is shadow's problem only
                self.failed += 1
                log.exception("shadow %s:%s failed", job.model, job.choice.version)
            finally:
                self._queue.task_done()

    async def _answer(self, job: _Job) -> None:
        answers, threshold = await self.target.shadow_answers(job.model, job.choice.version, job.texts)
        rows = [
            ShadowRow(
                created_epoch=job.at,
                model=job.model,
                champion_version=job.champion_version,
                challenger_version=job.choice.version,
                request_id=job.request_id,
                item=i,
                text_sha256=text_sha256(text),
                champion_label=decision.label,
                champion_route=decision.route.value,
                challenger_label=answer.rejected_as or answer.top[0][0],
                challenger_confidence=float(answer.top[0][1]),
                challenger_threshold=threshold,
                core_seconds=answer.core_seconds,
            )
            for i, (text, decision, answer) in enumerate(zip(job.texts, job.decisions, answers, strict=True))
        ]
        await asyncio.to_thread(self.store.write, rows)
        self.answered += len(rows)

    async def drain(self) -> None:
        """Wait until every queued request has been answered (tests, shutdown)."""
        await self._queue.join()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.to_thread(self.store.close)
