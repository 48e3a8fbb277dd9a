"""The audit trail against a disk that fills up, and ``appliance audit verify`` (the real command,
in its own process) against cut, deleted and old-format chains."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.security import audit_chain
from appliance.security.audit import AuditError, AuditLog, AuditSettings, audit_files, call_records, verify
from tests.helpers.tmpfs import fill, small_tmpfs


def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_a_full_disk_holds_records_until_space_returns(tmp_path, audit_dir):
    """No watermark: the disk really fills. Records already accepted wait, unacknowledged, while
    the writer retries; once space returns they are written, in order, and the reason clears."""
    with small_tmpfs(tmp_path / "disk") as disk:
        settings = AuditSettings(min_free_bytes=0, poll_seconds=0.05)
        with AuditLog(disk / "chain", settings) as log:
            log.append({"i": 0})
            log.flush(timeout=5)
            filler = fill(disk)
            for i in range(1, 200):  # a few KiB: more than the page the last write may have found
                log.append({"i": i, "pad": "x" * 64})
            with pytest.raises(AuditError, match="timed out"):
                log.flush(timeout=1)
            assert log.unavailable is not None and "No space left" in log.unavailable
            flushed = threading.Thread(target=log.flush, kwargs={"timeout": 30})
            flushed.start()
            filler.unlink()
            flushed.join(30)
            assert not flushed.is_alive()
            assert wait_for(lambda: log.unavailable is None)
        result = verify(disk / "chain")
        assert result.ok, result.first_error
        assert [r["i"] for r in call_records(disk / "chain")] == list(range(200))


def test_below_the_watermark_the_trail_says_so_and_recovers_by_itself(tmp_path, audit_dir):
    with small_tmpfs(tmp_path / "disk") as disk:
        settings = AuditSettings(min_free_bytes=512 * 1024, poll_seconds=0.05)
        with AuditLog(disk / "chain", settings) as log:
            assert wait_for(lambda: log.unavailable is None)
            filler = fill(disk)
            assert wait_for(lambda: log.unavailable is not None)
            assert "below the 524288-byte watermark" in str(log.unavailable)
            log.append({"admitted": "before the refusal"})  # room is kept for calls already accepted
            log.flush(timeout=5)
            filler.unlink()
            assert wait_for(lambda: log.unavailable is None)
        assert verify(disk / "chain").n_records == 1


def test_a_writer_started_on_a_full_disk_waits_for_space_instead_of_failing(tmp_path, audit_dir):
    """A server restarted onto a full disk must not crash-loop: it refuses calls until space returns."""
    with small_tmpfs(tmp_path / "disk") as disk:
        (disk / "chain").mkdir()
        filler = fill(disk)
        settings = AuditSettings(min_free_bytes=0, poll_seconds=0.05)
        with AuditLog(disk / "chain", settings) as log:
            assert log.unavailable is not None and "No space left" in log.unavailable
            filler.unlink()
            assert wait_for(lambda: log.unavailable is None)  # no record needed to notice
            log.append({"after": "space returned"})
        result = verify(disk / "chain")
        assert result.ok and result.n_records == 1, result.first_error


# ---------------------------------------------------------------------------- the real CLI


def audit_verify(home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "APPLIANCE_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", "audit", "verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def trail(home: Path) -> Path:
    """Three chains written one after the other, as three server processes would."""
    root = home / "audit"
    for n, name in enumerate(["host-101", "host-102", "host-103"]):
        with AuditLog(root / name, AuditSettings(max_file_bytes=2048)) as log:
            for i in range(10 + n):
                log.append({"rpc": "/appliance.v1.InferenceService/Classify", "i": i})
    return root


def test_an_intact_trail_verifies(home, trail):
    done = audit_verify(home)
    assert done.returncode == 0, done.stderr
    assert "3 chain(s) verified" in done.stdout and "host-103: OK, 12 records" in done.stdout


def cut_last_records(chain: Path, n: int) -> None:
    path = audit_files(chain)[-1][1]
    kept = path.read_bytes().splitlines(keepends=True)[:-n]
    path.write_bytes(b"".join(kept))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root: cut_last_records(root / "host-103", 2), "host-103 ends at seq"),
        (lambda root: cut_last_records(root / "host-101", 3), "chain host-101 has no record seq"),
        (
            lambda root: shutil.rmtree(root / "host-101"),
            "host-102 starts after chain host-101, which is missing",
        ),
        (
            lambda root: shutil.rmtree(root / "host-102"),
            "host-103 starts after chain host-102, which is missing",
        ),
        (lambda root: shutil.rmtree(root / "host-103"), "LATEST names chain host-103, which is missing"),
    ],
    ids=["newest-tail-cut", "older-tail-cut", "first-deleted", "middle-deleted", "newest-deleted"],
)
def test_a_cut_tail_or_a_deleted_chain_fails_verify(home, trail, damage, message):
    damage(trail)
    done = audit_verify(home)
    assert done.returncode == 1, done.stdout
    assert message in done.stderr, done.stderr


def test_a_trail_in_the_old_format_still_verifies_and_says_so(home):
    chain = home / "audit" / "host-7"
    chain.mkdir(parents=True)
    prev, lines = "0" * 64, []
    for seq in range(3):
        record = {"rpc": "/a/B", "seq": seq, "prev": prev}
        record["hash"] = prev = hashlib.sha256(audit_chain.canonical(record)).hexdigest()
        lines.append(json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n")
    (chain / "audit-000001.jsonl").write_text("".join(lines))
    done = audit_verify(home)
    assert done.returncode == 0, done.stderr
    assert "host-7: OK, 3 records, chain intact (old format" in done.stdout
    (chain / "audit-000001.jsonl").write_text("".join(lines).replace('"/a/B"', '"/a/C"', 1))
    broken = audit_verify(home)
    assert broken.returncode == 1 and "hash mismatch" in broken.stderr


def test_init_key_makes_a_private_key_only_its_owner_reads(home):
    env = {**os.environ, "APPLIANCE_HOME": str(home)}
    done = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "audit", "init-key"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    paths = audit_chain.key_paths(home / "keys")
    assert paths.private.stat().st_mode & 0o777 == 0o400
    assert paths.public.stat().st_mode & 0o777 == 0o444
    with AuditLog(home / "audit" / "c") as log:
        log.append({"i": 1})
    trail_bytes = b"".join(p.read_bytes() for _, p in audit_files(home / "audit" / "c"))
    header = json.loads(trail_bytes.splitlines()[0])
    chain_key = audit_chain.unseal(audit_chain.verifier_private_key(paths), header["key"])
    assert chain_key.hex().encode() not in trail_bytes  # the chain key is on disk only sealed
    assert base64.b64encode(chain_key) not in trail_bytes
    assert audit_verify(home).returncode == 0
