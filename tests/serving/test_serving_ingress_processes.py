"""Several ingress processes of one node on one port, and what each owes the audit trail.

Real server processes (``bench.ingress_server``: the product's runtime and gRPC server, TLS,
tokens and the durable audit trail on), no Ray:

- two processes bind the same port (SO_REUSEPORT) and both answer calls; each call lands in the
  chain of the process that answered it, which is how the test tells them apart;
- a process SIGKILLed right after answering has every answered call in its chain, which verifies;
- and the product path: a local ``appliance serve`` start with ``ingress_per_node: 2`` runs two
  Ray Serve ingress replicas that both answer on the one port.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from appliance.client import Client, Connection
from appliance.security.audit import call_records, verify
from bench.ingress_server import Ingress, started
from tests.helpers.serving import MODEL

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEXT = "I lost my card, someone may have stolen it"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def connection(home: Path, address: str) -> Connection:
    token = (home / "client" / "token").read_text().strip()
    return Connection(address, tls=True, ca=home / "pki" / "ca.crt", token=token)


def chain_of(home: Path, pid: int) -> Path:
    return home / "audit" / f"{socket.gethostname()}-{pid}"  # the chain that process wrote


def answered_ids(chain: Path) -> set[str]:
    return {
        str(r["request_id"])
        for r in call_records(chain)
        if str(r["rpc"]).endswith("/Classify") and r["code"] == "OK"
    }


@pytest.fixture
def two_on_one_port(home: Path) -> Iterator[list[Ingress]]:
    with started(home, [MODEL], free_port(), count=2) as processes:
        yield processes


def test_two_ingress_processes_share_one_port_and_both_answer(
    home: Path, two_on_one_port: list[Ingress]
) -> None:
    first, second = two_on_one_port
    assert first.address == second.address and first.pid != second.pid
    sent: list[str] = []
    # the kernel spreads connections, not calls: a fresh channel per call
    for n in range(40):
        request_id = f"reuseport-{n}"
        with Client(connection(home, first.address)) as client:
            assert client.classify(MODEL, [TEXT], request_id=request_id).results[0].label
        sent.append(request_id)
    per_process = {p.pid: answered_ids(chain_of(home, p.pid)) & set(sent) for p in two_on_one_port}
    assert all(per_process.values()), f"one process answered nothing: {per_process}"
    assert set.union(*per_process.values()) == set(sent)  # each call in exactly one chain ...
    assert sum(len(ids) for ids in per_process.values()) == len(sent)  # ... not in both


def test_the_port_keeps_answering_when_one_process_dies(home: Path, two_on_one_port: list[Ingress]) -> None:
    first, second = two_on_one_port
    os.kill(first.pid, signal.SIGKILL)
    first.child.wait(timeout=30)
    for n in range(5):
        with Client(connection(home, second.address)) as client:
            assert client.classify(MODEL, [TEXT], request_id=f"survivor-{n}").results[0].label
    assert {f"survivor-{n}" for n in range(5)} <= answered_ids(chain_of(home, second.pid))


def test_every_call_answered_before_a_kill_9_is_in_the_chain(home: Path) -> None:
    answered: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def caller(worker: int, address: str) -> None:
        with Client(connection(home, address)) as client:
            n = 0
            while not stop.is_set():
                request_id = f"kill9-{worker}-{n}"
                try:
                    client.classify(MODEL, [TEXT], request_id=request_id, timeout=5.0)
                except grpc.RpcError:
                    return  # the server is gone
                with lock:
                    answered.append(request_id)
                n += 1

    with started(home, [MODEL], 0) as (ingress,):
        workers = [threading.Thread(target=caller, args=(w, ingress.address)) for w in range(8)]
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 60
        while len(answered) < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(ingress.pid, signal.SIGKILL)  # while calls are in flight, right after answers
        ingress.child.wait(timeout=30)
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
    assert len(answered) >= 200
    chain = chain_of(home, ingress.pid)
    missing = set(answered) - answered_ids(chain)
    assert not missing, f"{len(missing)} answered calls are not in the trail, e.g. {sorted(missing)[:3]}"
    result = verify(chain)
    assert result.ok, result.first_error


def test_a_local_serve_runs_ingress_per_node_replicas_on_one_port(home: Path) -> None:
    """The product path: `appliance serve`'s local Ray advertises the node's ingress count and
    Serve runs that many ingress replicas, all answering on the one configured port."""
    import ray
    from ray import serve

    from appliance.serve.app import APP_NAME, AppArgs
    from appliance.serve.lifecycle import running, wait_until_ready

    args = AppArgs(
        host="127.0.0.1",
        port=free_port(),
        home=str(home),
        models=[MODEL],
        ingress_per_node=2,
        ingress_cpus=0.5,
        metrics_port=0,
    )
    answered: list[str] = []
    with running(args, num_cpus=2) as live:
        assert ray.cluster_resources().get("appliance_ingress") == 2
        assert wait_until_ready(timeout=180)
        # each replica read its node's count: 2 processes, 1 core's worth of batches each
        assert serve.get_app_handle(APP_NAME).address.remote().result()["ingress_on_node"] == 2
        address = f"127.0.0.1:{live.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(answered) < 40:
            request_id = f"replicas-{len(answered)}"
            try:
                with Client(connection(home, address)) as client:  # a new connection per call
                    client.classify(MODEL, [TEXT], request_id=request_id)
            except grpc.RpcError as exc:  # the second replica may still be warming up
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                time.sleep(0.5)
            else:
                answered.append(request_id)
        chains = [c for c in (home / "audit").iterdir() if c.is_dir() and answered_ids(c) & set(answered)]
    assert len(answered) == 40
    assert len(chains) == 2, f"calls answered by {len(chains)} process(es)"
