"""Scoped tokens: creation, storage as salted hashes, verification, revocation, scope logic."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.errors import FailedPrecondition, InvalidArgument, NotFound
from appliance.security.tokens import (
    TokenExpired,
    TokenStore,
    ensure_local_admin_token,
    format_secret,
    has_scope,
    parse_duration,
    parse_secret,
    validate_scope,
)


def test_secret_verifies_and_is_not_stored(store):
    secret = store.create("bob", ["classify:banking77", "models:read"])
    principal = store.verify(secret)
    assert principal is not None
    assert principal.name == "bob"
    assert principal.scopes == {"classify:banking77", "models:read"}
    token_id, random_part = parse_secret(secret)
    assert principal.token_id == token_id
    text = store.path.read_text()
    assert random_part not in text and secret not in text
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


def test_forged_and_malformed_secrets_fail(store):
    secret = store.create("bob", ["generate"])
    token_id, random_part = parse_secret(secret)
    flipped = ("B" if random_part[0] == "A" else "A") + random_part[1:]
    assert store.verify(format_secret(token_id, flipped)) is None
    assert store.verify(format_secret("0" * 12, random_part)) is None
    for bad in ("", "Bearer x", secret + "x", secret.upper(), "apl__" + random_part):
        assert store.verify(bad) is None


def test_each_token_has_its_own_salt(store):
    store.create("a", ["generate"])
    store.create("b", ["generate"])
    records = json.loads(store.path.read_text())["tokens"]
    assert records[0]["salt"] != records[1]["salt"]


def test_revoke_is_seen_by_another_store_on_the_same_file(tmp_path):
    server = TokenStore(tmp_path / "tokens.json")
    cli = TokenStore(tmp_path / "tokens.json")
    secret = cli.create("bob", ["generate"])
    assert server.verify(secret) is not None  # cached after this
    cli.revoke("bob")
    assert server.verify(secret) is None
    assert [t.name for t in server.list()] == []
    assert [(t.name, t.active) for t in server.list(include_revoked=True)] == [("bob", False)]


def test_names_and_scopes_are_checked(store):
    with pytest.raises(InvalidArgument, match="unknown scope"):
        store.create("bob", ["classify"])
    with pytest.raises(InvalidArgument, match="at least one scope"):
        store.create("bob", [])
    with pytest.raises(InvalidArgument, match="token name"):
        store.create("bob smith", ["admin"])
    store.create("bob", ["admin"])
    with pytest.raises(FailedPrecondition, match="revoke it first"):
        store.create("bob", ["admin"])
    with pytest.raises(NotFound, match="no active token named 'alice'"):
        store.revoke("alice")
    store.revoke("bob")
    store.create("bob", ["generate"])  # a name is free again once revoked


def test_corrupt_file_is_reported(store):
    store.path.parent.mkdir(parents=True, exist_ok=True)
    store.path.write_text("{not json")
    with pytest.raises(FailedPrecondition, match="corrupt"):
        store.verify(format_secret("0" * 12, "A" * 43))


@pytest.mark.parametrize(
    ("granted", "required", "allowed"),
    [
        ({"classify:bank"}, "classify:bank", True),
        ({"classify:bank"}, "classify:other", False),
        ({"classify:*"}, "classify:other", True),
        ({"classify:*"}, "embed:bank", False),
        ({"embed:*"}, "embed:bank", True),
        ({"admin"}, "classify:bank", True),
        ({"admin"}, "generate", True),
        ({"models:read"}, "generate", False),
        ({"generate"}, "generate", True),
        ({"classify:*"}, "admin", False),
        ({"models:*"}, "models:read", False),
    ],
)
def test_scope_rules(granted, required, allowed):
    assert has_scope(granted, required) is allowed


def test_scope_grammar():
    for good in ("classify:banking77", "classify:*", "embed:mini_lm.v2", "generate", "models:read", "admin"):
        assert validate_scope(good) == good
    for bad in ("classify:", "classify:a b", "generate:*", "models:write", "ADMIN", "embed:../x"):
        with pytest.raises(InvalidArgument):
            validate_scope(bad)


def test_local_admin_token_is_written_once_and_reused(home):
    store = TokenStore()
    secret = ensure_local_admin_token(store)
    path = home / "client" / "token"
    assert path.read_text().strip() == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.verify(secret).allows("admin")
    assert ensure_local_admin_token(store) == secret
    # a revoked local token is replaced, not returned
    store.revoke("local-admin")
    fresh = ensure_local_admin_token(store)
    assert fresh != secret and store.verify(fresh) is not None


_ids = st.text("0123456789abcdef", min_size=12, max_size=12)
_randoms = st.text(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", min_size=43, max_size=43
)


@settings(max_examples=60, deadline=None)
@given(_ids, _randoms)
def test_parse_inverts_format(token_id, random_part):
    assert parse_secret(format_secret(token_id, random_part)) == (token_id, random_part)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_parse_never_raises_and_accepts_only_the_exact_shape(text):
    parsed = parse_secret(text)
    if parsed is not None:
        assert format_secret(*parsed) == text


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=60))
def test_verify_rejects_arbitrary_text(tmp_path_factory, text):
    store = TokenStore(tmp_path_factory.mktemp("tok") / "tokens.json")
    store.create("bob", ["admin"])
    assert store.verify(text) is None


def _legacy_record(token_id: str, name: str, random_part: str, iterations: int) -> dict[str, object]:
    """A record as releases before HMAC wrote it: PBKDF2-SHA256 with its round count."""
    salt = os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", random_part.encode(), salt, iterations)
    return {
        "id": token_id,
        "name": name,
        "scopes": ["generate"],
        "salt": base64.b64encode(salt).decode(),
        "hash": base64.b64encode(digest).decode(),
        "iterations": iterations,
        "created_at": "2026-01-01T00:00:00+00:00",
        "revoked_at": None,
    }


def test_new_records_hold_an_hmac_not_a_stretched_hash(store):
    store.create("bob", ["generate"])
    (record,) = json.loads(store.path.read_text())["tokens"]
    assert record["scheme"] == "hmac-sha256"
    assert "iterations" not in record


def test_records_written_with_pbkdf2_still_verify(tmp_path):
    path = tmp_path / "tokens.json"
    old = format_secret("0123456789ab", "A" * 43)
    new_store = TokenStore(path)
    new_secret = new_store.create("new", ["generate"])
    body = json.loads(path.read_text())
    body["tokens"].append(_legacy_record("0123456789ab", "old", "A" * 43, 10_000))
    path.write_text(json.dumps(body))
    store = TokenStore(path)
    principal = store.verify(old)
    assert principal is not None and principal.name == "old"
    assert store.verify(format_secret("0123456789ab", "B" + "A" * 42)) is None
    assert store.verify(new_secret) is not None
    store.revoke("old")  # a rewrite keeps the old record verifiable until it is revoked
    assert store.verify(old) is None and store.verify(new_secret) is not None


def test_failed_checks_are_cheap(tmp_path):
    """Wrong secrets for a real token id never hit the cache; each one used to cost a PBKDF2
    (10,000 rounds, ~3 ms) on the server's event loop."""
    store = TokenStore(tmp_path / "tokens.json")
    token_id, _ = parse_secret(store.create("bob", ["generate"]))
    wrong = [format_secret(token_id, f"{i:043d}") for i in range(500)]
    started = time.perf_counter()
    assert all(store.verify(secret) is None for secret in wrong)
    assert time.perf_counter() - started < 0.25  # PBKDF2 took about 1 s for these 500 here


# ------------------------------------------------------------------------- expiry and rotation


def expire_now(store: TokenStore, token_id: str) -> None:
    """Move a record's expiry into the past, as the clock would, through the file the server reads."""
    data = json.loads(store.path.read_text())
    for record in data["tokens"]:
        if record["id"] == token_id:
            record["expires_at"] = "2000-01-01T00:00:00+00:00"
    store.path.write_text(json.dumps(data))


@pytest.mark.parametrize(("text", "seconds"), [("30d", 2592000), ("1h", 3600), ("90s", 90), ("2w", 1209600)])
def test_durations_parse(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "30", "1.5h", "-1h", "h", "1y", "1 h h"])
def test_bad_durations_are_invalid(text):
    with pytest.raises(InvalidArgument, match="duration"):
        parse_duration(text)


def test_an_expired_secret_is_refused_as_expired_and_frees_its_name(store):
    secret = store.create("bob", ["generate"], expires_in=3600)
    (info,) = store.list()
    assert info.expires_at is not None and info.state == "active"
    assert store.verify(secret) is not None  # cached after this: expiry is still checked
    expire_now(store, info.token_id)
    with pytest.raises(TokenExpired, match="token expired"):
        store.verify(secret)
    assert store.list() == [] and [t.state for t in store.list(include_revoked=True)] == ["expired"]
    store.create("bob", ["generate"])  # an expired name is free again
    with pytest.raises(InvalidArgument, match="lifetime must be positive"):
        store.create("carol", ["generate"], expires_in=0)


def test_rotation_keeps_the_old_secret_for_the_overlap_only(store):
    old = store.create("bob", ["classify:bank", "generate"], expires_in=86400)
    new, replaced = store.rotate("bob", overlap=3600)
    assert replaced.token_id == parse_secret(old)[0] and replaced.replaced_by == parse_secret(new)[0]
    assert store.verify(old).name == store.verify(new).name == "bob"
    assert store.verify(new).scopes == {"classify:bank", "generate"}
    states = {t.token_id: t.state for t in store.list()}
    assert states == {parse_secret(old)[0]: "retiring", parse_secret(new)[0]: "active"}
    fresh = next(t for t in store.list() if t.state == "active")
    assert fresh.expires_at is not None  # the old token's lifetime carries over
    expire_now(store, replaced.token_id)  # the overlap is over
    with pytest.raises(TokenExpired):
        store.verify(old)
    assert store.verify(new) is not None


def test_rotating_with_no_overlap_refuses_the_old_secret_at_once(store):
    old = store.create("bob", ["generate"])
    with pytest.raises(NotFound, match="no active token named 'alice'"):
        store.rotate("alice", overlap=60)
    with pytest.raises(InvalidArgument, match="negative"):
        store.rotate("bob", overlap=-1)
    new, _ = store.rotate("bob", overlap=0)
    with pytest.raises(TokenExpired):
        store.verify(old)
    assert store.verify(new) is not None


def test_revoking_a_rotated_name_revokes_both_secrets(store):
    old = store.create("bob", ["generate"])
    new, _ = store.rotate("bob", overlap=3600)
    store.revoke("bob")
    assert store.verify(old) is None and store.verify(new) is None
    assert [t.state for t in store.list(include_revoked=True)] == ["revoked", "revoked"]


def test_an_expired_local_admin_token_is_replaced(home):
    store = TokenStore()
    secret = ensure_local_admin_token(store)
    expire_now(store, parse_secret(secret)[0])
    fresh = ensure_local_admin_token(store)
    assert fresh != secret and store.verify(fresh).allows("admin")
