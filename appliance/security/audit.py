"""An append-only, keyed, hash-chained audit trail: ``$APPLIANCE_HOME/audit/<chain>/audit-<n>.jsonl``.

The line format, keys and checks are in :mod:`audit_chain` and :mod:`audit_verify`. Each writer
process owns one chain folder; its first record links to the head of the chain that was newest
when it started (``LATEST`` in the audit root), so that chains form one sequence and a deleted or
cut chain shows in the next one. Every file starts with an ``audit-file`` record (the sealed chain
key); a closed chain ends with an ``audit-close`` record. Heads go to syslog on rotation and close.

Writes go through one writer thread fed by a bounded queue: callers on the event loop only
enqueue, and a full queue makes them wait rather than lose a record. The writer group-commits:
it writes the records it finds queued, then fsyncs once. A record is acknowledged (``flush``
returns, ``append_async`` returns) only once it is on disk.

When the disk cannot take records (an I/O error, or less free space than ``min_free_bytes``),
:attr:`AuditLog.unavailable` says why: the server then refuses new calls and reports NOT_SERVING.
Records already accepted stay queued, and the writer retries until they are written, so none is
acknowledged and then lost; once space returns the writer clears the reason by itself.
Retention bounds a chain's files (``max_files``, ``max_total_bytes``); pruning is itself recorded,
so that verification tells files retention removed from files someone deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import queue
import syslog
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.files import fsync_dir, make_private_dir, private_mode, write_atomic
from appliance.security import audit_chain
from appliance.security.audit_chain import (
    GENESIS,
    LATEST,
    KeyPaths,
    audit_files,
    encode_line,
    file_name,
    key_paths,
    seal,
    stream_dir,
    streams,
)
from appliance.security.audit_verify import VerifyResult, verify

__all__ = [
    "GENESIS",
    "AuditError",
    "AuditLog",
    "AuditSettings",
    "VerifyResult",
    "audit_files",
    "call_records",
    "stream_dir",
    "streams",
    "verify",
]

log = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_QUEUE_SIZE = 10_000
_BATCH = 1024


@dataclass(frozen=True)
class AuditSettings:
    max_file_bytes: int = 64 * MiB  # rotate before a file grows past this
    max_files: int = 64  # per chain; the oldest are pruned beyond this ...
    max_total_bytes: int = 2048 * MiB  # ... or beyond this many bytes in all
    min_free_bytes: int = 64 * MiB  # below this, refuse new calls: room for those already accepted
    poll_seconds: float = 0.5  # how often free space is checked, and a failed write retried
    close_timeout_seconds: float = 10.0  # how long close() keeps retrying a write the disk refuses

    def __post_init__(self) -> None:
        if self.max_file_bytes < 1 or self.max_files < 1 or self.max_total_bytes < 1:
            raise ValueError("audit file limits must be positive")


class AuditError(RuntimeError):
    """The audit trail cannot accept or store records."""


def last_record(folder: Path) -> dict[str, Any] | None:
    """The newest complete record of a chain (either format), or None."""
    for _, path in reversed(audit_files(folder)):
        line = _last_line(path)
        if line is not None:
            return dict(json.loads(line))
    return None


def call_records(folder: Path) -> list[dict[str, Any]]:
    """The records of one chain, oldest first, without the trail's own bookkeeping records."""
    found = []
    for _, path in audit_files(folder):
        for line in path.read_bytes().splitlines():
            record = json.loads(line)
            if record.get("event") not in audit_chain.TRAIL_EVENTS:
                found.append(record)
    return found


class _Stop:
    pass


_STOP = _Stop()
_Item = tuple[Mapping[str, Any], "asyncio.Future[None] | None"]


class AuditLog:
    """The writer side of the trail. One process at a time may hold a folder (enforced by a lock)."""

    def __init__(
        self,
        folder: str | os.PathLike[str] | None = None,
        settings: AuditSettings | None = None,
        *,
        keys: KeyPaths | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ) -> None:
        self.settings = settings if settings is not None else AuditSettings()
        self.dir = Path(folder) if folder is not None else stream_dir()
        make_private_dir(self.dir)
        self._lock_fd = _lock(self.dir / ".lock", f"another process is writing the audit trail in {self.dir}")
        self._key = os.urandom(32)  # in memory only; on disk sealed to the audit public key
        self._sealed = seal(audit_chain.writer_public_key(keys or key_paths()), self._key)
        self._queue: queue.Queue[_Item | _Stop] = queue.Queue(maxsize=queue_size)
        self._enqueue_lock = threading.Lock()  # queue order == acceptance order, for flush()
        self._accepted = 0
        self._durable = 0
        self._durable_cond = threading.Condition()
        self._write_problem: str | None = None
        self._space_problem: str | None = None
        self._closed = False
        self._gave_up: str | None = None
        self._fd = -1
        self._size = 0
        self._file_n, self._seq, self._prev = _recover(self.dir)  # writer-thread state
        self._head = (self._seq - 1, self._prev)
        self._after: dict[str, Any] | None = None
        self._linked = False
        try:
            self._start_file()
        except OSError as exc:  # a full disk at start: refuse calls and retry, rather than crash-loop
            self._set_write_problem(f"{exc.strerror or exc} ({self.dir})")
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------------------------- public API

    @property
    def unavailable(self) -> str | None:
        """Why new calls cannot be recorded now (disk full, I/O error, below the free-space
        watermark), or None. Clears by itself once the writer can write again."""
        return self._write_problem or self._space_problem

    @property
    def head(self) -> tuple[int, str]:
        """``(seq, mac)`` of the newest durable record (``(-1, GENESIS)`` for an empty trail)."""
        with self._durable_cond:
            return self._head

    def append(self, record: Mapping[str, Any]) -> None:
        """Queue a record; blocks while the queue is full. Raises :class:`AuditError` once closed."""
        self._check(record)
        with self._enqueue_lock:
            self._raise_if_closed()
            self._queue.put((record, None))
            self._accepted += 1

    async def append_async(self, record: Mapping[str, Any]) -> None:
        """Queue a record and wait, without blocking the event loop, until it is on disk."""
        self._check(record)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._enqueue_lock:
            self._raise_if_closed()
            try:
                self._queue.put_nowait((record, done))
                self._accepted += 1
                queued = True
            except queue.Full:
                queued = False
        if not queued:  # wait for room on a worker thread, never drop
            await asyncio.to_thread(self._put_blocking, record, done)
        await done

    def flush(self, timeout: float | None = None) -> None:
        """Return once every record appended before this call is written and fsynced."""
        with self._enqueue_lock:
            target = self._accepted
        with self._durable_cond:
            if not self._durable_cond.wait_for(
                lambda: self._durable >= target or self._gave_up is not None, timeout
            ):
                raise AuditError(f"audit flush timed out after {timeout} s: {self.unavailable or 'busy'}")
        if self._durable < target:
            raise AuditError(f"audit writer failed: {self._gave_up}")

    def close(self) -> None:
        """Write the close record, stop the writer and release the folder. Idempotent."""
        with self._enqueue_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)
        os.close(self._lock_fd)
        if self._gave_up is not None:
            raise AuditError(f"audit writer failed: {self._gave_up}")

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------------------- callers' side

    def _check(self, record: Mapping[str, Any]) -> None:
        clash = audit_chain.RESERVED.intersection(record)
        if clash or record.get("event") in audit_chain.TRAIL_EVENTS:
            raise ValueError(f"audit fields {sorted(clash) or ['event']} are set by the trail itself")
        audit_chain.canonical(record)  # fail in the caller, not in the writer, on a value JSON cannot hold

    def _raise_if_closed(self) -> None:
        if self._closed:
            raise AuditError("audit log is closed")

    def _put_blocking(self, record: Mapping[str, Any], done: asyncio.Future[None]) -> None:
        with self._enqueue_lock:
            self._raise_if_closed()
            self._queue.put((record, done))
            self._accepted += 1

    # -------------------------------------------------------------------------------- writer thread

    def _start_file(self) -> None:
        """Link the chain (once) and open its next file."""
        if not self._linked:
            # every file repeats the chain's link backwards, so that retention never loses it
            self._after = _link(self.dir) if self._seq == 0 else _after_of(self.dir)
            if self._seq == 0 and self._after is not None:
                self._prev = str(self._after["mac"])  # the new genesis is the previous chain's head
            self._linked = True
        self._open_file(self._file_n + 1)

    def _run(self) -> None:
        pending: list[_Item] = []
        stopping = False
        deadline: float | None = None
        while True:
            if not pending:
                if stopping:
                    break
                if self._fd < 0:  # no file yet: nothing else clears the problem while calls are refused
                    with contextlib.suppress(OSError):
                        self._start_file()
                        self._set_write_problem(None)
                pending, stopping = self._take()
                if stopping:
                    pending.append(({"event": audit_chain.CLOSE_EVENT, "time": _now()}, None))
                self._check_space()
                continue
            try:
                pending = self._write_pending(pending)
                self._set_write_problem(None)
            except Exception as exc:  # disk full, I/O error: keep the records, refuse new calls, retry
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
                self._set_write_problem(f"{reason} ({self.dir})")
                if self._closed:
                    deadline = deadline or time.monotonic() + self.settings.close_timeout_seconds
                    if time.monotonic() > deadline:
                        self._give_up(
                            [*pending, *self._drain()], f"not written before close: {self.unavailable}"
                        )
                        return
                time.sleep(self.settings.poll_seconds)
        self._export_head("closed")

    def _drain(self) -> list[_Item]:
        items: list[_Item] = []
        with contextlib.suppress(queue.Empty):
            while True:
                item = self._queue.get_nowait()
                if not isinstance(item, _Stop):
                    items.append(item)
        return items

    def _take(self) -> tuple[list[_Item], bool]:
        """The next batch from the queue (waiting at most one poll interval), and whether close() came."""
        try:
            batch = [self._queue.get(timeout=self.settings.poll_seconds)]
        except queue.Empty:
            return [], False
        while len(batch) < _BATCH:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        items = [item for item in batch if not isinstance(item, _Stop)]
        return items, len(items) < len(batch)

    def _write_pending(self, pending: list[_Item]) -> list[_Item]:
        """Write ``pending`` in file-sized groups, acknowledging each group once it is fsynced.
        Returns what is left (nothing). Raises OSError with the unwritten rest still pending."""
        if self._fd < 0:
            self._start_file()
        while pending:
            lines: list[bytes] = []
            seq, prev, size = self._seq, self._prev, self._size
            for record, _ in pending:
                line, mac = self._line(record, seq, prev)
                if size + len(line) > self.settings.max_file_bytes and (
                    lines or self._seq > self._file_first
                ):
                    break
                lines.append(line)
                seq, prev, size = seq + 1, mac, size + len(line)
            if not lines:
                self._rotate()
                continue
            self._append(b"".join(lines))
            self._seq, self._prev = seq, prev
            group, pending = pending[: len(lines)], pending[len(lines) :]
            self._acknowledge(group)
        return pending

    def _line(self, record: Mapping[str, Any], seq: int, prev: str) -> tuple[bytes, str]:
        line, mac = encode_line({**record, "v": audit_chain.VERSION, "seq": seq, "prev": prev}, self._key)
        return line + b"\n", mac

    def _append(self, data: bytes) -> None:
        """Write and fsync ``data``; on failure cut the file back, so that a retry starts clean."""
        try:
            _write_all(self._fd, data)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        self._size += len(data)

    def _acknowledge(self, group: list[_Item]) -> None:
        with self._durable_cond:
            self._durable += len(group)
            self._head = (self._seq - 1, self._prev)
            self._durable_cond.notify_all()
        for _, done in group:
            if done is not None:
                _resolve(done, None)

    def _give_up(self, pending: list[_Item], reason: str) -> None:
        """Only at close: tell every waiting caller its record was not stored (never acknowledged)."""
        self._gave_up = reason
        log.error("audit: %d records not stored: %s", len(pending), reason)
        with self._durable_cond:
            self._durable_cond.notify_all()
        for _, done in pending:
            if done is not None:
                _resolve(done, reason)

    def _open_file(self, n: int) -> None:
        """Start file ``n`` with its ``audit-file`` record; on failure nothing changes."""
        header: dict[str, Any] = {
            "event": audit_chain.FILE_EVENT,
            "file": n,
            "key": self._sealed,
            "after": self._after,
            "time": _now(),
        }
        prune = self._prune_plan(n)
        lines = [header, *([{"event": audit_chain.PRUNE_EVENT, "through_file": prune}] if prune else [])]
        data, seq, prev = b"", self._seq, self._prev
        for record in lines:
            line, prev = self._line(record, seq, prev)
            data, seq = data + line, seq + 1
        path = self.dir / file_name(n)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            os.fchmod(fd, private_mode(self.dir, folder=False))  # the umask aside
            _write_all(fd, data)
            fsync_dir(self.dir)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._size, self._file_n, self._file_first = fd, len(data), n, seq
        self._seq, self._prev = seq, prev
        with self._durable_cond:
            self._head = (self._seq - 1, self._prev)
        for old, old_path in audit_files(self.dir):
            if old <= prune:
                old_path.unlink(missing_ok=True)

    def _rotate(self) -> None:
        self._open_file(self._file_n + 1)
        self._export_head("rotated")

    def _prune_plan(self, new_n: int) -> int:
        """The highest file number retention removes once file ``new_n`` exists (0: none)."""
        files = [(n, p.stat().st_size) for n, p in audit_files(self.dir)]
        limit_files, limit_bytes = self.settings.max_files - 1, self.settings.max_total_bytes
        through = 0
        total = sum(size for _, size in files)
        while files and (len(files) > limit_files or total > limit_bytes):
            n, size = files.pop(0)
            through, total = n, total - size
        return through if through < new_n else 0

    def _check_space(self) -> None:
        try:
            stat = os.statvfs(self.dir)
        except OSError as exc:
            problem: str | None = f"cannot check free space in {self.dir}: {exc.strerror}"
        else:
            free, floor = stat.f_bavail * stat.f_frsize, self.settings.min_free_bytes
            problem = (
                None
                if free >= floor
                else f"{free} bytes free in {self.dir}, below the {floor}-byte watermark"
            )
        if problem != self._space_problem:
            (log.warning if problem else log.info)(
                "audit: %s", problem or "free space is back above the watermark"
            )
        self._space_problem = problem

    def _set_write_problem(self, problem: str | None) -> None:
        if problem != self._write_problem:
            if problem:
                log.error("audit: cannot write records, retrying: %s", problem)
            else:
                log.info("audit: records are being written again")
        self._write_problem = problem

    def _export_head(self, why: str) -> None:
        """The chain's head outside the trail: syslog (root-owned on a normal install) and the log."""
        message = (
            f"appliance-audit head {why}: chain={self.dir.name} file={self._file_n} "
            f"seq={self._seq - 1} mac={self._prev}"
        )
        log.info("%s", message)
        with contextlib.suppress(OSError):
            syslog.syslog(syslog.LOG_INFO | syslog.LOG_AUTHPRIV, message)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _resolve(done: asyncio.Future[None], error: str | None) -> None:
    def settle() -> None:
        if done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(AuditError(f"audit writer failed: {error}"))

    with contextlib.suppress(RuntimeError):  # the caller's loop is gone; nobody is waiting
        done.get_loop().call_soon_threadsafe(settle)


def _lock(path: Path, busy: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AuditError(busy) from None
    return fd


def _link(folder: Path) -> dict[str, Any] | None:
    """Name this chain in ``LATEST`` and return the head of the chain named there before: the
    new chain's genesis. Serialised by a lock in the root, so chains form one sequence."""
    root = folder.parent
    fd = os.open(root / ".latest.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        latest = root / LATEST
        before = latest.read_text().strip() if latest.exists() else ""
        link = None
        if before and before != folder.name:
            head = last_record(root / before)
            if head is not None:
                link = {"chain": before, "seq": head["seq"], "mac": head.get("mac", head.get("hash"))}
        write_atomic(latest, folder.name.encode() + b"\n", private_mode(root, folder=False))
        return link
    finally:
        os.close(fd)


def _after_of(folder: Path) -> dict[str, Any] | None:
    """The link backwards that a chain's files repeat (None for the first chain, or the old format)."""
    files = audit_files(folder)
    if not files:
        return None
    with open(files[-1][1], "rb") as handle:
        first = handle.readline()
    with contextlib.suppress(ValueError):
        after = json.loads(first).get("after")
        return after if isinstance(after, dict) else None
    return None


def _recover(folder: Path) -> tuple[int, int, str]:
    """``(last file number, next seq, previous mac)`` to continue the chain where it stopped.

    A last line without its newline is a write the crash interrupted before fsync; it was never
    acknowledged, so it is cut off here. The chain goes on in a new file under this process's key."""
    files = audit_files(folder)
    if not files:
        return 0, 0, GENESIS
    _cut_torn_tail(files[-1][1])
    record = last_record(folder)
    if record is None:
        return files[-1][0], 0, GENESIS
    return files[-1][0], int(record["seq"]) + 1, str(record.get("mac", record.get("hash")))


def _cut_torn_tail(path: Path) -> None:
    with open(path, "r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        handle.truncate(_find_last_newline(handle, size) + 1)
        handle.flush()
        os.fsync(handle.fileno())


def _last_line(path: Path) -> bytes | None:
    """The last complete (newline-terminated) line; a line being written is not yet one."""
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        end = _find_last_newline(handle, size)
        if end < 0:
            return None
        start = _find_last_newline(handle, end) + 1
        handle.seek(start)
        return handle.read(end - start)


def _find_last_newline(handle: Any, end: int) -> int:
    """Offset of the last ``\\n`` before ``end``, or -1; reads backwards in chunks."""
    chunk = 64 * 1024
    pos = end
    while pos > 0:
        start = max(0, pos - chunk)
        handle.seek(start)
        found = handle.read(pos - start).rfind(b"\n")
        if found >= 0:
            return start + found
        pos = start
    return -1
