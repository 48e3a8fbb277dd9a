"""The perimeter of the real appliance server: mTLS, tokens and scopes, live revocation, the audit
trail and its CLI check, open health and closed reflection.

The server is the product's own :class:`ApplianceServer` over a :class:`ServingRuntime` with a
small real specialist, run on its own event loop in a thread of the test process (no Ray: the
perimeter is the same, and it starts in seconds).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from appliance.api.server import ApplianceServer, ServerSettings
from appliance.client import Client, Connection
from appliance.security import audit
from appliance.security.pki import ensure_local_pki
from appliance.security.tokens import TokenStore
from appliance.serve.runtime import RuntimeSettings, ServingRuntime
from appliance.store import ModelStore
from tests.serving.specialists import train_subset

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "b8"
# A Banking77 test sentence the 8-label specialist answers reliably; a healthy server classifies
# it the same way every time.
PROBE = ("I lost my card, someone may have stolen it", "lost_or_stolen_card")


def published_home(root: Path) -> Path:
    """An APPLIANCE_HOME with the b8 specialist published and the local PKI; built once per
    pytest session (both security server modules share it)."""
    home = root / "security-server-home"
    store = ModelStore(home)
    if not store.versions(MODEL):
        train_subset(store, MODEL, home / "work")
    ensure_local_pki(home / "pki")
    return home


class LiveServer:
    """The product's gRPC server and runtime on a private event loop in a background thread."""

    def __init__(self, home: Path, models: tuple[str, ...] = (MODEL,), **settings: object) -> None:
        self.home = home
        self.models = models
        self.settings = ServerSettings(host="127.0.0.1", port=0, pki_dir=home / "pki", **settings)  # type: ignore[arg-type]
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="live-server", daemon=True)
        self.server: ApplianceServer | None = None
        self.port = 0

    def __enter__(self) -> LiveServer:
        self._thread.start()
        self.port = self._run(self._start(), timeout=600)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self._run(self.server.stop(grace=2.0), timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

    def _run(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> int:
        runtime = ServingRuntime(RuntimeSettings(models=self.models), store=ModelStore(self.home))
        self.runtime = runtime
        self.server = ApplianceServer(runtime, self.settings)
        port = await self.server.start()
        await runtime.start()
        if not runtime.is_ready():
            raise RuntimeError(f"{self.models} did not load: {runtime.start_errors}")
        return port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def audit_dir(self) -> Path:
        """This process's audit chain (the server writes ``audit/<host>-<pid>/``)."""
        return audit.stream_dir(self.home / "audit")

    def connection(self, token: str | None = None, cert: bool = True) -> Connection:
        pki = self.home / "pki"
        return Connection(
            self.address,
            tls=True,
            ca=pki / "ca.crt",
            cert=pki / "clients" / "admin.crt" if cert else None,
            key=pki / "clients" / "admin.key" if cert else None,
            token=token,
        )

    def client(self, token: str | None = None, cert: bool = True) -> Client:
        return Client(self.connection(token, cert))


def audit_records(folder: Path) -> list[dict[str, object]]:
    return audit.call_records(folder)


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real ``appliance`` command, in its own process, against ``home``."""
    env = {**os.environ, "APPLIANCE_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = published_home(tmp_path_factory.getbasetemp())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("APPLIANCE_HOME", str(path))  # the server's token store and audit trail live here
        yield path


@pytest.fixture(scope="module")
def live(home: Path) -> Iterator[LiveServer]:
    with LiveServer(home, require_client_cert=True) as server:
        yield server


@pytest.fixture(scope="module")
def tokens(home: Path) -> TokenStore:
    return TokenStore(home / "tokens" / "tokens.json")


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


# --------------------------------------------------------------------------------------- tests


def test_a_scoped_token_over_mtls_is_served(live: LiveServer, tokens: TokenStore) -> None:
    secret = tokens.create("b8-reader", [f"classify:{MODEL}"])
    with live.client(secret) as client:
        result = client.classify(MODEL, [PROBE[0]]).results[0]
    assert result.label == PROBE[1]


def test_without_a_client_certificate_the_handshake_fails(live: LiveServer, tokens: TokenStore) -> None:
    secret = tokens.create("no-cert", ["admin"])
    with live.client(secret, cert=False) as client:
        code = code_of(lambda: client.classify(MODEL, [PROBE[0]], timeout=10))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_from_another_ca_fails_the_handshake(
    live: LiveServer, tokens: TokenStore, pki_dir: Path
) -> None:
    """``pki_dir`` is a second, unrelated PKI; its client "alice" is unknown to this server."""
    secret = tokens.create("foreign-cert", ["admin"])
    conn = Connection(
        live.address,
        ca=live.home / "pki" / "ca.crt",
        cert=pki_dir / "clients" / "alice.crt",
        key=pki_dir / "clients" / "alice.key",
        token=secret,
    )
    with Client(conn) as client:
        assert code_of(lambda: client.classify(MODEL, [PROBE[0]], timeout=10)) == grpc.StatusCode.UNAVAILABLE


def test_without_a_token_the_call_is_unauthenticated(live: LiveServer) -> None:
    with live.client(token=None) as client:
        assert code_of(lambda: client.classify(MODEL, [PROBE[0]])) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: client.list_models()) == grpc.StatusCode.UNAUTHENTICATED
    with live.client(token="apl_000000000000_" + "x" * 43) as client:  # well-formed, unknown
        assert code_of(lambda: client.classify(MODEL, [PROBE[0]])) == grpc.StatusCode.UNAUTHENTICATED


def test_a_token_for_another_model_is_permission_denied(live: LiveServer, tokens: TokenStore) -> None:
    secret = tokens.create("other-reader", ["classify:other", "embed:*"])
    with live.client(secret) as client:
        assert code_of(lambda: client.classify(MODEL, [PROBE[0]])) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: client.load_model(MODEL)) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: client.list_models()) == grpc.StatusCode.PERMISSION_DENIED
        # the scopes it does hold still work
        assert client.embed(MODEL, [PROBE[0]]).dim > 0


def test_a_token_revoked_while_the_server_runs_is_refused_on_the_next_call(
    live: LiveServer, tokens: TokenStore, home: Path
) -> None:
    secret = tokens.create("soon-revoked", [f"classify:{MODEL}"])
    with live.client(secret) as client:
        assert client.classify(MODEL, [PROBE[0]]).results[0].label == PROBE[1]
        revoked = cli(home, "tokens", "revoke", "soon-revoked")
        assert revoked.returncode == 0, revoked.stderr
        with pytest.raises(grpc.RpcError) as err:
            client.classify(MODEL, [PROBE[0]])
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in err.value.details()


def test_health_is_open_on_loopback(live: LiveServer) -> None:
    with live.client(token=None) as client:
        health = health_pb2_grpc.HealthStub(client.channel)
        request = health_pb2.HealthCheckRequest(service="appliance.v1.InferenceService")
        answer = health.Check(request, timeout=10)  # no token, and no UNAUTHENTICATED
        assert answer.status in (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )


def reflected_services(channel: grpc.Channel, token: str | None) -> set[str]:
    """The services a grpc reflection client lists with ``token`` (None: no token)."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    answers = list(stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10))
    return {s.name for a in answers for s in a.list_services_response.service}


def test_reflection_is_open_to_model_readers_only(live: LiveServer, tokens: TokenStore) -> None:
    admin = tokens.create("reflect-admin", ["admin"])
    reader = tokens.create("reflect-reader", ["models:read"])
    classifier = tokens.create("reflect-classifier", [f"classify:{MODEL}"])
    with live.client(token=None) as client:
        for token in (admin, reader):
            services = reflected_services(client.channel, token)
            assert {"appliance.v1.InferenceService", "inference.GRPCInferenceService"} <= services
        assert code_of(lambda: reflected_services(client.channel, None)) == grpc.StatusCode.UNAUTHENTICATED
        denied = code_of(lambda: reflected_services(client.channel, classifier))
        assert denied == grpc.StatusCode.PERMISSION_DENIED


def test_open_reflection_needs_no_token(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a second server in this process needs an audit trail of its own: same models, other home
    other = tmp_path / "home"
    other.mkdir()
    for part in ("models", "encoders", "keys", "pki"):
        if (home / part).exists():
            (other / part).symlink_to(home / part)
    monkeypatch.setenv("APPLIANCE_HOME", str(other))
    with LiveServer(other, open_reflection=True) as server, server.client(token=None, cert=False) as client:
        assert "appliance.v1.ModelService" in reflected_services(client.channel, None)


def test_the_audit_trail_holds_every_decision_and_verifies(
    live: LiveServer, tokens: TokenStore, home: Path, tmp_path: Path
) -> None:
    before = len(audit_records(live.audit_dir))
    secret = tokens.create("audited", [f"classify:{MODEL}"])
    with live.client(secret) as client:
        client.classify(MODEL, [PROBE[0]], request_id="audit-ok")
        assert code_of(lambda: client.get_model(MODEL)) == grpc.StatusCode.PERMISSION_DENIED
    with live.client(token=None) as client:
        assert code_of(lambda: client.classify(MODEL, [PROBE[0]])) == grpc.StatusCode.UNAUTHENTICATED
    records = audit_records(live.audit_dir)
    mine = records[before:]
    assert [(r["rpc"].rsplit("/", 1)[-1], r["code"]) for r in mine] == [  # type: ignore[union-attr]
        ("Classify", "OK"),
        ("GetModel", "PERMISSION_DENIED"),
        ("Classify", "UNAUTHENTICATED"),
    ]
    assert mine[0]["request_id"] == "audit-ok" and mine[0]["model"] == MODEL
    assert [r["caller"]["token"] for r in mine] == ["audited", "audited", None]  # type: ignore[index]
    assert all(r["caller"]["cert"] == "CN=admin" for r in mine)  # type: ignore[index]

    ok = cli(home, "audit", "verify")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"{len(records)} records, chain intact" in ok.stdout

    # The same chain with one record's outcome rewritten no longer verifies.
    copy = tmp_path / "audit-copy"
    shutil.copytree(live.audit_dir, copy, ignore=shutil.ignore_patterns(".lock"))
    # (a chain reopened by the same process id goes on in a new file: look in every file)
    first = next(p for _, p in audit.audit_files(copy) if b'"code":"PERMISSION_DENIED"' in p.read_bytes())
    lines = first.read_bytes().splitlines(keepends=True)
    victim = next(i for i, line in enumerate(lines) if b'"code":"PERMISSION_DENIED"' in line)
    lines[victim] = lines[victim].replace(b'"code":"PERMISSION_DENIED"', b'"code":"OK"')
    first.write_bytes(b"".join(lines))
    broken = cli(home, "audit", "verify", "--dir", str(copy))
    assert broken.returncode == 1
    assert "mac mismatch" in broken.stderr
