"""FeedbackService.Correct on the real server: mTLS, the feedback:<model> scope, the audit trail, the
real cascade and SQLite store; the review queue out and back in through the real command.

The server is the security tests' live :class:`ApplianceServer` (real b8 specialist, no Ray), with the
cascade and a FeedbackServicer over its escalation store, texts kept (``store_texts``).
"""

from __future__ import annotations

import csv
import json
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from appliance._proto.appliance.v1 import appliance_pb2 as pb
from appliance.api.feedback import FeedbackServicer
from appliance.api.server import ApplianceServer
from appliance.cli import main
from appliance.router.cascade import Cascade
from appliance.router.cost import CostModel
from appliance.router.escalations import EscalationStore, database_path
from appliance.router.metrics import RouterMetrics
from appliance.security.tokens import TokenStore
from appliance.serve.runtime import RuntimeSettings, ServingRuntime
from appliance.store import ModelStore
from tests.security.test_security_server import (
    MODEL,
    PROBE,
    LiveServer,
    audit_records,
    code_of,
    published_home,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEXTS = ["I lost my card, someone may have stolen it", "what is the exchange rate", "my top up failed"]


class FeedbackServer(LiveServer):
    def __init__(self, home: Path) -> None:
        super().__init__(home, require_client_cert=True)
        self.store: EscalationStore | None = None
        self.router: Cascade | None = None

    def __enter__(self) -> FeedbackServer:
        super().__enter__()
        return self

    async def _start(self) -> int:
        self.store = EscalationStore(database_path(self.home), store_texts=True, strict=False)
        self.router = router = Cascade(
            None, self.store, CostModel(cores=2), RouterMetrics(CollectorRegistry())
        )
        runtime = ServingRuntime(RuntimeSettings(models=(MODEL,)), store=ModelStore(self.home), router=router)
        feedback = FeedbackServicer(self.store, ModelStore(self.home), router.flush)
        self.server = ApplianceServer(runtime, self.settings, feedback=feedback)
        port = await self.server.start()
        await runtime.start()
        if not runtime.is_ready():
            raise RuntimeError(f"{MODEL} did not load")
        return port

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        if self.store is not None:
            self.store.close()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = published_home(tmp_path_factory.getbasetemp())
    database_path(path).unlink(missing_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("APPLIANCE_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def live(home: Path) -> Iterator[FeedbackServer]:
    with FeedbackServer(home) as server:
        yield server


@pytest.fixture(scope="module")
def tokens(home: Path) -> TokenStore:
    return TokenStore(home / "tokens" / "tokens.json")


def correction(request_id: str, item: int, label: str, source: str = "human:alice") -> pb.Correction:
    return pb.Correction(request_id=request_id, item=item, label=label, source=source)


def test_a_correction_by_request_id_is_durable_idempotent_and_audited(
    live: FeedbackServer, tokens: TokenStore, home: Path
) -> None:
    secret = tokens.create("fb-alice", [f"classify:{MODEL}", f"feedback:{MODEL}"])
    before = len(audit_records(live.audit_dir))
    with live.client(secret) as client:
        answered = client.classify(MODEL, TEXTS, policy="specialist_only", request_id="fb-1").results
        right = "card_arrival" if answered[1].label != "card_arrival" else "change_pin"
        # sent at once: the server writes the buffered decision rows before it looks them up
        [first] = client.correct(MODEL, [correction("fb-1", 1, right)]).results
        # on disk when the answer came: another connection sees it
        with closing(sqlite3.connect(database_path(home))) as other:
            stored = other.execute(
                "SELECT corrected_label, source, request_id FROM corrections WHERE id = ?", (first.id,)
            )
            assert stored.fetchall() == [(right, "human:alice", "fb-1")]
        [again] = client.correct(MODEL, [correction("fb-1", 1, right)]).results
    assert (first.duplicate, first.trainable, first.version) == (False, True, 1)
    assert (again.id, again.duplicate) == (first.id, True)
    [got] = [
        c for c in EscalationStore.reader(database_path(home)).iter_corrections(MODEL) if c.id == first.id
    ]
    assert (got.text, got.served_label, got.route) == (TEXTS[1], answered[1].label, "specialist")
    mine = [r for r in audit_records(live.audit_dir)[before:] if str(r["rpc"]).endswith("/Correct")]
    assert [(r["code"], r["model"], r["caller"]["token"]) for r in mine] == [  # type: ignore[index]
        ("OK", MODEL, "fb-alice"),
        ("OK", MODEL, "fb-alice"),
    ]


def test_bad_corrections_get_their_status(live: FeedbackServer, tokens: TokenStore) -> None:
    secret = tokens.create("fb-bob", [f"classify:{MODEL}", f"feedback:{MODEL}"])
    with live.client(secret) as client:
        client.classify(MODEL, [PROBE[0]], policy="specialist_only", request_id="fb-2")

        def send(c: pb.Correction, allow: bool = False) -> pb.CorrectResponse:
            return client.correct(MODEL, [c], allow_new_label=allow)

        assert code_of(lambda: send(correction("no-such-request", 0, PROBE[1]))) == grpc.StatusCode.NOT_FOUND
        assert code_of(
            lambda: send(pb.Correction(escalation_id="f" * 32, label=PROBE[1], source="human:b"))
        ) == (grpc.StatusCode.NOT_FOUND)
        with pytest.raises(grpc.RpcError) as err:
            send(correction("fb-2", 0, "not_a_label"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "is not one of b8:1's 8 labels" in str(err.value.details())
        [new] = send(correction("fb-2", 0, "not_a_label"), allow=True).results
        assert "retrain" in new.note and not new.duplicate
        assert code_of(lambda: send(correction("fb-2", 0, PROBE[1], source="nobody at all"))) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        assert code_of(lambda: client.correct(MODEL, [])) == grpc.StatusCode.INVALID_ARGUMENT


def test_the_feedback_scope_is_needed_and_names_the_model(live: FeedbackServer, tokens: TokenStore) -> None:
    reader = tokens.create("fb-reader", [f"classify:{MODEL}"])
    other = tokens.create("fb-other", ["feedback:other"])
    for secret in (reader, other):
        with live.client(secret) as client:
            denied = code_of(lambda c=client: c.correct(MODEL, [correction("fb-1", 0, PROBE[1])]))
            assert denied == grpc.StatusCode.PERMISSION_DENIED


def test_the_review_queue_goes_out_and_comes_back_in(
    live: FeedbackServer, tokens: TokenStore, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tokens.create("fb-queue", [f"classify:{MODEL}", f"feedback:{MODEL}"])
    unsure = ["purple", "Purple!", "the the the", "hello there"]  # the first two are near-duplicates
    with live.client(secret) as client:
        client.classify(MODEL, unsure, policy="specialist_only", request_id="fb-q")
        client.correct(MODEL, [correction("fb-q", 3, PROBE[1])])  # already corrected: not queued
    assert live.router is not None
    live._run(live.router.flush(), timeout=30)  # the decision rows of specialist answers, written now
    queue = tmp_path / "queue.csv"
    assert main(["feedback", "queue", MODEL, "-o", str(queue), "--max-margin", "1.01"]) == 0
    with queue.open(newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["request_id"] == "fb-q"]
    assert {r["text"] for r in rows} <= set(unsure[:3]) and len(rows) == 2  # one per near-duplicate
    margins = [float(r["margin"]) for r in rows]
    assert margins == sorted(margins)  # least sure first
    for r in rows:
        r["corrected_label"], r["source"] = PROBE[1], "human:carol"
    with queue.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    connection = live.connection(secret)  # the command finds this server, with the queue token
    monkeypatch.setattr("appliance.client.Connection.discover", classmethod(lambda cls, **_: connection))
    assert main(["feedback", "import", str(queue), "--json"]) == 0
    carol = [
        c
        for c in EscalationStore.reader(database_path(home)).iter_corrections(MODEL)
        if c.source == "human:carol"
    ]
    assert sorted(c.text or "" for c in carol) == sorted(r["text"] for r in rows)
    assert main(["feedback", "import", str(queue)]) == 0  # again: duplicates, nothing new
    assert len([c for c in EscalationStore.reader(database_path(home)).iter_corrections(MODEL)
                if c.source == "human:carol"]) == 2  # fmt: skip
    export = tmp_path / "corrections.jsonl"
    assert main(["feedback", "export", "-o", str(export), "--model", MODEL]) == 0
    assert export.read_text().count("human:carol") == 2


def test_the_correct_command_records_through_the_server(
    live: FeedbackServer,
    tokens: TokenStore,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = tokens.create("fb-cli", [f"classify:{MODEL}", f"feedback:{MODEL}"])
    with live.client(secret) as client:
        client.classify(MODEL, [PROBE[0]], policy="specialist_only", request_id="fb-cli")
    connection = live.connection(secret)
    monkeypatch.setattr("appliance.client.Connection.discover", classmethod(lambda cls, **_: connection))
    args = ["feedback", "correct", "--model", MODEL, "--request", "fb-cli", "--label", "change_pin"]
    assert main([*args, "--source", "human:dave", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main([*args, "--source", "human:dave", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (first["duplicate"], again["duplicate"], again["id"]) == (False, True, first["id"])
    assert main([*args, "--source", "human:dave", "--item", "5"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
