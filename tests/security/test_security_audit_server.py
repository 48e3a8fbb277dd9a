"""The real server's audit trail under attack and under a full disk.

- Anyone who can connect controls the method path, metadata and request fields: what lands in the
  trail is clipped to the stated bounds, however long they are.
- The audit folder is a real 2 MiB tmpfs that fills up: calls are refused UNAVAILABLE with the
  reason, health says NOT_SERVING, and both recover by themselves once space returns, with no
  answered call missing from the trail.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_security_server import MODEL, PROBE, LiveServer, cli, published_home

from appliance.security import audit_chain
from appliance.security.audit import AuditSettings, call_records, stream_dir
from appliance.security.tokens import TokenStore
from tests.helpers.tmpfs import fill, small_tmpfs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# the longest a clipped field can be: the bound plus the note saying how much was cut
CLIPPED_MAX = audit_chain.MAX_FIELD_CHARS + len("...[999999 more characters]")


@pytest.fixture
def fresh_home(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A home of its own (own tokens, own audit folder) with the published specialist linked in."""
    source = published_home(tmp_path_factory.getbasetemp())
    home = tmp_path / "home"
    home.mkdir()
    for part in ("models", "encoders", "keys", "pki"):
        if (source / part).exists():
            (home / part).symlink_to(source / part)
    monkeypatch.setenv("APPLIANCE_HOME", str(home))
    return home


def wait_for(condition: Callable[[], bool], seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def classified(chain: Path) -> list[str]:
    """The request ids of the Classify calls the trail holds as answered."""
    return [
        str(r["request_id"])
        for r in call_records(chain)
        if str(r["rpc"]).endswith("/Classify") and r["code"] == "OK"
    ]


def health_of(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_caller_controlled_fields_are_clipped_in_the_record(fresh_home: Path) -> None:
    long_method = "/made.Up/" + "M" * 5000  # grpc refuses headers over 8 KiB in all
    with LiveServer(fresh_home) as live:
        options = [("grpc.primary_user_agent", "agent-" + "A" * 1000)]
        connection = live.connection(token=None)
        channel = grpc.secure_channel(live.address, connection.credentials(), options=options)
        with channel:
            call = channel.unary_unary(long_method)
            with pytest.raises(grpc.RpcError) as err:
                call(b"", metadata=(("x-request-id", "R" * 1000),), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        records = call_records(live.audit_dir)
    mine = [r for r in records if str(r["rpc"]).startswith("/made.Up/")]
    assert len(mine) == 1
    record = mine[0]
    assert record["code"] == "UNAUTHENTICATED"
    assert len(record["rpc"]) <= CLIPPED_MAX and "more characters]" in record["rpc"]
    assert len(record["request_id"]) <= CLIPPED_MAX
    assert record["caller"]["agent"].startswith("agent-AAA") and len(record["caller"]["agent"]) <= CLIPPED_MAX
    assert len(record["caller"]["peer"]) <= CLIPPED_MAX
    line = next(p for p in live.audit_dir.glob("audit-*.jsonl")).read_bytes().splitlines()
    assert max(len(x) for x in line) < 4096  # one hostile call cannot write kilobytes


@pytest.fixture
def full_disk_server(fresh_home: Path, request: pytest.FixtureRequest) -> Iterator[tuple[LiveServer, str]]:
    """A server whose audit folder is a 2 MiB tmpfs; ``request.param`` is the free-space watermark.
    Texts are audited, so that one call's record can be larger than a page of the tmpfs."""
    settings = AuditSettings(min_free_bytes=request.param, max_file_bytes=256 * 1024, poll_seconds=0.1)
    secret = TokenStore(fresh_home / "tokens" / "tokens.json").create("disk", [f"classify:{MODEL}"])
    with small_tmpfs(fresh_home / "audit"), LiveServer(fresh_home, audit=settings, audit_texts=True) as live:
        yield live, secret


@pytest.mark.parametrize("full_disk_server", [512 * 1024], indirect=True)
def test_below_the_watermark_calls_are_refused_and_health_fails_until_space_returns(
    full_disk_server: tuple[LiveServer, str], fresh_home: Path
) -> None:
    live, secret = full_disk_server
    with live.client(secret) as client:
        assert client.classify(MODEL, [PROBE[0]], request_id="before").results[0].label == PROBE[1]
        assert wait_for(lambda: health_of(client.channel) == SERVING)
        filler = fill(fresh_home / "audit")
        assert wait_for(lambda: health_of(client.channel) == NOT_SERVING)
        assert health_of(client.channel, "appliance.v1.ModelService") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            client.classify(MODEL, [PROBE[0]], request_id="refused")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details().startswith("audit cannot be written: ")
        assert "watermark" in err.value.details()
        filler.unlink()
        assert wait_for(lambda: health_of(client.channel) == SERVING)
        assert client.classify(MODEL, [PROBE[0]], request_id="after").results[0].label == PROBE[1]
    assert classified(live.audit_dir) == ["before", "after"]
    verified = cli(fresh_home, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.parametrize("full_disk_server", [0], indirect=True)
def test_a_call_admitted_as_the_disk_fills_is_answered_once_its_record_is_written(
    full_disk_server: tuple[LiveServer, str], fresh_home: Path
) -> None:
    """No watermark: the disk really fills under a call already admitted. That call waits for
    its record (never answered unrecorded), later calls are refused, and all recover."""
    live, secret = full_disk_server
    with live.client(secret) as client:
        assert client.classify(MODEL, [PROBE[0]], request_id="before").results[0].label == PROBE[1]
        assert wait_for(lambda: health_of(client.channel) == SERVING)
        filler = fill(fresh_home / "audit")
        answers: list[str] = []
        admitted = threading.Thread(
            target=lambda: answers.append(
                client.classify(MODEL, [PROBE[0]] * 128, request_id="X" * 200, timeout=120).results[0].label
            )
        )
        admitted.start()
        assert live.server is not None
        assert wait_for(lambda: live.server.audit_problem() is not None)  # its record met the full disk
        assert wait_for(lambda: health_of(client.channel) == NOT_SERVING)
        assert answers == []  # its record is not on disk: no answer yet
        with pytest.raises(grpc.RpcError) as err:
            client.classify(MODEL, [PROBE[0]], request_id="refused")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "audit cannot be written: No space left on device" in err.value.details()
        filler.unlink()
        admitted.join(60)
        assert answers == [PROBE[1]]
        assert wait_for(lambda: health_of(client.channel) == SERVING)
        assert client.classify(MODEL, [PROBE[0]], request_id="after").results[0].label == PROBE[1]
    assert classified(stream_dir(fresh_home / "audit")) == ["before", "X" * 200, "after"]
