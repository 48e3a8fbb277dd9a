"""Tokens that expire and rotate, made with the real ``appliance tokens`` command and checked by the
real server: an expired secret is UNAUTHENTICATED "token expired"; a rotated one keeps working
until its overlap ends, while the new one works from the start; revoking ends both."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from test_security_server import MODEL, PROBE, LiveServer, cli, published_home

from appliance.security.tokens import TokenStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = published_home(tmp_path_factory.getbasetemp())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("APPLIANCE_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def live(home: Path) -> Iterator[LiveServer]:
    with LiveServer(home) as server:
        yield server


def secret_of(run) -> str:  # type: ignore[no-untyped-def]
    assert run.returncode == 0, run.stderr
    return str(run.stdout.strip().splitlines()[-1])


def status_of(live: LiveServer, secret: str) -> tuple[grpc.StatusCode, str]:
    with live.client(secret) as client:
        try:
            assert client.classify(MODEL, [PROBE[0]], timeout=30).results[0].label == PROBE[1]
        except grpc.RpcError as exc:
            return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def wait_past(expires_at: str) -> None:
    time.sleep(max(0.0, dt.datetime.fromisoformat(expires_at).timestamp() - time.time()) + 0.5)


def listed(home: Path, name: str) -> list[str]:
    """The ``tokens list --all`` lines of ``name``."""
    run = cli(home, "tokens", "list", "--all")
    assert run.returncode == 0, run.stderr
    return [line for line in run.stdout.splitlines() if line.split()[0] == name]


def test_an_expired_token_is_refused_as_expired(live: LiveServer, home: Path) -> None:
    secret = secret_of(
        cli(home, "tokens", "create", "brief", "--scope", f"classify:{MODEL}", "--expires-in", "20s")
    )
    assert status_of(live, secret) == (grpc.StatusCode.OK, "")
    (info,) = [t for t in TokenStore(home / "tokens" / "tokens.json").list() if t.name == "brief"]
    assert info.expires_at is not None
    (line,) = listed(home, "brief")
    assert info.expires_at in line and "active" in line
    wait_past(info.expires_at)
    assert status_of(live, secret) == (grpc.StatusCode.UNAUTHENTICATED, "token expired")
    (line,) = listed(home, "brief")
    assert "expired" in line.split()


def test_a_rotated_token_works_until_the_overlap_ends(live: LiveServer, home: Path) -> None:
    old = secret_of(cli(home, "tokens", "create", "rotating", "--scope", f"classify:{MODEL}"))
    (line,) = listed(home, "rotating")
    assert "never" in line.split()
    new = secret_of(cli(home, "tokens", "rotate", "rotating", "--overlap", "20s"))
    assert new != old
    assert status_of(live, old) == (grpc.StatusCode.OK, "")
    assert status_of(live, new) == (grpc.StatusCode.OK, "")
    states = sorted(line.split()[4] for line in listed(home, "rotating"))
    assert states == ["active", "retiring"]
    (retiring,) = [t for t in TokenStore(home / "tokens" / "tokens.json").list() if t.state == "retiring"]
    assert retiring.expires_at is not None
    wait_past(retiring.expires_at)
    assert status_of(live, old) == (grpc.StatusCode.UNAUTHENTICATED, "token expired")
    assert status_of(live, new) == (grpc.StatusCode.OK, "")
    run = cli(home, "tokens", "revoke", "rotating")
    assert run.returncode == 0, run.stderr
    assert status_of(live, new) == (grpc.StatusCode.UNAUTHENTICATED, "invalid or revoked token")
