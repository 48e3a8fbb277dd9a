"""Scoped bearer tokens, stored as salted hashes in ``$APPLIANCE_HOME/tokens/tokens.json``.

A secret reads ``apl_<id>_<random>``: the id locates the record without a scan, the random part
(256 bits) is the credential. The file keeps only ``HMAC-SHA256(salt, random)``, so a copy of it
does not let anyone call the server. A 256-bit random secret cannot be guessed, so stretching
it (PBKDF2) adds nothing but cost, paid on the event loop by every failed check; records
written before this change carry ``iterations`` and still verify with PBKDF2.

The running server and the CLI share the file. Writers take an exclusive ``flock`` and replace
the file atomically; readers ``stat`` it on every check and reload when it changed (a rename
gives a new inode, so even a same-second change is seen). Revoking therefore takes effect on the
next call, without a restart.

A token may expire (``expires_at``); a matching secret past it is refused as "token expired".
Rotation gives a name a new secret and lets the old one work until an overlap ends, so that
callers can switch without a gap: the old record's ``expires_at`` is moved to the end of the
overlap and it names its successor in ``replaced_by``. Revoking a name revokes every live
secret of it, the retiring one included.

Scopes: ``classify:<model>``, ``classify:*``, ``extract:<model>``, ``extract:*``, ``embed:<model>``,
``embed:*``, ``workflow:<name>``, ``workflow:*``, ``feedback:<model>`` (correct its decisions),
``feedback:*``, ``generate``, ``models:read``, ``admin`` (which implies every other scope). A
workflow scope runs the whole workflow, whatever models its steps use.
"""

from __future__ import annotations

import base64
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.config import state_dir
from appliance.errors import FailedPrecondition, InvalidArgument, NotFound, Unauthenticated
from appliance.files import write_atomic

TOKEN_PREFIX = "apl"
LOCAL_ADMIN = "local-admin"
SCHEME = "hmac-sha256"
_CACHE_LIMIT = 4096  # verified secrets, so that a known caller costs one dict lookup

_SECRET = re.compile(r"^apl_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_MODEL = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_DURATION = re.compile(r"^([0-9]{1,9})([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# scopes that name a model (or a workflow), or * for every one
MODEL_SCOPE_KINDS = ("classify", "extract", "embed", "workflow", "feedback")
_SCOPE = re.compile(rf"^(?:(?:{'|'.join(MODEL_SCOPE_KINDS)}):(?:\*|{_MODEL})|generate|models:read|admin)$")


class TokenExpired(Unauthenticated):
    """The secret matches a token whose lifetime (or rotation overlap) has ended."""

    def __init__(self) -> None:
        super().__init__("token expired")


@dataclass(frozen=True)
class Principal:
    """Who a verified token speaks for, and what it may do."""

    name: str
    token_id: str
    scopes: frozenset[str]

    def allows(self, required: str) -> bool:
        return has_scope(self.scopes, required)


@dataclass(frozen=True)
class TokenInfo:
    name: str
    token_id: str
    scopes: tuple[str, ...]
    created_at: str
    revoked_at: str | None
    expires_at: str | None = None
    replaced_by: str | None = None  # the token id that a rotation put in its place

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and _expired(self.expires_at)

    @property
    def active(self) -> bool:
        return self.revoked_at is None and not self.expired

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expired:
            return "expired"
        return "retiring" if self.replaced_by else "active"


def parse_secret(secret: str) -> tuple[str, str] | None:
    """``(token_id, random_part)`` of a well-formed secret, else None. Never raises on str input."""
    match = _SECRET.fullmatch(secret)
    return (match.group(1), match.group(2)) if match else None


def format_secret(token_id: str, random_part: str) -> str:
    return f"{TOKEN_PREFIX}_{token_id}_{random_part}"


def parse_duration(text: str) -> float:
    """Seconds in ``<n><unit>``, unit one of s, m, h, d, w (``30d``, ``1h``, ``90s``)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise InvalidArgument(
            f"duration {text!r} must be a whole number and a unit (s, m, h, d, w): e.g. 30d"
        )
    return float(int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def validate_scope(scope: str) -> str:
    if not _SCOPE.fullmatch(scope):
        raise InvalidArgument(
            f"unknown scope {scope!r}; expected classify:<model>|classify:*, extract:<model>|extract:*, "
            "embed:<model>|embed:*, workflow:<name>|workflow:*, feedback:<model>|feedback:*, generate, "
            "models:read or admin"
        )
    return scope


def has_scope(granted: Iterable[str], required: str) -> bool:
    """Whether ``granted`` covers ``required``: exactly, through a ``kind:*`` wildcard, or via admin."""
    granted = frozenset(granted)
    if "admin" in granted or required in granted:
        return True
    kind, sep, _ = required.partition(":")
    return bool(sep) and kind in MODEL_SCOPE_KINDS and f"{kind}:*" in granted


@dataclass(frozen=True)
class _Verified:
    """A secret that matched: who it speaks for and until when (epoch seconds; None: no end)."""

    principal: Principal
    expires_at: float | None

    @classmethod
    def of(cls, record: dict[str, Any]) -> _Verified:
        principal = Principal(name=record["name"], token_id=record["id"], scopes=frozenset(record["scopes"]))
        expires = record.get("expires_at")
        return cls(principal, dt.datetime.fromisoformat(expires).timestamp() if expires else None)


class TokenStore:
    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else state_dir("tokens") / "tokens.json"
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, Any]] = {}
        self._signature: tuple[int, int, int] | None = None
        # keyed digest of a verified secret -> what it verified as; the key never leaves this
        # process, and the table is emptied whenever the file changes (revocation, rotation)
        self._cache_key = secrets.token_bytes(32)
        self._verified: dict[bytes, _Verified] = {}

    # ------------------------------------------------------------------------------------ writes

    def create(self, name: str, scopes: Iterable[str], expires_in: float | None = None) -> str:
        """Create a token and return its secret; the secret is shown once and never stored.

        ``expires_in``: seconds until the token is refused as expired; None: it never expires."""
        if not _NAME.fullmatch(name):
            raise InvalidArgument(
                f"token name {name!r} must be 1-64 characters of letters, digits, '.', '_', '@', '-'"
            )
        scope_list = sorted({validate_scope(s) for s in scopes})
        if not scope_list:
            raise InvalidArgument("a token needs at least one scope")
        _check_lifetime(expires_in)
        with self._locked_file() as records:
            if _live(records, name):
                raise FailedPrecondition(
                    f"an active token named {name!r} exists; revoke it first, or rotate it"
                )
            return _add(records, name, scope_list, expires_in)

    def rotate(self, name: str, overlap: float, expires_in: float | None = None) -> tuple[str, TokenInfo]:
        """A new secret for ``name``, with the same scopes; the current one keeps working for
        ``overlap`` seconds (never past its own expiry), then is refused.

        ``expires_in`` defaults to the lifetime the current token was given. Returns the new secret
        and the record of the token it replaces."""
        if overlap < 0:
            raise InvalidArgument(f"the overlap must not be negative, got {overlap}")
        _check_lifetime(expires_in)
        with self._locked_file() as records:
            current = [r for r in _live(records, name) if not r.get("replaced_by")]
            if not current:
                raise NotFound(f"no active token named {name!r}")
            old = current[0]
            lifetime = expires_in if expires_in is not None else old.get("lifetime_s")
            secret = _add(records, name, list(old["scopes"]), lifetime)
            end = _expiry(overlap) if overlap > 0 else _now()  # no overlap: refused from now on
            old["expires_at"] = min(old["expires_at"], end) if old.get("expires_at") else end
            old["replaced_by"] = secret.split("_")[1]
            return secret, _info(old)

    def revoke(self, name: str) -> TokenInfo:
        """Revoke every live secret of ``name`` (a retiring one too); returns the newest."""
        with self._locked_file() as records:
            live = _live(records, name)
            if not live:
                raise NotFound(f"no active token named {name!r}")
            now = _now()
            for record in live:
                record["revoked_at"] = now
            return _info(next((r for r in live if not r.get("replaced_by")), live[-1]))

    # ------------------------------------------------------------------------------------- reads

    def list(self, include_revoked: bool = False) -> list[TokenInfo]:
        with self._lock:
            self._reload_if_changed()
            infos = [_info(r) for r in self._records.values()]
        return sorted((i for i in infos if include_revoked or i.active), key=lambda i: (i.name, i.created_at))

    def verify(self, secret: str) -> Principal | None:
        """The principal of an active token whose secret matches, else None; raises
        :class:`TokenExpired` for the secret of a token past its expiry."""
        parsed = parse_secret(secret)
        if parsed is None:
            return None
        token_id, random_part = parsed
        digest = hmac.new(self._cache_key, secret.encode(), hashlib.sha256).digest()
        with self._lock:
            self._reload_if_changed()  # one stat: a revocation empties the cache on the next call
            known = self._verified.get(digest)
            record = self._records.get(token_id) if known is None else None
            read_from = self._signature
            if known is None and (record is None or record["revoked_at"] is not None):
                return None
        if known is None:
            assert record is not None
            if not _matches(record, random_part):
                return None
            known = _Verified.of(record)
            with self._lock:
                if len(self._verified) >= _CACHE_LIMIT:
                    self._verified.clear()
                if self._signature == read_from:  # else the record may be revoked by now: no entry
                    self._verified[digest] = known
        # checked after the secret matched, so that "expired" is said only to its holder
        if known.expires_at is not None and known.expires_at <= time.time():
            raise TokenExpired()
        return known.principal

    # --------------------------------------------------------------------------------- internals

    def _reload_if_changed(self) -> None:
        """Reload the file when its identity, size or mtime changed. Caller holds ``_lock``."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._signature is not None or self._records:
                self._records, self._signature = {}, None
                self._verified.clear()
            return
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        if signature != self._signature:
            self._records = _read_records(self.path)
            self._signature = signature
            self._verified.clear()

    @contextmanager
    def _locked_file(self) -> Iterator[dict[str, dict[str, Any]]]:
        """Read-modify-write under an exclusive lock shared with other processes."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            records = _read_records(self.path) if self.path.exists() else {}
            yield records
            body = json.dumps({"version": 1, "tokens": list(records.values())}, indent=2) + "\n"
            write_atomic(self.path, body.encode(), mode=0o600)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        with self._lock:
            self._reload_if_changed()


def ensure_local_admin_token(
    store: TokenStore | None = None, token_file: str | os.PathLike[str] | None = None
) -> str:
    """An admin token for the local user, kept in ``$APPLIANCE_HOME/client/token`` (0600).

    An existing file whose token still verifies as admin is kept. Otherwise a fresh ``local-admin``
    token replaces it (revoking a previous one, whose secret is no longer known)."""
    store = store or TokenStore()
    path = Path(token_file) if token_file is not None else state_dir("client") / "token"
    if path.exists():
        existing = path.read_text().strip()
        try:
            principal = store.verify(existing)
        except TokenExpired:
            principal = None
        if principal is not None and "admin" in principal.scopes:
            return existing
    if any(t.name == LOCAL_ADMIN for t in store.list()):
        store.revoke(LOCAL_ADMIN)
    secret = store.create(LOCAL_ADMIN, ["admin"])
    write_atomic(path, (secret + "\n").encode(), mode=0o600)
    return secret


def _live(records: dict[str, dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """Records of ``name`` that still verify: not revoked, not expired."""
    return [r for r in records.values() if r["name"] == name and _info(r).active]


def _add(records: dict[str, dict[str, Any]], name: str, scopes: list[str], expires_in: float | None) -> str:
    """Add a fresh record to ``records`` and return its secret."""
    random_part = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    token_id = secrets.token_hex(6)
    while token_id in records:
        token_id = secrets.token_hex(6)
    now = time.time()
    records[token_id] = {
        "id": token_id,
        "name": name,
        "scopes": scopes,
        "salt": _b64(salt),
        "scheme": SCHEME,
        "hash": _b64(_digest(random_part, salt)),
        "created_at": _at(now),
        "revoked_at": None,
        "expires_at": _expiry(expires_in) if expires_in is not None else None,
        "lifetime_s": expires_in,  # what a rotation gives the next secret by default
    }
    return format_secret(token_id, random_part)


def _check_lifetime(expires_in: float | None) -> None:
    if expires_in is not None and expires_in <= 0:
        raise InvalidArgument(f"a token's lifetime must be positive, got {expires_in} seconds")


def _expiry(seconds_from_now: float) -> str:
    """The instant, rounded up to the second shown, so that a token never ends early."""
    return _at(math.ceil(time.time() + seconds_from_now))


def _expired(expires_at: str) -> bool:
    return dt.datetime.fromisoformat(expires_at).timestamp() <= time.time()


def _digest(random_part: str, salt: bytes) -> bytes:
    return hmac.new(salt, random_part.encode(), hashlib.sha256).digest()


def _matches(record: dict[str, Any], random_part: str) -> bool:
    """Whether ``random_part`` is the secret of ``record``, in the scheme the record was written with."""
    salt = base64.b64decode(record["salt"])
    if record.get("scheme") == SCHEME:
        actual = _digest(random_part, salt)
    else:  # a record from before HMAC: PBKDF2 with its own round count
        actual = hashlib.pbkdf2_hmac("sha256", random_part.encode(), salt, int(record["iterations"]))
    return hmac.compare_digest(base64.b64decode(record["hash"]), actual)


def _read_records(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
        return {r["id"]: r for r in data["tokens"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise FailedPrecondition(f"token file {path} is corrupt: {exc}") from exc


def _info(record: dict[str, Any]) -> TokenInfo:
    return TokenInfo(
        name=record["name"],
        token_id=record["id"],
        scopes=tuple(record["scopes"]),
        created_at=record["created_at"],
        revoked_at=record["revoked_at"],
        expires_at=record.get("expires_at"),
        replaced_by=record.get("replaced_by"),
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _now() -> str:
    return _at(time.time())


def _at(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="seconds")
