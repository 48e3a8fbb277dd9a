"""Certificates on a running server: renewed without a restart, watched for expiry, revoked.

The server is the product's :class:`ApplianceServer` (TLS or mTLS, tokens, audit) over the
keyword stand-in backend, on its own event loop in a thread; the PKI is changed through the real
``appliance pki`` command in its own process, and each check opens a new TLS handshake.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2

from appliance.api.server import INFERENCE_SERVICES, ApplianceServer, ServerSettings
from appliance.client import Client, Connection
from appliance.errors import InvalidArgument
from appliance.security import audit, pki
from appliance.security.tokens import TokenStore
from appliance.serve.metrics import ServingMetrics
from tests.api.standin import MODEL, KeywordBackend

Code = grpc.StatusCode


# ------------------------------------------------------------------------------------ harness


class Running:
    """An :class:`ApplianceServer` on a private event loop in a background thread."""

    def __init__(self, settings: ServerSettings) -> None:
        self.metrics = ServingMetrics()
        self.server = ApplianceServer(KeywordBackend(), settings, metrics=self.metrics)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="cert-server", daemon=True)

    def __enter__(self) -> Running:
        self._thread.start()
        self.call(self.server.start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.call(self.server.stop(grace=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

    def call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def health(self, service: str) -> int:
        """The health servicer's answer, asked in-process: a client could not even complete the
        handshake with an expired certificate."""
        request = health_pb2.HealthCheckRequest(service=service)
        return self.call(self.server.health.Check(request, None)).status

    def expiry_gauge(self, certificate: str) -> float | None:
        return self.metrics.registry.get_sample_value(
            "appliance_certificate_expiry_seconds", {"certificate": certificate}
        )


def presented_serial(address: str, folder: Path, client: str | None = "alice") -> int:
    """The serial number of the certificate the server presents in a new TLS handshake."""
    context = ssl.create_default_context(cafile=str(folder / "ca.crt"))
    context.set_alpn_protocols(["h2"])
    if client is not None:
        context.load_cert_chain(folder / "clients" / f"{client}.crt", folder / "clients" / f"{client}.key")
    host, port = address.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def file_serial(path: Path) -> int:
    return pki.load_certificate(path).serial_number


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "APPLIANCE_HOME": str(home)}
    done = subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done


def eventually(check: Callable[[], bool], timeout: float = 20.0) -> float:
    """Seconds until ``check()`` held; fails after ``timeout``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            pytest.fail(f"not true within {timeout} s")
        time.sleep(0.1)
    return time.monotonic() - started


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details() or ""


@pytest.fixture
def folder(home: Path) -> Path:
    """A fresh PKI in this test's APPLIANCE_HOME (where the server's tokens and audit live too)."""
    base = home / "pki"
    pki.init_ca(base)
    for name in ("alice", "bob"):
        pki.issue_client(base, name)
    return base


@pytest.fixture
def token(home: Path) -> str:
    return TokenStore().create("cert-tests", [f"classify:{MODEL}"])


def connection(address: str, folder: Path, token: str, client: str | None = "alice") -> Connection:
    cert, key = pki.client_paths(folder, client) if client else (None, None)
    return Connection(address, ca=folder / "ca.crt", cert=cert, key=key, token=token)


def settings(folder: Path, **overrides: object) -> ServerSettings:
    return ServerSettings(host="127.0.0.1", port=0, pki_dir=folder, **overrides)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the PKI itself (fast)


def test_a_validity_sets_the_certificate_lifetime_and_renewal_keeps_the_hosts(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    cert_path, _ = pki.issue_server(tmp_path, ["box.example", "10.0.0.7"], dt.timedelta(hours=2))
    first = pki.load_certificate(cert_path)
    lifetime = first.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(hours=1, minutes=59) < lifetime <= dt.timedelta(hours=2)

    assert pki.renew_server(tmp_path) == ["box.example", "10.0.0.7"]
    renewed = pki.load_certificate(cert_path)
    assert renewed.serial_number != first.serial_number
    assert renewed.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=800)
    sans = renewed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["box.example"]
    with pytest.raises(InvalidArgument, match="positive"):
        pki.issue_client(tmp_path, "x", dt.timedelta(0))


def test_revoking_a_client_twice_lists_it_once_in_a_crl_the_ca_signed(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    alice, _ = pki.issue_client(tmp_path, "alice")
    bob, _ = pki.issue_client(tmp_path, "bob")
    assert pki.revoke_client(tmp_path, "alice") == file_serial(alice)
    pki.revoke_client(tmp_path, "bob")
    pki.revoke_client(tmp_path, "alice")
    crl = pki.load_crl(pki.crl_path(tmp_path), pki.load_certificate(tmp_path / "ca.crt"))
    assert sorted(entry.serial_number for entry in crl) == sorted([file_serial(alice), file_serial(bob)])

    other = tmp_path / "other"
    pki.init_ca(other)
    with pytest.raises(InvalidArgument, match="not signed by the CA"):
        pki.load_crl(pki.crl_path(tmp_path), pki.load_certificate(other / "ca.crt"))


# ------------------------------------------------------------------- on a running server


@pytest.mark.integration
def test_a_renewed_server_certificate_is_presented_without_a_restart(
    home: Path, folder: Path, token: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="appliance.security.tls")
    pki.issue_server(folder, list(pki.LOCAL_HOSTS), dt.timedelta(days=2))
    old = file_serial(folder / "server.crt")
    with Running(settings(folder, cert_warn_days=30)) as live:
        assert presented_serial(live.address, folder) == old
        left = live.expiry_gauge("server")
        assert left is not None and dt.timedelta(days=1, hours=23).total_seconds() < left <= 2 * 86400
        ca_left = live.expiry_gauge("ca")
        assert ca_left is not None and ca_left > 3000 * 86400
        assert any(
            "server certificate" in r.message and "expires in 1 days" in r.message for r in caplog.records
        )

        cli(home, "pki", "renew-server", "--dir", str(folder))
        new = file_serial(folder / "server.crt")
        assert new != old
        assert presented_serial(live.address, folder) == new  # the next handshake, same process
        with Client(connection(live.address, folder, token)) as client:
            assert client.classify(MODEL, ["my card was stolen"]).results[0].label == "lost_or_stolen_card"
        eventually(lambda: (live.expiry_gauge("server") or 0) > 800 * 86400)


@pytest.mark.integration
def test_an_expired_server_certificate_turns_health_not_serving_and_says_why(
    home: Path, folder: Path, token: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="appliance.security.tls")
    pki.issue_server(folder, list(pki.LOCAL_HOSTS), dt.timedelta(seconds=4))
    with Running(settings(folder)) as live:
        eventually(lambda: live.health(INFERENCE_SERVICES[0]) == health_pb2.HealthCheckResponse.SERVING)
        assert live.server.tls_problem() is None

        eventually(lambda: live.server.tls_problem() is not None)
        problem = live.server.tls_problem() or ""
        assert "server certificate" in problem and "expired" in problem
        eventually(lambda: live.health(INFERENCE_SERVICES[0]) == health_pb2.HealthCheckResponse.NOT_SERVING)
        assert live.health("") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert (live.expiry_gauge("server") or 0) <= 0
        assert any("expired" in r.message and r.levelno == logging.ERROR for r in caplog.records)
        with Client(connection(live.address, folder, token)) as client:  # clients refuse it, too
            assert code_of(lambda: client.classify(MODEL, ["hello"], timeout=10))[0] == Code.UNAVAILABLE

        cli(home, "pki", "renew-server", "--dir", str(folder))
        eventually(lambda: live.health(INFERENCE_SERVICES[0]) == health_pb2.HealthCheckResponse.SERVING)
        assert live.server.tls_problem() is None
        with Client(connection(live.address, folder, token)) as client:
            assert client.classify(MODEL, ["what is the exchange rate"]).results[0].label == "exchange_rate"


@pytest.mark.integration
def test_a_client_certificate_revoked_while_the_server_runs_is_refused(
    home: Path, folder: Path, token: str
) -> None:
    pki.issue_server(folder, list(pki.LOCAL_HOSTS))
    with Running(settings(folder, require_client_cert=True)) as live:
        alice = Client(connection(live.address, folder, token))
        try:
            assert alice.classify(MODEL, ["my card was stolen"]).results
            cli(home, "pki", "revoke-client", "alice", "--dir", str(folder))
            # the connection opened before the revocation is refused on its next call
            code, details = code_of(lambda: alice.classify(MODEL, ["my card was stolen"]))
            assert code == Code.UNAUTHENTICATED and "revoked" in details
        finally:
            alice.close()
        with Client(connection(live.address, folder, token)) as fresh:
            assert code_of(lambda: fresh.classify(MODEL, ["hello"]))[0] == Code.UNAUTHENTICATED
            assert code_of(lambda: fresh.health())[0] == Code.UNAUTHENTICATED  # open methods too
        with Client(connection(live.address, folder, token, client="bob")) as bob:
            assert bob.classify(MODEL, ["what is the exchange rate"]).results[0].label == "exchange_rate"

        chain = audit.stream_dir(home / "audit")
        lines = [line for _, path in audit.audit_files(chain) for line in path.read_bytes().splitlines()]
        records = [r for r in map(json.loads, lines) if "caller" in r]  # calls, not the trail's own
        refused = [r for r in records if r["caller"]["cert"] and "alice" in r["caller"]["cert"]]
        assert [r["code"] for r in refused] == ["OK", "UNAUTHENTICATED", "UNAUTHENTICATED", "UNAUTHENTICATED"]
    assert "OK" in cli(home, "audit", "verify").stdout


@pytest.mark.integration
def test_a_crl_the_ca_did_not_sign_fails_closed(home: Path, folder: Path, token: str, tmp_path: Path) -> None:
    pki.issue_server(folder, list(pki.LOCAL_HOSTS))
    forger = tmp_path / "forger"
    pki.init_ca(forger)
    pki.issue_client(forger, "mallory")
    pki.revoke_client(forger, "mallory")
    with (
        Running(settings(folder, require_client_cert=True)) as live,
        Client(connection(live.address, folder, token)) as client,
    ):
        assert client.classify(MODEL, ["hello"]).results
        pki.crl_path(folder).write_bytes(pki.crl_path(forger).read_bytes())
        code, details = code_of(lambda: client.classify(MODEL, ["hello"]))
        assert code == Code.UNAVAILABLE and "revocation list" in details
        pki.crl_path(folder).unlink()
        assert client.classify(MODEL, ["hello"]).results


def test_the_expiry_watch_warns_once_per_certificate(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    from appliance.security.tls import ExpiryWatch

    caplog.set_level(logging.WARNING, logger="appliance.security.tls")
    pki.issue_server(folder, ["localhost"], dt.timedelta(days=10))
    watch = ExpiryWatch(folder, warn_days=30)
    now = dt.datetime.now(dt.UTC)
    assert watch.check(now) is None and watch.check(now) is None
    assert len([r for r in caplog.records if "expires in" in r.message]) == 1
    assert watch.check(now + dt.timedelta(days=11)) is not None
    assert ExpiryWatch(folder, warn_days=5).check(now) is None
    assert len([r for r in caplog.records if "expires in" in r.message]) == 1  # 10 days > 5: no warning
