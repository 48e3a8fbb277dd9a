"""Fixtures for the security tests: a session PKI and private state folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.security import pki
from appliance.security.tokens import TokenStore


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One PKI for the whole session: issuing ECDSA certificates is quick, but there is no need
    to repeat it per test."""
    folder = tmp_path_factory.mktemp("pki")
    pki.init_ca(folder)
    pki.issue_server(folder, ["localhost", "127.0.0.1", "::1"])
    pki.issue_client(folder, "alice")
    return folder


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private APPLIANCE_HOME, so defaults never touch the user's real state."""
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def store(tmp_path: Path) -> TokenStore:
    return TokenStore(tmp_path / "tokens" / "tokens.json")


@pytest.fixture
def audit_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A chain folder; APPLIANCE_HOME is private too, since the audit key pair lives in it."""
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path / "home"))
    return tmp_path / "audit"
