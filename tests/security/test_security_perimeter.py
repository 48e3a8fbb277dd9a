"""The perimeter end to end: a real grpc.aio server with TLS/mTLS, the interceptor, real tokens."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from perimeter_harness import Client, run, run_server, status_of

from appliance.security import pki, tls
from appliance.security.audit import AuditLog, AuditSettings, call_records, verify
from appliance.security.interceptor import AuthAuditInterceptor, open_prefixes
from appliance.security.tokens import TokenStore

pytestmark = pytest.mark.integration

Code = grpc.StatusCode


def read_records(folder: Path) -> list[dict]:
    return call_records(folder)


def _secure(pki_dir: Path, port: int, client: str | None) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", pki.channel_credentials(pki_dir, client))


@contextlib.asynccontextmanager
async def connected(
    interceptor: AuthAuditInterceptor, pki_dir: Path, *, mtls: bool = False, client: str | None = None
) -> AsyncIterator[grpc.aio.Channel]:
    """A TLS server with ``interceptor`` and a channel to it."""
    async with (
        run_server(interceptor, tls.server_credentials(pki_dir, mtls)) as port,
        _secure(pki_dir, port, client) as channel,
    ):
        yield channel


def test_mtls_without_client_certificate_fails_the_handshake(pki_dir, store, audit_dir):
    token = store.create("ops", ["admin"])

    async def scenario():
        with AuditLog(audit_dir) as audit:
            interceptor = AuthAuditInterceptor(store, audit)
            async with run_server(interceptor, tls.server_credentials(pki_dir, True)) as port:
                async with _secure(pki_dir, port, None) as channel:
                    without_cert = await status_of(Client(channel, token).list_models())
                async with _secure(pki_dir, port, "alice") as channel:
                    with_cert = await status_of(Client(channel, token).list_models())
        return without_cert, with_cert

    assert run(scenario()) == (Code.UNAVAILABLE, Code.OK)


def test_status_codes_for_tokens_and_scopes(pki_dir, store, audit_dir):
    reader = store.create("reader", ["models:read"])
    bank = store.create("bank", ["classify:banking77"])
    anything = store.create("any-classifier", ["classify:*"])
    admin = store.create("root", ["admin"])

    async def scenario():
        with AuditLog(audit_dir) as audit:
            interceptor = AuthAuditInterceptor(store, audit)
            async with connected(interceptor, pki_dir, mtls=True, client="alice") as channel:

                def as_(token):
                    return Client(channel, token)

                return {
                    "no token": await status_of(as_(None).list_models()),
                    "garbage token": await status_of(as_("apl_nope").list_models()),
                    "forged secret": await status_of(as_(reader[:-4] + "AAAA").list_models()),
                    "reader lists": await status_of(as_(reader).list_models()),
                    "reader classifies": await status_of(as_(reader).classify("banking77")),
                    "bank classifies": await status_of(as_(bank).classify("banking77")),
                    "bank, pinned version": await status_of(as_(bank).classify("banking77:3")),
                    "bank, other model": await status_of(as_(bank).classify("intent")),
                    "bank, no model": await status_of(as_(bank).classify("")),
                    "bank via kserve": await status_of(as_(bank).model_infer("banking77")),
                    "bank via kserve, other": await status_of(as_(bank).model_infer("intent")),
                    "wildcard classifies": await status_of(as_(anything).classify("intent")),
                    "wildcard generates": await status_of(as_(anything).generate("a b")),
                    "bank loads": await status_of(as_(bank).load_model("banking77")),
                    "admin loads": await status_of(as_(admin).load_model("banking77")),
                    "admin generates": await status_of(as_(admin).generate("a b c")),
                    "admin, unknown method": await status_of(as_(admin).debug_dump()),
                    "no token, unknown method": await status_of(as_(None).debug_dump()),
                    "app error passes": await status_of(as_(admin).classify("missing")),
                    "admin, unserved method": await status_of(as_(admin).embed("banking77")),
                    "no token, unserved method": await status_of(as_(None).embed("banking77")),
                }

    assert run(scenario()) == {
        "no token": Code.UNAUTHENTICATED,
        "garbage token": Code.UNAUTHENTICATED,
        "forged secret": Code.UNAUTHENTICATED,
        "reader lists": Code.OK,
        "reader classifies": Code.PERMISSION_DENIED,
        "bank classifies": Code.OK,
        "bank, pinned version": Code.OK,
        "bank, other model": Code.PERMISSION_DENIED,
        "bank, no model": Code.PERMISSION_DENIED,
        "bank via kserve": Code.OK,
        "bank via kserve, other": Code.PERMISSION_DENIED,
        "wildcard classifies": Code.OK,
        "wildcard generates": Code.PERMISSION_DENIED,
        "bank loads": Code.PERMISSION_DENIED,
        "admin loads": Code.OK,
        "admin generates": Code.OK,
        "admin, unknown method": Code.PERMISSION_DENIED,
        "no token, unknown method": Code.UNAUTHENTICATED,
        "app error passes": Code.NOT_FOUND,
        "admin, unserved method": Code.UNIMPLEMENTED,
        "no token, unserved method": Code.UNAUTHENTICATED,
    }
    result = verify(audit_dir)
    assert result.ok, result.first_error
    assert result.n_records == 21
    codes = [r["code"] for r in read_records(audit_dir)]
    assert codes[-2:] == ["UNIMPLEMENTED", "UNAUTHENTICATED"]


def test_denial_message_names_the_missing_scope(pki_dir, store, audit_dir):
    bank = store.create("bank", ["classify:banking77"])

    async def scenario():
        with AuditLog(audit_dir) as audit:
            async with connected(AuthAuditInterceptor(store, audit), pki_dir) as channel:
                try:
                    await Client(channel, bank).classify("intent")
                except grpc.aio.AioRpcError as exc:
                    return exc.details()
        return None

    assert run(scenario()) == (
        "token 'bank' lacks scope 'classify:intent' for /appliance.v1.InferenceService/Classify"
    )


def test_revocation_applies_without_restart(pki_dir, tmp_path, audit_dir):
    server_store = TokenStore(tmp_path / "tokens.json")
    cli_store = TokenStore(tmp_path / "tokens.json")  # another process's view
    token = cli_store.create("temp", ["models:read"])

    async def scenario():
        with AuditLog(audit_dir) as audit:
            interceptor = AuthAuditInterceptor(server_store, audit)
            async with connected(interceptor, pki_dir) as channel:
                client = Client(channel, token)
                before = [await status_of(client.list_models()) for _ in range(2)]
                cli_store.revoke("temp")
                after = await status_of(client.list_models())
                late = cli_store.create("late", ["models:read"])
                newcomer = await status_of(Client(channel, late).list_models())
        return before, after, newcomer

    assert run(scenario()) == ([Code.OK, Code.OK], Code.UNAUTHENTICATED, Code.OK)


def test_audit_records_caller_identity_and_request_id(pki_dir, store, audit_dir):
    token = store.create("bank", ["classify:banking77"])

    async def scenario():
        with AuditLog(audit_dir) as audit:
            interceptor = AuthAuditInterceptor(store, audit)
            async with connected(interceptor, pki_dir, mtls=True, client="alice") as channel:
                client = Client(channel, token)
                echoed = await client.classify("banking77", ["my card is lost"], request_id="req-1")
                generated = await client.classify("banking77")
                await status_of(client.classify("intent", ["secret text"]))
                stranger = Client(channel, None)
                stranger.metadata = (("x-request-id", "from-header"),)
                await status_of(stranger.classify("banking77"))
        return echoed, generated

    echoed, generated = run(scenario())
    records = read_records(audit_dir)
    assert [r["code"] for r in records] == ["OK", "OK", "PERMISSION_DENIED", "UNAUTHENTICATED"]
    first = records[0]
    assert first["caller"]["token"] == "bank"
    assert first["caller"]["cert"] == "CN=alice"
    assert first["caller"]["peer"].startswith("ipv4:127.0.0.1:")
    assert first["rpc"] == "/appliance.v1.InferenceService/Classify"
    assert first["model"] == "banking77"
    assert first["request_id"] == echoed.request_id == "req-1"
    assert first["latency_ms"] >= 0
    # a generated id reaches the servicer, so the answer and the trail agree
    assert generated.request_id and records[1]["request_id"] == generated.request_id
    assert records[2]["details"].startswith("token 'bank' lacks scope 'classify:intent'")
    assert records[3]["request_id"] == "from-header"
    assert records[3]["caller"]["token"] is None
    assert all("texts" not in r for r in records)
    assert "my card is lost" not in "".join(p.read_text() for p in audit_dir.glob("*.jsonl"))


def test_audit_texts_when_configured(pki_dir, store, audit_dir):
    token = store.create("all", ["admin"])

    async def scenario():
        with AuditLog(audit_dir) as audit:
            interceptor = AuthAuditInterceptor(store, audit, audit_texts=True)
            async with connected(interceptor, pki_dir) as channel:
                await Client(channel, token).classify("banking77", ["card lost", "refund"])
                await Client(channel, token).generate("tell me")

    run(scenario())
    records = read_records(audit_dir)
    assert records[0]["texts"] == ["card lost", "refund"]
    assert records[1]["texts"] == ["tell me"]
    assert records[1]["rpc"] == "/appliance.v1.GenerationService/Generate"


def test_health_open_only_where_configured(store, audit_dir):
    async def health_status(open_methods):
        with AuditLog(audit_dir) as audit:
            interceptor = AuthAuditInterceptor(store, audit, open_methods=open_methods)
            server = grpc.aio.server(interceptors=[interceptor])
            health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    stub = health_pb2_grpc.HealthStub(channel)
                    return await status_of(stub.Check(health_pb2.HealthCheckRequest(), timeout=20))
            finally:
                await server.stop(None)

    loopback = open_prefixes(bind_address="127.0.0.1:50051")
    public = open_prefixes(bind_address="0.0.0.0:50051")
    assert run(health_status(loopback)) == Code.OK
    assert run(health_status(public)) == Code.UNAUTHENTICATED


def test_no_audit_record_lost_under_concurrent_calls(pki_dir, store, audit_dir):
    good = store.create("bank", ["classify:banking77"])
    n_calls = 240

    async def scenario():
        # a small file limit forces rotations while calls race
        with AuditLog(audit_dir, AuditSettings(max_file_bytes=8 * 1024), queue_size=16) as audit:
            interceptor = AuthAuditInterceptor(store, audit)
            async with connected(interceptor, pki_dir) as channel:
                allowed, stranger = Client(channel, good), Client(channel, None)
                calls = [
                    (allowed if i % 3 else stranger).classify("banking77", request_id=f"r{i}")
                    for i in range(n_calls)
                ]
                return await asyncio.gather(*(status_of(c) for c in calls))

    codes = run(scenario())
    assert codes.count(Code.OK) == n_calls - n_calls // 3
    result = verify(audit_dir)
    assert result.ok, result.first_error
    assert result.n_records == n_calls
    records = read_records(audit_dir)
    assert sorted(r["request_id"] for r in records) == sorted(f"r{i}" for i in range(n_calls))
    assert len(list(audit_dir.glob("audit-*.jsonl"))) > 1


def test_edited_audit_file_fails_verification(pki_dir, store, audit_dir):
    token = store.create("bank", ["classify:banking77"])

    async def scenario():
        with AuditLog(audit_dir) as audit:
            async with connected(AuthAuditInterceptor(store, audit), pki_dir) as channel:
                for _ in range(3):
                    await Client(channel, token).classify("banking77")
                await status_of(Client(channel, None).classify("banking77"))

    run(scenario())
    assert verify(audit_dir).ok
    path = next(audit_dir.glob("audit-*.jsonl"))
    path.write_text(path.read_text().replace('"code":"UNAUTHENTICATED"', '"code":"OK"'))
    result = verify(audit_dir)
    assert not result.ok
    assert "line 5" in result.first_error and "altered" in result.first_error  # line 1: the file header
