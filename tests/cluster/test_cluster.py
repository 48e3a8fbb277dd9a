"""Three boxes on Ray (network namespaces on one machine): an ingress on every node, models and
revocations reaching the workers over the cluster, ingress and node loss under load, what a
killed worker acknowledged still on its disk, and a model upgrade and rollback under load.

Each box has its own APPLIANCE_HOME (no shared filesystem), one CPU and a small object store.
The tests run in file order on one cluster; every step is bounded in time and in requests.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from appliance.router.escalations import database_path
from appliance.security.tokens import TokenStore
from appliance.store import ModelStore
from tests.helpers.netns_cluster import BIN, NODES, PORT, SERVER_NAME, ApplianceCluster, built_cluster
from tests.serving.specialists import train_subset

pytestmark = [pytest.mark.slow, pytest.mark.integration]

if os.geteuid() != 0:
    pytest.skip("network namespaces need root", allow_module_level=True)

REVOCATION_BOUND_S = 5.0  # docs/CLUSTER.md: the mirror polls every second; a revocation holds within this
# Decision rows of specialist answers are written within half a second of the answer
# (router/cascade.py FLUSH_INTERVAL_S); an answer older than this at the kill must be on disk.
DECISION_WRITTEN_S = 2.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[ApplianceCluster]:
    with built_cluster(start=tuple(NODES)) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def acknowledged() -> dict[str, object]:
    """What a node acknowledged before it was killed, for the tests after the kill."""
    return {}


def _node_call(cluster: ApplianceCluster, name: str, *args: str) -> dict[str, object]:
    """tests/cluster/node_call.py from the client box against node ``name``'s endpoint alone."""
    script = Path(__file__).with_name("node_call.py")
    ca, token = cluster.homes["head"] / "pki" / "ca.crt", cluster.homes["head"] / "client" / "token"
    argv = [sys.executable, str(script), cluster.endpoint(name), SERVER_NAME, str(ca), str(token), *args]
    done = cluster.net.run("client", argv, cluster.env, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rows(home: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    path = database_path(home)
    if not path.exists():
        return []
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return conn.execute(sql, args).fetchall()


def test_every_node_serves_with_models_it_received_and_verified(cluster: ApplianceCluster) -> None:
    answers = cluster.wait_answering(list(NODES), timeout=240)
    assert set(answers.values()) == {"lost_or_stolen_card"}, answers
    for name in ("w1", "w2"):
        store = ModelStore(cluster.homes[name])
        assert store.versions("b8") == [1], name  # arrived over the cluster: this box had no model
        store.load("b8:1", verify=True)  # hashes and signature hold on this box's own copy
        assert (cluster.homes[name] / "tokens" / "tokens.json").is_file(), name


def test_a_revocation_on_the_head_is_enforced_on_every_node(cluster: ApplianceCluster) -> None:
    store = TokenStore(cluster.homes["head"] / "tokens" / "tokens.json")
    secret = store.create("cluster-probe", ["classify:b8"])
    deadline = time.monotonic() + 30
    while {cluster.probe(name, secret) for name in NODES} != {"lost_or_stolen_card"}:
        assert time.monotonic() < deadline, "a new token did not reach every node"
        time.sleep(0.5)
    store.revoke("cluster-probe")
    revoked_at = time.monotonic()
    refused: dict[str, float] = {}
    while len(refused) < len(NODES) and time.monotonic() - revoked_at < 30:
        for name in NODES:
            if name not in refused and cluster.probe(name, secret) == "UNAUTHENTICATED":
                refused[name] = time.monotonic() - revoked_at
    assert refused.keys() == NODES.keys(), refused
    # each probe is a process start (~1 s on a loaded box), so this bound includes the probes' own time
    assert max(refused.values()) < REVOCATION_BOUND_S + 3 * len(NODES), refused


def _ingress_pid(cluster: ApplianceCluster, name: str) -> int | None:
    for pid in cluster.net.pids(name):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"ServeReplica:appliance:ingress" in title:
            return pid
    return None


def test_a_killed_ingress_is_replaced_on_the_same_node(cluster: ApplianceCluster) -> None:
    pid = _ingress_pid(cluster, "w1")
    assert pid is not None, "no ingress replica process on w1"
    os.kill(pid, 9)
    time.sleep(1)
    # only a process in w1's namespace can answer on w1's address
    cluster.wait_answering(["w1"], timeout=120)
    replacement = _ingress_pid(cluster, "w1")
    assert replacement is not None and replacement != pid


def test_a_worker_acknowledges_a_correction(
    cluster: ApplianceCluster, acknowledged: dict[str, object]
) -> None:
    done = _node_call(cluster, "w2", "correct", "cluster-correction-1")
    assert done["id"] and not done["duplicate"] and done["version"] == 1, done
    acknowledged["correction"] = done


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_losing_a_worker_under_load_fails_only_calls_in_flight(
    cluster: ApplianceCluster, tmp_path: Path, acknowledged: dict[str, object]
) -> None:
    concurrency = 4
    out = tmp_path / "load.jsonl"
    load = cluster.load(seconds=30, concurrency=concurrency, out=out, max_requests=3000)
    time.sleep(8)
    killed = time.monotonic()  # the clock the load's records are relative to (shared by namespaces)
    cluster.kill("w2")
    assert load.wait(timeout=90) == 0, cluster.tail()
    records = _records(out)
    kill_at = killed - float(records[0]["origin"])  # type: ignore[arg-type]
    failed = [r for r in records if r["code"] != "OK"]
    before = [r for r in records if float(r["end"]) < kill_at]  # type: ignore[arg-type]
    after = [r for r in records if float(r["start"]) > kill_at + 5]  # type: ignore[arg-type]
    assert len(before) > 30 and len(after) > 30, (len(before), len(after))  # the kill was mid-load
    # calls on w2 at the moment it died are retried on another node by the channel; at most those fail
    assert len(failed) <= concurrency, failed
    assert all(r["code"] == "OK" for r in after), "not balanced again 5 s after the loss"
    acknowledged["answers"] = {
        str(r["id"])
        for r in before
        if r["code"] == "OK" and float(r["end"]) < kill_at - DECISION_WRITTEN_S  # type: ignore[arg-type]
    }


def test_what_the_killed_worker_acknowledged_is_on_its_disk(
    cluster: ApplianceCluster, acknowledged: dict[str, object]
) -> None:
    """w2 is down (every process killed -9): its own SQLite file holds what it acknowledged."""
    assert not cluster.net.pids("w2")
    correction = acknowledged["correction"]
    assert isinstance(correction, dict)
    rows = _rows(
        cluster.homes["w2"],
        "SELECT c.corrected_label, d.request_id FROM corrections c JOIN decisions d ON d.id = c.decision_id "
        "WHERE c.id = ?",
        correction["id"],
    )
    assert rows == [(correction["label"], correction["request_id"])], rows
    # every answer of the load older than the write delay has its decision row on the node that gave it
    answers = acknowledged["answers"]
    assert isinstance(answers, set) and answers
    recorded = {
        name: {r[0] for r in _rows(home, "SELECT request_id FROM decisions")}
        for name, home in cluster.homes.items()
    }
    assert answers & recorded["w2"], "the killed worker answered none of the load before the kill"
    missing = answers - set().union(*recorded.values())
    assert not missing, f"{len(missing)} of {len(answers)} acknowledged answers have no decision row"


def test_the_worker_rejoining_takes_traffic(cluster: ApplianceCluster, tmp_path: Path) -> None:
    shutil.rmtree(cluster.base / "r-w2", ignore_errors=True)
    cluster.start_node("w2")
    cluster.wait_answering(["w2"], timeout=180)
    before = cluster.texts_served("w2")
    out = tmp_path / "load.jsonl"
    assert cluster.load(seconds=8, concurrency=3, out=out, max_requests=600).wait(timeout=60) == 0
    records = _records(out)
    assert records and all(r["code"] == "OK" for r in records)
    assert cluster.texts_served("w2") > before, "round robin sent the rejoined node nothing"


def test_the_rejoined_worker_still_has_its_correction(
    cluster: ApplianceCluster, acknowledged: dict[str, object]
) -> None:
    correction = acknowledged["correction"]
    assert isinstance(correction, dict)
    again = _node_call(cluster, "w2", "correct", str(correction["request_id"]), str(correction["label"]))
    assert again["duplicate"] and again["id"] == correction["id"], again  # its own row, read back


def _admin_on_the_head(cluster: ApplianceCluster, *args: str) -> None:
    """``appliance ARGS`` on the head box, with its home (the admin token, the head's endpoint)."""
    argv = [
        str(BIN / "appliance"),
        *args,
        "--address",
        f"127.0.0.1:{PORT}",
    ]
    done = cluster.net.run("head", argv, cluster.env, timeout=120)
    assert done.returncode == 0, done.stdout[-1000:] + done.stderr[-2000:]


def _every_node_serves(cluster: ApplianceCluster, version: int, timeout: float) -> list[float]:
    """Wait until each node's own endpoint answers with ``version``; when each did (monotonic)."""
    deadline, reached = time.monotonic() + timeout, {}
    while len(reached) < len(NODES):
        assert time.monotonic() < deadline, f"only {sorted(reached)} serve b8:{version} after {timeout:.0f} s"
        for name in NODES:
            if name not in reached and _node_call(cluster, name, "version") == {"version": version}:
                reached[name] = time.monotonic()
        time.sleep(0.5)
    return list(reached.values())


def test_a_model_upgrade_and_its_rollback_under_load_fail_no_call(
    cluster: ApplianceCluster, tmp_path: Path
) -> None:
    """Publish b8:2 on the head, promote it there, every node follows (verified, warmed, swapped);
    then roll back to b8:1. Load runs through the failover channel all along: no call fails."""
    train_subset(ModelStore(cluster.homes["head"]), "b8", cluster.base / "work-2", seed=1)
    deadline = time.monotonic() + 30
    while not all(2 in ModelStore(home).versions("b8") for home in cluster.homes.values()):
        assert time.monotonic() < deadline, "b8:2 did not reach every node's store"
        time.sleep(0.5)
    out = tmp_path / "load.jsonl"
    load = cluster.load(seconds=30, concurrency=3, out=out, max_requests=6000)
    time.sleep(3)
    _admin_on_the_head(cluster, "promote", "b8:2", "--force")  # the gate is tests/loop's; here the roll
    upgraded = max(_every_node_serves(cluster, 2, timeout=40))
    time.sleep(2)
    rolling_back = time.monotonic()
    _admin_on_the_head(cluster, "rollback", "b8")
    rolled_back = max(_every_node_serves(cluster, 1, timeout=40))
    assert load.wait(timeout=90) == 0, cluster.tail()
    records = _records(out)
    failed = [r for r in records if r["code"] != "OK"]
    assert not failed, failed[:10]
    origin = float(records[0]["origin"])  # type: ignore[arg-type]
    start = {str(r["id"]): float(r["start"]) + origin for r in records}  # type: ignore[arg-type]
    end = {str(r["id"]): float(r["end"]) + origin for r in records}  # type: ignore[arg-type]
    upgraded_only = {
        r["version"] for r in records if upgraded < start[str(r["id"])] and end[str(r["id"])] < rolling_back
    }
    after = {r["version"] for r in records if start[str(r["id"])] > rolled_back}
    assert after, "the load ended before every node had rolled back"
    assert records[0]["version"] == 1 and upgraded_only == {2}, upgraded_only
    assert after == {1}, after  # rolled back on every node, and the load was still running
