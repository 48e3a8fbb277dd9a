"""The hash-chained audit trail: chaining, rotation, recovery, durability and tamper detection."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.security.audit import GENESIS, AuditError, AuditLog, audit_files, record_hash, verify


def write(folder: Path, n: int, max_bytes: int = 1 << 20) -> None:
    with AuditLog(folder, max_bytes=max_bytes) as log:
        for i in range(n):
            log.append({"rpc": "/x/Y", "i": i, "text": "é" * (i % 3)})


def lines(folder: Path) -> list[tuple[Path, list[str]]]:
    return [(path, path.read_text().splitlines()) for _, path in audit_files(folder)]


def test_records_chain_from_genesis(audit_dir):
    write(audit_dir, 5)
    records = [json.loads(line) for _, chunk in lines(audit_dir) for line in chunk]
    assert [r["seq"] for r in records] == [0, 1, 2, 3, 4]
    assert records[0]["prev"] == GENESIS
    for before, after in itertools.pairwise(records):
        assert after["prev"] == before["hash"]
    assert all(record_hash(r) == r["hash"] for r in records)
    assert verify(audit_dir).ok and verify(audit_dir).n_records == 5


def test_rotation_continues_the_chain_across_files(audit_dir):
    write(audit_dir, 40, max_bytes=1024)
    files = lines(audit_dir)
    assert len(files) > 2
    assert all(path.stat().st_size <= 1024 for path, _ in files)
    first_of_second = json.loads(files[1][1][0])
    last_of_first = json.loads(files[0][1][-1])
    assert first_of_second["prev"] == last_of_first["hash"]
    result = verify(audit_dir)
    assert result.ok, result.first_error
    assert result.n_records == 40


def test_reopening_continues_the_chain(audit_dir):
    write(audit_dir, 3)
    with AuditLog(audit_dir) as log:
        assert log.head[0] == 2
        log.append({"after": "restart"})
    result = verify(audit_dir)
    assert result.ok and result.n_records == 4


def test_torn_last_line_is_cut_on_reopen(audit_dir):
    write(audit_dir, 3)
    path = audit_files(audit_dir)[-1][1]
    with path.open("ab") as handle:
        handle.write(b'{"seq":3,"half')  # a crash in the middle of a write
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
    with pytest.raises(ValueError, match="set by the trail"):
        log.append({"hash": "x"})
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
        assert log.head[0] == 9


def test_concurrent_threads_lose_nothing_even_with_a_tiny_queue(audit_dir):
    per_thread, n_threads = 150, 6
    with AuditLog(audit_dir, max_bytes=4096, queue_size=4) as log:

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
    seen = {(r["t"], r["i"]) for _, chunk in lines(audit_dir) for r in map(json.loads, chunk)}
    assert len(seen) == per_thread * n_threads


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
        ("edit", "altered"),
        ("delete", "deleted or reordered"),
        ("swap", "deleted or reordered"),
        ("truncate_middle_file", "does not link|deleted or reordered"),
        ("cut_middle_file_mid_line", "partial record"),
        ("drop_middle_file", "missing"),
        ("drop_first_file", "deleted or reordered"),
        ("garbage", "not valid JSON"),
    ],
)
def test_tampering_is_detected(audit_dir, tamper, message):
    write(audit_dir, 30, max_bytes=700)
    files = lines(audit_dir)
    assert len(files) >= 3
    path, chunk = files[1]
    if tamper == "edit":
        record = json.loads(chunk[1])
        record["rpc"] = "/x/Other"
        chunk[1] = json.dumps(record)
        path.write_text("\n".join(chunk) + "\n")
    elif tamper == "delete":
        path.write_text("\n".join(chunk[:1] + chunk[2:]) + "\n")
    elif tamper == "swap":
        chunk[0], chunk[1] = chunk[1], chunk[0]
        path.write_text("\n".join(chunk) + "\n")
    elif tamper == "truncate_middle_file":
        path.write_text("\n".join(chunk[:-1]) + "\n")
    elif tamper == "cut_middle_file_mid_line":
        path.write_bytes(path.read_bytes()[:-10])
    elif tamper == "drop_middle_file":
        path.unlink()
    elif tamper == "drop_first_file":
        files[0][0].unlink()
    elif tamper == "garbage":
        path.write_text("\n".join([*chunk[:1], "{oops", *chunk[1:]]) + "\n")
    result = verify(audit_dir)
    assert not result.ok
    assert re.search(message, result.first_error), result.first_error


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
@given(records=_records, max_bytes=st.integers(150, 2000))
def test_any_written_trail_verifies(tmp_path, records, max_bytes):
    folder = _fresh(tmp_path)
    with AuditLog(folder, max_bytes=max_bytes) as log:
        for record in records:
            log.append(record)
    result = verify(folder)
    assert result == type(result)(True, len(records), "")


@_SETTINGS
@given(records=_records, data=st.data())
def test_any_change_before_the_last_record_is_detected(tmp_path, records, data):
    folder = _fresh(tmp_path)
    with AuditLog(folder, max_bytes=400) as log:
        for record in records:
            log.append(record)
    all_lines = [(path, i) for path, chunk in lines(folder) for i in range(len(chunk))]
    # every record but the newest: removing only the tail leaves a valid, shorter chain
    target_path, target = data.draw(st.sampled_from(all_lines[:-1]))
    chunk = target_path.read_text().splitlines()
    action = data.draw(st.sampled_from(["edit", "delete", "swap_next", "duplicate"]))
    if action == "edit":
        record = json.loads(chunk[target])
        key = data.draw(st.sampled_from(sorted(record)))
        record[key] = data.draw(
            _values.filter(lambda v, old=record[key]: v != old or type(v) is not type(old))
        )
        chunk[target] = json.dumps(record)
    elif action == "delete":
        del chunk[target]
    elif action == "duplicate":
        chunk.insert(target, chunk[target])
    elif target + 1 < len(chunk):
        chunk[target], chunk[target + 1] = chunk[target + 1], chunk[target]
    else:
        del chunk[target]  # the last line of a middle file: its loss must show in the next file
    target_path.write_text("".join(line + "\n" for line in chunk))
    assert not verify(folder).ok
