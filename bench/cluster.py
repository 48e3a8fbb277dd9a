"""Cluster figures on one machine: throughput on 1, 2 and 3 nodes, CPU per request per node, and
what a client sees while a node is killed under load.

The nodes are network namespaces on a bridge, each with its own ``APPLIANCE_HOME``, one Ray CPU
and a small object store, built by ``tests/helpers/netns_cluster.py`` exactly as the cluster tests
build them (root and ``ip`` needed). The load is the failover client of ``tests/cluster/load.py``
(one channel, round robin, retries of UNAVAILABLE) from a client namespace, on the same texts.

    sudo /tmp/brief/heavy .venv/bin/python bench/cluster.py --smoke       # checks the script
    sudo .venv/bin/python bench/cluster.py --seconds 60 --out bench/cluster_results.json

On one 2-core box three nodes share the same two cores, so the scaling figures say what the
placement and balancing cost, not what three real boxes give; run it on the customer's boxes'
core count per namespace (``taskset``) or on real boxes for capacity planning.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers.netns_cluster import NODES, ApplianceCluster, built_cluster


def _records(path: Path) -> list[dict[str, float | str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _p99_ms(records: list[dict[str, float | str]]) -> float | None:
    latencies = sorted(float(r["end"]) - float(r["start"]) for r in records if r["code"] == "OK")
    return round(latencies[int(0.99 * (len(latencies) - 1))] * 1000, 1) if latencies else None


def throughput(
    cluster: ApplianceCluster, names: list[str], seconds: float, concurrency: int, work: Path
) -> dict[str, object]:
    cpu_before = {name: cluster.cpu_seconds(name) for name in names}
    texts_before = {name: cluster.texts_served(name) for name in names}
    out = work / f"load-{len(names)}.jsonl"
    load = cluster.load(seconds, concurrency, out, max_requests=1_000_000, names=names, pause_s=0.0)
    load.wait(timeout=seconds + 120)
    records = _records(out)
    ok = [r for r in records if r["code"] == "OK"]
    per_node = {}
    for name in names:
        served = cluster.texts_served(name) - texts_before[name]
        cpu = cluster.cpu_seconds(name) - cpu_before[name]
        per_node[name] = {
            "requests": served,
            "cpu_ms_per_request": round(1000 * cpu / served, 2) if served else None,
        }
    return {
        "nodes": len(names),
        "requests_per_s": round(len(ok) / seconds, 1),
        "failed": len(records) - len(ok),
        "p99_ms": _p99_ms(ok),
        "per_node": per_node,
    }


def failover(cluster: ApplianceCluster, seconds: float, concurrency: int, work: Path) -> dict[str, object]:
    out = work / "failover.jsonl"
    load = cluster.load(seconds, concurrency, out, max_requests=1_000_000)
    time.sleep(seconds / 3)
    killed = time.monotonic()  # the same clock as the load's origin
    cluster.kill("w2")
    load.wait(timeout=seconds + 120)
    records = _records(out)
    kill_at = killed - float(records[0]["origin"])  # seconds into the load run
    failed = [r for r in records if r["code"] != "OK"]
    window = [r for r in records if kill_at <= float(r["start"]) <= kill_at + 5]
    last_failure = max((float(r["end"]) for r in failed), default=None)
    return {
        "requests": len(records),
        "failed": len(failed),
        "failed_codes": sorted({str(r["code"]) for r in failed}),
        "p99_ms_during_kill": _p99_ms(window),
        "p99_ms_overall": _p99_ms(records),
        # from the kill to the end of the last failed call: after it, every call succeeded
        "seconds_until_balanced": round(max(0.0, last_failure - kill_at), 2) if last_failure else 0.0,
    }


def head_loss(cluster: ApplianceCluster, seconds: float, concurrency: int, work: Path) -> dict[str, object]:
    """Kill the head (its Ray, the GCS, ``appliance serve``) under load on w1, with no GCS fault
    tolerance: how long w1 keeps answering, and when it stops."""
    out = work / "head-loss.jsonl"
    load = cluster.load(seconds, concurrency, out, max_requests=1_000_000, names=["w1"])
    time.sleep(5.0)
    killed = time.monotonic()
    cluster.kill("head")
    load.wait(timeout=seconds + 120)
    records = _records(out)
    kill_at = killed - float(records[0]["origin"])
    after = [r for r in records if float(r["start"]) > kill_at]
    ok_after = [float(r["end"]) - kill_at for r in after if r["code"] == "OK"]
    failed_after = [float(r["start"]) - kill_at for r in after if r["code"] != "OK"]
    return {
        "requests_after_kill": len(after),
        "ok_after_kill": len(ok_after),
        "last_ok_after_s": round(max(ok_after), 1) if ok_after else None,
        "first_failure_after_s": round(min(failed_after), 1) if failed_after else None,
        "failed_codes": sorted({str(r["code"]) for r in after if r["code"] != "OK"}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="per measurement")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="a few seconds each: checks the script only")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--head-loss-seconds",
        type=float,
        default=0.0,
        help="then kill the head and load the worker this long (past the workers' 60 s GCS reconnect)",
    )
    ns = parser.parse_args()
    seconds, concurrency = (4.0, 2) if ns.smoke else (ns.seconds, ns.concurrency)
    work = Path(tempfile.mkdtemp(prefix="appl-bench-"))
    scaling: list[dict[str, object]] = []
    results: dict[str, object] = {"seconds": seconds, "concurrency": concurrency, "throughput": scaling}
    names = list(NODES)
    with built_cluster(start=("head",)) as cluster:
        for count in range(1, len(names) + 1):
            if count > 1:
                cluster.start_node(names[count - 1])
            cluster.wait_answering(names[:count], timeout=300)
            scaling.append(throughput(cluster, names[:count], seconds, concurrency, work))
            print(json.dumps(scaling[-1]), flush=True)
        results["failover"] = failover(cluster, max(seconds, 9.0), concurrency, work)
        print(json.dumps(results["failover"]), flush=True)
        if ns.head_loss_seconds:
            results["head_loss"] = head_loss(cluster, ns.head_loss_seconds, concurrency, work)
            print(json.dumps(results["head_loss"]), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    if ns.out:
        ns.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
