"""``appliance audit verify``: check each chain's lines as written, then how the chains link up.

Per chain: every line's mac over its exact bytes, canonical form, ``seq`` and ``prev``; files in
sequence, with leading files missing only where an ``audit-pruned`` record says retention removed
them. Across chains: a chain's genesis names the head of the chain before it, which must exist and
hold that record (else that chain was deleted, or its tail cut); ``LATEST`` must name a chain that
exists; and every chain must end in a close record, be still written, or end exactly where its
successor linked to it (a crash). Chains in the format before keys (sha256, ``hash``) are still
checked for integrity and reported as the old format.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from appliance.config import state_dir
from appliance.security import audit_chain
from appliance.security.audit_chain import (
    CLOSE_EVENT,
    FILE_EVENT,
    GENESIS,
    LATEST,
    PRUNE_EVENT,
    TRAIL_EVENTS,
    LineError,
    audit_files,
    decode_line,
    key_paths,
    mac_of,
    streams,
    unseal,
    verifier_private_key,
)

OLD_FORMAT = "old format (unkeyed sha256 chain, before keyed macs): integrity checked, origin not provable"


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    n_records: int  # call records: the trail's own (file, close, prune) are not counted
    first_error: str = ""
    old_format: bool = False


@dataclass
class ChainCheck:
    """One chain's result and what the cross-chain checks need from it."""

    name: str
    result: VerifyResult
    after: Mapping[str, Any] | None = None  # the predecessor's head this chain starts from
    last: tuple[int, str] | None = None  # (seq, mac) of its newest record
    closed: bool = False
    found: dict[int, str] = field(default_factory=dict)  # seq -> mac, for seqs others link to


@dataclass(frozen=True)
class TrailResult:
    chains: list[ChainCheck]
    errors: list[str]

    @property
    def ok(self) -> bool:
        return not self.errors and all(c.result.ok for c in self.chains)


def verify(
    folder: str | os.PathLike[str] | None = None, private_key: X25519PrivateKey | None = None
) -> VerifyResult:
    """Check one chain folder on its own."""
    base = Path(folder) if folder is not None else state_dir("audit")
    return check_chain(base, private_key).result


def verify_trail(root: Path, private_key: X25519PrivateKey | None = None) -> TrailResult:
    """Check every chain under ``root`` and the links between them."""
    folders = streams(root)
    names = {_name(root, f): f for f in folders}
    genesis = {name: _genesis_link(folder) for name, folder in names.items()}
    wanted: dict[str, set[int]] = {}
    for link in genesis.values():
        if link is not None:
            wanted.setdefault(str(link["chain"]), set()).add(int(link["seq"]))
    key = private_key if private_key is not None or not _keyed(folders) else _private_key()
    checks = [check_chain(folder, key, wanted.get(name, set()), name) for name, folder in names.items()]
    by_name = {c.name: c for c in checks}
    errors: list[str] = []
    vouched: set[tuple[str, int, str]] = set()
    for check in checks:
        link = check.after
        if link is None:
            continue
        pred, seq, mac = str(link["chain"]), int(link["seq"]), str(link["mac"])
        vouched.add((pred, seq, mac))
        if pred not in by_name:
            errors.append(f"{check.name} starts after chain {pred}, which is missing (deleted)")
        elif by_name[pred].result.ok and by_name[pred].found.get(seq) != mac:
            errors.append(
                f"chain {pred} has no record seq {seq} with the mac {check.name} links to "
                "(its tail was cut or rewritten)"
            )
    latest = root / LATEST
    if latest.exists():
        named = latest.read_text().strip()
        if named and named not in by_name:
            errors.append(f"{LATEST} names chain {named}, which is missing (deleted)")
    for check in checks:
        if check.result.old_format or not check.result.ok or check.last is None or check.closed:
            continue
        if (check.name, *check.last) in vouched or _is_running(names[check.name]):
            continue
        errors.append(
            f"{check.name} ends at seq {check.last[0]} without a close record: its tail was cut, "
            "or its writer crashed and no later chain starts from this record"
        )
    return TrailResult(checks, errors)


def check_chain(
    folder: Path,
    private_key: X25519PrivateKey | None = None,
    wanted: Collection[int] = (),
    name: str = "",
) -> ChainCheck:
    files = audit_files(folder)
    check = ChainCheck(name or folder.name, VerifyResult(True, 0))
    if not files:
        return check
    first = _first_line(files[0][1])
    if first is not None and _is_old_format(first):
        check.result = _verify_old(files)
        return check
    key = private_key if private_key is not None else _private_key()
    check.result = _verify_keyed(files, key, wanted, check)
    return check


def _verify_keyed(
    files: list[tuple[int, Path]], private_key: X25519PrivateKey, wanted: Collection[int], check: ChainCheck
) -> VerifyResult:
    count, calls, expected_seq, prev = 0, 0, 0, GENESIS  # calls: records other than the trail's own
    pruned_through = 0
    missing_head = files[0][0] - 1  # leading files absent: fine only where retention removed them
    keys: dict[str, bytes] = {}
    record: dict[str, Any] = {}

    def fail(message: str) -> VerifyResult:
        return VerifyResult(False, calls, message)

    for index, (n, path) in enumerate(files):
        if index > 0 and n != files[index - 1][0] + 1:
            return fail(f"{path.name}: file {files[index - 1][0] + 1} is missing")
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            return fail(f"{path.name}: ends in a partial record (truncated)")
        key = b""
        for line_no, line in enumerate(data.splitlines(), start=1):
            at = f"{path.name} line {line_no}"
            try:
                record, core, mac = decode_line(line)
                if line_no == 1:
                    if record.get("event") != FILE_EVENT or record.get("file") != n:
                        return fail(f"{at}: a file must start with its {FILE_EVENT} record")
                    blob = str(record.get("key", ""))
                    keys[blob] = keys.get(blob) or unseal(private_key, blob)
                    key = keys[blob]
                elif record.get("event") == FILE_EVENT:
                    return fail(f"{at}: an {FILE_EVENT} record inside a file")
            except (LineError, ValueError) as exc:
                return fail(f"{at}: {exc}")
            if mac_of(key, core) != mac:
                return fail(f"{at}: mac mismatch, the record was altered or not written by this appliance")
            seq = record["seq"]
            if count == 0 and missing_head:
                expected_seq, prev = seq, record["prev"]  # the retained part starts here
            if line_no == 1:
                link = record.get("after")
                if count and link != check.after:
                    return fail(f"{at}: links the chain to another predecessor than its first file does")
                check.after = link if isinstance(link, dict) else None
            if count == 0 and seq == 0:
                prev = str(check.after["mac"]) if check.after else GENESIS
            if seq != expected_seq:
                return fail(
                    f"{at}: seq {seq} where {expected_seq} was expected (records deleted or reordered)"
                )
            if record["prev"] != prev:
                return fail(f"{at}: does not link to the previous record")
            if record.get("event") == PRUNE_EVENT:
                pruned_through = max(pruned_through, int(record.get("through_file", 0)))
            if seq in wanted:
                check.found[seq] = mac
            expected_seq, prev, count = seq + 1, mac, count + 1
            calls += record.get("event") not in TRAIL_EVENTS
    if missing_head > pruned_through:
        return fail(
            f"files {pruned_through + 1}..{missing_head} are missing (retention removed only files up to "
            f"{pruned_through})"
        )
    if count:
        check.last = (expected_seq - 1, prev)
        check.closed = record.get("event") == CLOSE_EVENT
    return VerifyResult(True, calls)


def _verify_old(files: list[tuple[int, Path]]) -> VerifyResult:
    """The sha256 chain of records that carry ``hash`` (re-hashes the parsed record, as it was)."""
    expected_seq, prev, count = 0, GENESIS, 0
    for index, (n, path) in enumerate(files):
        where = path.name
        if index > 0 and n != files[index - 1][0] + 1:
            return VerifyResult(False, count, f"{where}: file {files[index - 1][0] + 1} is missing", True)
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            return VerifyResult(False, count, f"{where}: ends in a partial record (truncated)", True)
        for line_no, line in enumerate(data.splitlines(), start=1):
            at = f"{where} line {line_no}"
            try:
                record = json.loads(line)
            except ValueError:
                return VerifyResult(False, count, f"{at}: not valid JSON", True)
            if not isinstance(record, dict) or not {"seq", "prev", "hash"} <= record.keys():
                return VerifyResult(False, count, f"{at}: not an audit record (seq/prev/hash missing)", True)
            body = audit_chain.canonical({k: v for k, v in record.items() if k != "hash"})
            if hashlib.sha256(body).hexdigest() != record["hash"]:
                return VerifyResult(False, count, f"{at}: hash mismatch, the record was altered", True)
            if record["seq"] != expected_seq:
                return VerifyResult(
                    False, count, f"{at}: seq {record['seq']} where {expected_seq} was expected", True
                )
            if record["prev"] != prev:
                return VerifyResult(False, count, f"{at}: does not link to the previous record", True)
            expected_seq, prev, count = expected_seq + 1, record["hash"], count + 1
    return VerifyResult(True, count, "", True)


def _private_key() -> X25519PrivateKey:
    return verifier_private_key(key_paths())


def _keyed(folders: list[Path]) -> bool:
    for folder in folders:
        first = _first_line(audit_files(folder)[0][1])
        if first is not None and not _is_old_format(first):
            return True
    return False


def _is_old_format(line: bytes) -> bool:
    return b'"mac":"' not in line and b'"hash":"' in line


def _first_line(path: Path) -> bytes | None:
    with open(path, "rb") as handle:
        line = handle.readline()
    return line.rstrip(b"\n") if line.endswith(b"\n") else None


def _genesis_link(folder: Path) -> Mapping[str, Any] | None:
    files = audit_files(folder)
    if not files:
        return None
    first = _first_line(files[0][1])
    if first is None or _is_old_format(first):
        return None
    try:
        record = decode_line(first)[0]
    except LineError:
        return None
    link = record.get("after")
    return link if isinstance(link, dict) and {"chain", "seq", "mac"} <= link.keys() else None


def _name(root: Path, folder: Path) -> str:
    return folder.relative_to(root).as_posix() if folder != root else "."


def _is_running(folder: Path) -> bool:
    """Whether a writer holds the chain's lock now."""
    lock = folder / ".lock"
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
