"""The escalation store under faults, on the real server: a damaged database and a full disk.

The server is the product's :class:`ApplianceServer` over a :class:`ServingRuntime` with the real
b8 specialist and the real cascade and SQLite store; only the generalist is the scripted stand-in
(scripted_generalist.py), so that which texts escalate is decided by the real specialist alone.
Also here: a KServe call's ``id`` reaches the escalation row it caused.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry
from scripted_generalist import ScriptedGeneralist

from appliance._proto.appliance.v1 import appliance_pb2 as pb
from appliance._proto.appliance.v1 import appliance_pb2_grpc as pb_grpc
from appliance._proto.inference import grpc_service_pb2 as kserve_pb
from appliance._proto.inference import grpc_service_pb2_grpc as kserve_grpc
from appliance.router.cascade import Cascade
from appliance.router.cost import CostModel
from appliance.router.escalations import EscalationStore
from appliance.router.metrics import RouterMetrics
from appliance.serve.runtime import RuntimeSettings, ServingRuntime
from appliance.store import ModelStore
from tests.security.test_security_server import MODEL, PROBE, LiveServer, published_home

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Texts unlike any Banking77 intent; the one the specialist is least sure of is the one that escalates.
CANDIDATES = ("zebra violin marmalade", "the the the", "purple", "quantum tuba", "hello")


class CascadeServer(LiveServer):
    """The live server of the security tests, with the cascade and a store at ``db``."""

    def __init__(self, home: Path, db: Path) -> None:
        super().__init__(home, insecure_loopback=True, auth=False)
        self.db = db
        self.store: EscalationStore | None = None

    async def _start(self) -> int:
        from appliance.api.server import ApplianceServer

        self.store = EscalationStore(self.db, strict=False)  # as appliance.serve.app builds it
        router = Cascade(
            ScriptedGeneralist(), self.store, CostModel(cores=2), RouterMetrics(CollectorRegistry())
        )
        runtime = ServingRuntime(RuntimeSettings(models=(MODEL,)), store=ModelStore(self.home), router=router)
        self.server = ApplianceServer(runtime, self.settings)
        port = await self.server.start()
        await runtime.start()
        if not runtime.is_ready():
            raise RuntimeError(f"{MODEL} did not load; see the log")
        return port

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        if self.store is not None:
            self.store.close()

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)


def classify(channel: grpc.Channel, text: str, policy: int, request_id: str = "") -> pb.Classification:
    stub = pb_grpc.InferenceServiceStub(channel)
    request = pb.ClassifyRequest(model=MODEL, texts=[text], policy=policy, request_id=request_id)
    return stub.Classify(request, timeout=60).results[0]


def rpc_error(call) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql).fetchall()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = published_home(tmp_path_factory.getbasetemp())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("APPLIANCE_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def unsure(home: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A text the specialist answers below its threshold, so that the cascade escalates it."""
    with CascadeServer(home, tmp_path_factory.mktemp("probe") / "e.db") as live, live.channel() as channel:
        threshold = pb_grpc.ModelServiceStub(channel).GetModel(pb.GetModelRequest(model=MODEL)).threshold
        confidence = {t: classify(channel, t, pb.POLICY_SPECIALIST_ONLY).confidence for t in CANDIDATES}
    text = min(confidence, key=confidence.__getitem__)
    assert confidence[text] < threshold, f"no candidate escalates: {confidence} vs threshold {threshold}"
    return text


def test_a_kserve_id_is_the_request_id_of_its_escalation_row(home: Path, unsure: str, tmp_path: Path) -> None:
    db = tmp_path / "escalations.db"
    with CascadeServer(home, db) as live, live.channel() as channel:
        request = kserve_pb.ModelInferRequest(model_name=MODEL, id="abc")
        request.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
            unsure.encode()
        )
        response = kserve_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert response.id == "abc"
    assert rows(db, "SELECT request_id, route FROM escalations") == [("abc", "generalist")]
    assert rows(db, "SELECT request_id FROM decisions") == [("abc",)]


def test_a_damaged_database_refuses_escalations_and_serves_the_rest(
    home: Path, unsure: str, tmp_path: Path
) -> None:
    db = tmp_path / "escalations.db"
    db.write_bytes(os.urandom(8192))  # not an SQLite file at all
    with CascadeServer(home, db) as live, live.channel() as channel:
        for _ in range(2):  # and again, after the first refusal: the server stays up
            assert classify(channel, PROBE[0], pb.POLICY_SPECIALIST_ONLY).label == PROBE[1]
            refused = rpc_error(lambda: classify(channel, unsure, pb.POLICY_CASCADE))
            assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "escalation store unusable: " in refused.details()
            assert "not a database" in refused.details()
        # a confident text needs no record, so the cascade still answers it
        assert classify(channel, PROBE[0], pb.POLICY_CASCADE).route == pb.ROUTE_SPECIALIST


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs for the escalation store's folder (needs root, as in CI and on this box)."""
    folder = tmp_path / "escalations"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path) -> Path:
    """Write a file until the file system is full; returns it (delete it to free the space)."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == 28  # ENOSPC
    return filler


def test_a_full_disk_is_resource_exhausted_and_nothing_acknowledged_is_lost(
    home: Path, unsure: str, small_disk: Path
) -> None:
    db = small_disk / "escalations.db"
    acknowledged: dict[str, str] = {}  # escalation id -> request id
    with CascadeServer(home, db) as live, live.channel() as channel:

        def escalate(n: int) -> pb.Classification:
            result = classify(channel, unsure, pb.POLICY_CASCADE, request_id=f"r{n}")
            assert result.route == pb.ROUTE_GENERALIST and result.escalation_id
            acknowledged[result.escalation_id] = f"r{n}"
            return result

        escalate(0)
        filler = fill(small_disk)
        failures: list[grpc.RpcError] = []
        for n in range(1, 200):  # a write may still fit in a page SQLite holds; soon none does
            try:
                escalate(n)
            except grpc.RpcError as exc:
                failures.append(exc)
                if len(failures) == 3:
                    break
        assert len(failures) == 3, "the full disk never refused an escalation"
        for exc in failures:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert exc.details().startswith("escalation store full: no space left for escalations.db")
        # the server is still up and answers what needs no record
        assert classify(channel, PROBE[0], pb.POLICY_SPECIALIST_ONLY).label == PROBE[1]

        filler.unlink()
        after = escalate(1000)
        assert rows(db, f"SELECT request_id FROM escalations WHERE id = '{after.escalation_id}'") == [
            ("r1000",)
        ]
    stored = dict(rows(db, "SELECT id, request_id FROM escalations"))
    assert stored == acknowledged  # every acknowledged one, and no half-written other
