"""An append-only, hash-chained audit trail: JSON lines in ``$APPLIANCE_HOME/audit/audit-<n>.jsonl``.

Every record carries ``seq`` (0, 1, 2, ...), ``prev`` (the previous record's hash, 64 zeros for
the first) and ``hash`` = sha256 of the record's canonical JSON without ``hash``. The chain runs
on across rotated files, so an edited, deleted, reordered or truncated record anywhere before the
newest one breaks verification. (Removing records from the very end leaves a valid, shorter chain;
keep :attr:`AuditLog.head` somewhere else to detect that.)

Writes go through one writer thread fed by a bounded queue: callers on the event loop only
enqueue, and a full queue makes them wait rather than lose a record. The writer group-commits:
it writes every record it finds queued, then flushes and fsyncs once. Durability bound: a record
is on disk once :meth:`AuditLog.flush` (or ``close``) returns after it was appended, or once the
awaitable :meth:`AuditLog.append_async` returns; a crash may lose only records still in the queue
or in the batch being written (at most ``queue_size`` records, in practice one batch of a few ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import queue
import re
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from appliance.config import state_dir
from appliance.security.files import fsync_dir, make_private_dir, open_private_append

GENESIS = "0" * 64
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_QUEUE_SIZE = 10_000
_RESERVED = frozenset({"seq", "prev", "hash"})
_FILE = re.compile(r"^audit-(\d+)\.jsonl$")


class AuditError(RuntimeError):
    """The audit trail cannot accept or store records."""


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    n_records: int
    first_error: str = ""


def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes a record's hash covers: sorted keys, no whitespace, UTF-8."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_hash(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def audit_files(folder: Path) -> list[tuple[int, Path]]:
    """The audit files in ``folder`` as ``(n, path)``, oldest first."""
    found = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = _FILE.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def stream_dir(root: Path | None = None) -> Path:
    """This process's own chain: ``audit/<host>-<pid>/``.

    Each server process writes its own chain, so that two of them on one box (a rolling upgrade
    starts the new replica before the old one stops) never contend for one folder.
    """
    base = root if root is not None else state_dir("audit")
    return base / f"{socket.gethostname()}-{os.getpid()}"


def streams(root: Path) -> list[Path]:
    """Every chain under ``root``: the folder itself if it holds audit files, and its sub-folders."""
    found = [root] if audit_files(root) else []
    if root.is_dir():
        found += sorted(p for p in root.iterdir() if p.is_dir() and audit_files(p))
    return found


def file_name(n: int) -> str:
    return f"audit-{n:06d}.jsonl"


class _Stop:
    pass


_STOP = _Stop()


class AuditLog:
    """The writer side of the trail. One process at a time may hold a folder (enforced by a lock)."""

    def __init__(
        self,
        folder: str | os.PathLike[str] | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.dir = Path(folder) if folder is not None else state_dir("audit")
        make_private_dir(self.dir)
        self.max_bytes = max_bytes
        self._lock_fd = _lock_folder(self.dir)
        self._queue: queue.Queue[tuple[Mapping[str, Any], asyncio.Future[None] | None] | _Stop] = queue.Queue(
            maxsize=queue_size
        )
        self._enqueue_lock = threading.Lock()  # queue order == acceptance order, for flush()
        self._accepted = 0
        self._durable = 0
        self._durable_cond = threading.Condition()
        self._error: BaseException | None = None
        self._closed = False
        self._file_n, self._seq, self._prev = _recover(self.dir)  # writer-thread state
        self._head = (self._seq - 1, self._prev)
        self._file: IO[bytes] = open_private_append(self.dir / file_name(self._file_n))
        fsync_dir(self.dir)
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------------------------- public API

    @property
    def failed(self) -> BaseException | None:
        """The error that stopped the writer, if any; no further record can be stored."""
        return self._error

    @property
    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the newest durable record (``(-1, GENESIS)`` for an empty trail)."""
        with self._durable_cond:
            return self._head

    def append(self, record: Mapping[str, Any]) -> None:
        """Queue a record; blocks while the queue is full. Raises :class:`AuditError` once broken."""
        self._check(record)
        with self._enqueue_lock:
            self._raise_if_unusable()
            self._queue.put((record, None))
            self._accepted += 1

    async def append_async(self, record: Mapping[str, Any]) -> None:
        """Queue a record and wait, without blocking the event loop, until it is on disk."""
        self._check(record)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._enqueue_lock:
            self._raise_if_unusable()
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
                lambda: self._durable >= target or self._error is not None, timeout
            ):
                raise AuditError(f"audit flush timed out after {timeout} s")
        if self._error is not None and self._durable < target:
            raise AuditError(f"audit writer failed: {self._error}") from self._error

    def close(self) -> None:
        """Flush, stop the writer and release the folder. Idempotent."""
        with self._enqueue_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join()
        self._file.close()
        os.close(self._lock_fd)
        if self._error is not None:
            raise AuditError(f"audit writer failed: {self._error}") from self._error

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------------------- internals

    def _check(self, record: Mapping[str, Any]) -> None:
        clash = _RESERVED.intersection(record)
        if clash:
            raise ValueError(f"audit fields {sorted(clash)} are set by the trail itself")
        canonical(record)  # fail in the caller, not in the writer, on a value JSON cannot hold

    def _raise_if_unusable(self) -> None:
        if self._closed:
            raise AuditError("audit log is closed")
        if self._error is not None:
            raise AuditError(f"audit writer failed: {self._error}") from self._error

    def _put_blocking(self, record: Mapping[str, Any], done: asyncio.Future[None]) -> None:
        with self._enqueue_lock:
            self._raise_if_unusable()
            self._queue.put((record, done))
            self._accepted += 1

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while len(batch) < 1024:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            items = [item for item in batch if not isinstance(item, _Stop)]
            stop = len(items) < len(batch)
            try:
                if self._error is None:
                    for record, _ in items:
                        self._write(record)
                    self._file.flush()
                    os.fsync(self._file.fileno())
            except BaseException as exc:  # disk full, I/O error: refuse all further records
                self._error = exc
            with self._durable_cond:
                if self._error is None:
                    self._durable += len(items)
                    self._head = (self._seq - 1, self._prev)
                self._durable_cond.notify_all()
            for _, done in items:
                if done is not None:
                    _resolve(done, self._error)

    def _write(self, record: Mapping[str, Any]) -> None:
        full = {**record, "seq": self._seq, "prev": self._prev}
        digest = hashlib.sha256(canonical(full)).hexdigest()
        full["hash"] = digest
        line = canonical(full) + b"\n"
        size = self._file.tell()
        if size > 0 and size + len(line) > self.max_bytes:
            self._rotate()
        self._file.write(line)
        self._seq += 1
        self._prev = digest

    def _rotate(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file_n += 1
        self._file = open_private_append(self.dir / file_name(self._file_n))
        fsync_dir(self.dir)


def _resolve(done: asyncio.Future[None], error: BaseException | None) -> None:
    def settle() -> None:
        if done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(AuditError(f"audit writer failed: {error}"))

    with contextlib.suppress(RuntimeError):  # the caller's loop is gone; nobody is waiting
        done.get_loop().call_soon_threadsafe(settle)


def _lock_folder(folder: Path) -> int:
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AuditError(f"another process is writing the audit trail in {folder}") from None
    return fd


def _recover(folder: Path) -> tuple[int, int, str]:
    """``(file number, next seq, previous hash)`` to continue the chain where it stopped.

    A last line without its newline is a write the crash interrupted before fsync; it was never
    durable, so it is cut off here."""
    files = audit_files(folder)
    if not files:
        return 1, 0, GENESIS
    last_n, last_path = files[-1]
    _cut_torn_tail(last_path)
    for _, path in reversed(files):
        line = _last_line(path)
        if line is not None:
            record = json.loads(line)
            return last_n, int(record["seq"]) + 1, str(record["hash"])
    return last_n, 0, GENESIS


def _cut_torn_tail(path: Path) -> None:
    with open(path, "r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        end = _find_last_newline(handle, size)
        handle.truncate(end + 1)
        handle.flush()
        os.fsync(handle.fileno())


def _last_line(path: Path) -> bytes | None:
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return None
        start = _find_last_newline(handle, size - 1) + 1  # newline ending the line before it
        handle.seek(start)
        return handle.read(size - start).rstrip(b"\n")


def _find_last_newline(handle: IO[bytes], end: int) -> int:
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


def verify(folder: str | os.PathLike[str] | None = None) -> VerifyResult:
    """Check every record's hash and its link to the one before, across all files in order."""
    base = Path(folder) if folder is not None else state_dir("audit")
    files = audit_files(base)
    expected_seq, prev, count = 0, GENESIS, 0
    for index, (n, path) in enumerate(files):
        where = path.name
        if index > 0 and n != files[index - 1][0] + 1:
            return VerifyResult(False, count, f"{where}: file {files[index - 1][0] + 1} is missing")
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            return VerifyResult(False, count, f"{where}: ends in a partial record (truncated)")
        for line_no, line in enumerate(data.splitlines(), start=1):
            at = f"{where} line {line_no}"
            try:
                record = json.loads(line)
            except ValueError:
                return VerifyResult(False, count, f"{at}: not valid JSON")
            if not isinstance(record, dict) or not record.keys() >= _RESERVED:
                return VerifyResult(False, count, f"{at}: not an audit record (seq/prev/hash missing)")
            if record_hash(record) != record["hash"]:
                return VerifyResult(False, count, f"{at}: hash mismatch, the record was altered")
            if record["seq"] != expected_seq:
                return VerifyResult(
                    False,
                    count,
                    f"{at}: seq {record['seq']} where {expected_seq} was expected "
                    "(records deleted or reordered)",
                )
            if record["prev"] != prev:
                return VerifyResult(False, count, f"{at}: does not link to the previous record")
            expected_seq, prev, count = expected_seq + 1, record["hash"], count + 1
    return VerifyResult(True, count, "")
