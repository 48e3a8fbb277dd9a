"""The keyed audit trail: chaining, rotation and retention, recovery, durability, tamper detection."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import re
import shutil
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.security import audit_chain
from appliance.security.audit import (
    GENESIS,
    AuditError,
    AuditLog,
    AuditSettings,
    audit_files,
    call_records,
    verify,
)
from appliance.security.audit_verify import verify_trail


def write(folder: Path, n: int, max_file_bytes: int = 1 << 20, **limits: int) -> None:
    with AuditLog(folder, AuditSettings(max_file_bytes=max_file_bytes, **limits)) as log:
        for i in range(n):
            log.append({"rpc": "/x/Y", "i": i, "text": "é" * (i % 3)})


def lines(folder: Path) -> list[tuple[Path, list[bytes]]]:
    return [(path, path.read_bytes().splitlines()) for _, path in audit_files(folder)]


def all_records(folder: Path) -> list[dict]:
    return [json.loads(line) for _, chunk in lines(folder) for line in chunk]


def chain_key(line: bytes) -> bytes:
    """The chain key of a file, opened with the private key as only its owner (root) can."""
    header = json.loads(line)
    private = audit_chain.verifier_private_key(audit_chain.key_paths())
    return audit_chain.unseal(private, header["key"])


def test_records_chain_from_genesis_with_a_header_and_a_close_record(audit_dir):
    write(audit_dir, 5)
    records = all_records(audit_dir)
    assert [r["seq"] for r in records] == list(range(7))
    assert records[0]["event"] == audit_chain.FILE_EVENT and records[0]["after"] is None
    assert records[0]["prev"] == GENESIS
    assert records[-1]["event"] == audit_chain.CLOSE_EVENT
    for before, after in itertools.pairwise(records):
        assert after["prev"] == before["mac"]
    assert [r["i"] for r in call_records(audit_dir)] == [0, 1, 2, 3, 4]
    result = verify(audit_dir)
    assert result.ok and result.n_records == 5 and not result.old_format


def test_the_mac_is_keyed_and_covers_the_exact_bytes(audit_dir):
    write(audit_dir, 3)
    ((path, chunk),) = lines(audit_dir)
    key = chain_key(chunk[0])
    record, core, mac = audit_chain.decode_line(chunk[2])
    assert audit_chain.mac_of(key, core) == mac
    assert hashlib.sha256(core).hexdigest() != mac  # a plain hash is not what the chain holds
    # re-MAC an edited record with any key but the chain's: detected
    edited = {**record, "i": 42}
    chunk[2] = audit_chain.encode_line(edited, b"k" * 32)[0]
    path.write_bytes(b"".join(line + b"\n" for line in chunk))
    result = verify(audit_dir)
    assert not result.ok and "mac mismatch" in result.first_error


@pytest.mark.parametrize(
    ("forge", "message"),
    [
        (lambda core: core[:-1] + b',"i":7}', "duplicate key 'i'"),  # JSON parsers keep the last one
        (lambda core: core.replace(b'":', b'": '), "not in canonical form"),
        (lambda core: core.replace(b'"rpc":"/x/Y"', b'"rpc":"\\/x\\/Y"'), "not in canonical form"),
    ],
)
def test_a_correctly_keyed_line_that_is_not_the_writers_bytes_fails(audit_dir, forge, message):
    """Even with the chain key, a line whose bytes are not the canonical form does not verify:
    what verify checks is what is on disk, not what a parser makes of it."""
    write(audit_dir, 3)
    ((path, chunk),) = lines(audit_dir)
    key = chain_key(chunk[0])
    _, core, _ = audit_chain.decode_line(chunk[2])
    forged = forge(core)
    chunk[2] = forged[:-1] + b',"mac":"' + audit_chain.mac_of(key, forged).encode() + b'"}'
    path.write_bytes(b"".join(line + b"\n" for line in chunk))
    result = verify(audit_dir)
    assert not result.ok and message in result.first_error, result.first_error


def test_rotation_continues_the_chain_across_files(audit_dir):
    write(audit_dir, 40, max_file_bytes=1024)
    files = lines(audit_dir)
    assert len(files) > 2
    assert all(path.stat().st_size <= 1024 for path, _ in files)
    assert all(json.loads(chunk[0])["event"] == audit_chain.FILE_EVENT for _, chunk in files)
    assert json.loads(files[1][1][0])["prev"] == json.loads(files[0][1][-1])["mac"]
    result = verify(audit_dir)
    assert result.ok, result.first_error
    assert result.n_records == 40


def test_retention_bounds_files_and_bytes_and_still_verifies(audit_dir):
    write(audit_dir, 200, max_file_bytes=1024, max_files=4)
    assert len(audit_files(audit_dir)) == 4
    assert audit_files(audit_dir)[0][0] > 1
    result = verify(audit_dir)
    assert result.ok, result.first_error
    shutil.rmtree(audit_dir)
    write(audit_dir, 200, max_file_bytes=1024, max_total_bytes=3000)
    assert sum(path.stat().st_size for _, path in audit_files(audit_dir)) <= 3000 + 1024
    assert verify(audit_dir).ok


def test_deleting_more_than_retention_pruned_is_detected(audit_dir):
    write(audit_dir, 200, max_file_bytes=1024, max_files=4)
    audit_files(audit_dir)[0][1].unlink()
    result = verify(audit_dir)
    assert not result.ok and "missing (retention removed only" in result.first_error


def test_reopening_continues_the_chain_in_a_new_file(audit_dir):
    write(audit_dir, 3)
    with AuditLog(audit_dir) as log:
        assert log.head[0] == 5  # header, 3 records, close record, the new file's header
        log.append({"after": "restart"})
    assert len(audit_files(audit_dir)) == 2
    result = verify(audit_dir)
    assert result.ok and result.n_records == 4


def test_torn_last_line_is_cut_on_reopen(audit_dir):
    write(audit_dir, 3)
    path = audit_files(audit_dir)[-1][1]
    with path.open("ab") as handle:
        handle.write(b'{"seq":5,"half')  # a crash in the middle of a write
    assert not verify(audit_dir).ok
    with AuditLog(audit_dir) as log:
        log.append({"after": "crash"})
    result = verify(audit_dir)
    assert result.ok and result.n_records == 4


def test_one_writer_per_folder(audit_dir):
    with AuditLog(audit_dir), pytest.raises(AuditError, match="another process"):
        AuditLog(audit_dir)


def test_reserved_fields_and_closed_log_are_refused(audit_dir):
    log = AuditLog(audit_dir)
    for reserved in ({"hash": "x"}, {"mac": "x"}, {"event": audit_chain.CLOSE_EVENT}):
        with pytest.raises(ValueError, match="set by the trail"):
            log.append(reserved)
    with pytest.raises(TypeError):
        log.append({"value": object()})
    log.close()
    with pytest.raises(AuditError, match="closed"):
        log.append({"late": True})


def test_flush_makes_records_durable_and_visible(audit_dir):
    with AuditLog(audit_dir) as log:
        for i in range(10):
            log.append({"i": i})
        log.flush()
        assert verify(audit_dir).n_records == 10
        assert log.head[0] == 10


def test_concurrent_threads_lose_nothing_even_with_a_tiny_queue(audit_dir):
    per_thread, n_threads = 150, 6
    with AuditLog(audit_dir, AuditSettings(max_file_bytes=4096), queue_size=4) as log:

        def worker(t: int) -> None:
            for i in range(per_thread):
                log.append({"t": t, "i": i})

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    result = verify(audit_dir)
    assert result.ok, result.first_error
    assert result.n_records == per_thread * n_threads
    assert len({(r["t"], r["i"]) for r in call_records(audit_dir)}) == per_thread * n_threads


def test_append_async_returns_once_durable(audit_dir):
    async def scenario(log: AuditLog) -> None:
        await asyncio.gather(*(log.append_async({"i": i}) for i in range(50)))
        # every awaited record is on disk now, without flush()
        assert verify(audit_dir).n_records == 50

    with AuditLog(audit_dir, queue_size=8) as log:
        asyncio.run(scenario(log))


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        ("edit", "mac mismatch"),
        ("delete", "deleted or reordered"),
        ("swap", "deleted or reordered"),
        ("truncate_middle_file", "does not link|deleted or reordered"),
        ("cut_middle_file_mid_line", "partial record"),
        ("drop_middle_file", "missing"),
        ("drop_first_file", "missing"),
        ("garbage", "no mac"),
    ],
)
def test_tampering_is_detected(audit_dir, tamper, message):
    write(audit_dir, 30, max_file_bytes=1000)
    files = lines(audit_dir)
    assert len(files) >= 3
    path, chunk = files[1]
    if tamper == "edit":
        chunk[1] = chunk[1].replace(b'"rpc":"/x/Y"', b'"rpc":"/x/Z"')
    elif tamper == "delete":
        del chunk[1]
    elif tamper == "swap":
        chunk[1], chunk[2] = chunk[2], chunk[1]
    elif tamper == "truncate_middle_file":
        chunk.pop()
    elif tamper == "garbage":
        chunk.insert(1, b"{oops")
    if tamper == "cut_middle_file_mid_line":
        path.write_bytes(path.read_bytes()[:-10])
    elif tamper == "drop_middle_file":
        path.unlink()
    elif tamper == "drop_first_file":
        files[0][0].unlink()
    else:
        path.write_bytes(b"".join(line + b"\n" for line in chunk))
    result = verify(audit_dir)
    assert not result.ok
    assert re.search(message, result.first_error), result.first_error


def test_a_new_chain_starts_from_the_last_head_of_the_previous_one(audit_dir):
    root = audit_dir.parent / "trail"
    write(root / "first", 3)
    write(root / "second", 2)
    previous = all_records(root / "first")[-1]
    genesis = all_records(root / "second")[0]
    assert genesis["after"] == {"chain": "first", "seq": previous["seq"], "mac": previous["mac"]}
    assert genesis["prev"] == previous["mac"]
    trail = verify_trail(root)
    assert trail.ok, trail.errors


# ------------------------------------------------------------------------------ property tests

_values = st.one_of(st.integers(-(10**6), 10**6), st.text(max_size=12), st.booleans(), st.none())
_records = st.lists(
    st.dictionaries(st.sampled_from(["rpc", "model", "code", "caller", "n"]), _values, max_size=4),
    min_size=2,
    max_size=25,
)
_SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _fresh(tmp_path: Path) -> Path:
    folder = tmp_path / "prop"
    shutil.rmtree(folder, ignore_errors=True)
    return folder


@_SETTINGS
@given(records=_records, max_file_bytes=st.integers(150, 2000))
def test_any_written_trail_verifies(tmp_path, audit_dir, records, max_file_bytes):
    folder = _fresh(tmp_path)
    with AuditLog(folder, AuditSettings(max_file_bytes=max_file_bytes)) as log:
        for record in records:
            log.append(record)
    result = verify(folder)
    assert result == type(result)(True, len(records), "")


@_SETTINGS
@given(records=_records, data=st.data())
def test_any_change_before_the_last_record_is_detected(tmp_path, audit_dir, records, data):
    folder = _fresh(tmp_path)
    with AuditLog(folder, AuditSettings(max_file_bytes=600)) as log:
        for record in records:
            log.append(record)
    all_lines = [(path, i) for path, chunk in lines(folder) for i in range(len(chunk))]
    # every record but the newest (the close record): only the trail check vouches for the end
    target_path, target = data.draw(st.sampled_from(all_lines[:-1]))
    chunk = target_path.read_bytes().splitlines()
    action = data.draw(st.sampled_from(["edit", "delete", "swap_next", "duplicate"]))
    if action == "edit":
        record, _, _ = audit_chain.decode_line(chunk[target])
        key = data.draw(st.sampled_from(sorted(k for k in record if k != "v")))
        record[key] = data.draw(
            _values.filter(lambda v, old=record[key]: v != old or type(v) is not type(old))
        )
        chunk[target] = json.dumps(record).encode()
    elif action == "delete":
        del chunk[target]
    elif action == "duplicate":
        chunk.insert(target, chunk[target])
    elif target + 1 < len(chunk):
        chunk[target], chunk[target + 1] = chunk[target + 1], chunk[target]
    else:
        del chunk[target]  # the last line of a middle file: its loss must show in the next file
    target_path.write_bytes(b"".join(line + b"\n" for line in chunk))
    assert not verify(folder).ok
