"""The verified-token cache: a known caller costs a stat and a dict lookup, and a revocation or an
expiry still holds from the very next call."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.security import tokens
from appliance.security.tokens import TokenExpired, TokenStore


def test_a_cached_token_revoked_by_the_cli_is_refused_on_the_next_call(tmp_path: Path) -> None:
    home = tmp_path / "home"
    server = TokenStore(home / "tokens" / "tokens.json")
    secret = server.create("bob", ["generate"])
    for _ in range(3):
        assert server.verify(secret) is not None
    assert len(server._verified) == 1  # served from the cache
    revoked = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "tokens", "revoke", "bob"],
        env={**os.environ, "APPLIANCE_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert revoked.returncode == 0, revoked.stderr
    assert server.verify(secret) is None
    assert server._verified == {}


def test_a_cached_token_expires_on_time_without_the_file_changing(store: TokenStore) -> None:
    secret = store.create("bob", ["generate"], expires_in=2)
    assert store.verify(secret) is not None
    stamp = store.path.stat().st_mtime_ns
    (info,) = store.list()
    assert info.expires_at is not None
    time.sleep(max(0.0, tokens.dt.datetime.fromisoformat(info.expires_at).timestamp() - time.time()) + 0.05)
    with pytest.raises(TokenExpired):
        store.verify(secret)
    assert store.path.stat().st_mtime_ns == stamp


def test_a_revocation_during_a_check_leaves_nothing_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The secret is checked outside the lock; a revocation seen meanwhile must not let the
    answer of the check (made against the old file) stay in the cache."""
    path = tmp_path / "tokens.json"
    server, cli = TokenStore(path), TokenStore(path)
    secret = cli.create("bob", ["generate"])
    matches = tokens._matches

    def revoke_meanwhile(record: dict[str, object], random_part: str) -> bool:
        cli.revoke("bob")
        server.list()  # the server sees the new file while this check is still running
        return matches(record, random_part)  # type: ignore[arg-type]

    monkeypatch.setattr(tokens, "_matches", revoke_meanwhile)
    server.verify(secret)  # began before the revocation: its own answer may still be yes
    monkeypatch.setattr(tokens, "_matches", matches)
    assert server.verify(secret) is None
