"""The audit trail's record format, its keys and its verification (the writer is :mod:`audit`).

Format 2, one record per line::

    canonical JSON of the record without "mac"  with  ,"mac":"<hex>"  inserted before the last }

``mac`` = HMAC-SHA256(chain key, exact bytes of that canonical JSON). Every record carries ``v``
(2), ``seq`` and ``prev`` (the previous record's mac). Verification hashes the bytes as they are
on disk and then requires them to be the canonical form of what they parse to, so a line with
duplicate keys, other whitespace or another key order fails even where its values look right.

The chain key is random per writer process and never written in the clear: it is sealed
(X25519 + HKDF-SHA256 + ChaCha20-Poly1305) to the audit public key, and the sealed blob heads
every file (an ``audit-file`` record). Only the holder of the private key
(``keys/audit-seal.key``, root-owned 0400 when the installer creates it) can recover it, so the
service account can write records but cannot read a key back to forge or re-MAC old ones.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.config import state_dir
from appliance.errors import FailedPrecondition
from appliance.files import write_atomic

log = logging.getLogger(__name__)

VERSION = 2
GENESIS = "0" * 64
RESERVED = frozenset({"v", "seq", "prev", "mac", "hash"})
FILE_EVENT = "audit-file"  # first record of every file: the sealed chain key, the link backwards
CLOSE_EVENT = "audit-close"  # last record of a chain whose writer closed it
PRUNE_EVENT = "audit-pruned"  # retention removed this chain's oldest files
TRAIL_EVENTS = frozenset({FILE_EVENT, CLOSE_EVENT, PRUNE_EVENT})  # the trail's own bookkeeping
LATEST = "LATEST"  # in the audit root: the chain opened last, which the next one links to

# Bounds for caller-controlled strings: one function, one set of limits.
MAX_FIELD_CHARS = 256  # method, model, request id, peer, certificate subject, user agent, token id
MAX_DETAILS_CHARS = 1024  # status details; grpc's default trailer limit is 8 KiB

_FILE = re.compile(r"^audit-(\d+)\.jsonl$")
_MAC_TAIL = re.compile(rb'(\{.*),"mac":"([0-9a-f]{64})"\}', re.DOTALL)
_SEAL_INFO = b"appliance audit chain key v2"


def clip(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how many were cut."""
    return text if len(text) <= limit else f"{text[:limit]}...[{len(text) - limit} more characters]"


def canonical(record: Mapping[str, Any]) -> bytes:
    """Sorted keys, no whitespace, UTF-8."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def mac_of(key: bytes, core: bytes) -> str:
    return hmac.new(key, core, hashlib.sha256).hexdigest()


def encode_line(record: Mapping[str, Any], key: bytes) -> tuple[bytes, str]:
    """The line (without newline) for ``record`` (which holds v, seq and prev) and its mac."""
    core = canonical(record)
    mac = mac_of(key, core)
    return core[:-1] + b',"mac":"' + mac.encode() + b'"}', mac


class LineError(ValueError):
    """A line that is not a format-2 record as the writer writes them."""


def decode_line(line: bytes) -> tuple[dict[str, Any], bytes, str]:
    """``(record without mac, the bytes its mac covers, mac)``; raises :class:`LineError`."""
    match = _MAC_TAIL.fullmatch(line)
    if match is None:
        raise LineError("no mac at the end of the line")
    core = match.group(1) + b"}"
    try:
        record = json.loads(core, object_pairs_hook=_unique_keys)
    except LineError:
        raise
    except ValueError as exc:
        raise LineError(f"not valid JSON ({exc})") from None
    if not isinstance(record, dict) or not {"v", "seq", "prev"} <= record.keys():
        raise LineError("not an audit record (v/seq/prev missing)")
    if "mac" in record or "hash" in record:
        raise LineError("a second mac inside the record")
    if canonical(record) != core:
        raise LineError("not in canonical form (key order, spacing or escapes differ from the writer's)")
    return record, core, match.group(2).decode()


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise LineError(f"duplicate key {key!r}")
        found[key] = value
    return found


# ------------------------------------------------------------------------------------ keys


@dataclass(frozen=True)
class KeyPaths:
    public: Path
    private: Path


def key_paths(folder: Path | None = None) -> KeyPaths:
    base = folder if folder is not None else state_dir("keys")
    return KeyPaths(base / "audit-seal.pub", base / "audit-seal.key")


def create_keys(paths: KeyPaths) -> None:
    """A fresh key pair: the private key 0400 (owned by whoever runs this: root, in the
    installer), the public key 0444. Chains sealed to an older pair need that older private key."""
    private = X25519PrivateKey.generate()
    raw_private = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    raw_public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    write_atomic(paths.private, base64.b64encode(raw_private) + b"\n", 0o400)
    write_atomic(paths.public, base64.b64encode(raw_public) + b"\n", 0o444)


def writer_public_key(paths: KeyPaths) -> X25519PublicKey:
    """The key the writer seals its chain key to; made here if the installer made none."""
    if not paths.public.exists():
        log.warning(
            "no audit key at %s: creating one; its private half %s is readable by this account, so "
            "run 'appliance audit init-key' as root to make one the service cannot read",
            paths.public,
            paths.private,
        )
        try:
            create_keys(paths)
        except PermissionError:
            raise FailedPrecondition(
                f"no audit key at {paths.public}, and this account cannot create one: "
                "run 'appliance audit init-key' as root"
            ) from None
    return X25519PublicKey.from_public_bytes(_read_key(paths.public))


def verifier_private_key(paths: KeyPaths) -> X25519PrivateKey:
    try:
        return X25519PrivateKey.from_private_bytes(_read_key(paths.private))
    except OSError as exc:
        raise FailedPrecondition(
            f"cannot read the audit key {paths.private} ({exc.strerror}); verify as its owner (root)"
        ) from None


def _read_key(path: Path) -> bytes:
    raw = base64.b64decode(path.read_bytes().strip(), validate=True)
    if len(raw) != 32:
        raise FailedPrecondition(f"{path} does not hold a 32-byte X25519 key")
    return raw


def seal(public: X25519PublicKey, secret: bytes) -> str:
    ephemeral = X25519PrivateKey.generate()
    box = ChaCha20Poly1305(_box_key(ephemeral.exchange(public)))
    nonce = os.urandom(12)
    eph = ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(eph + nonce + box.encrypt(nonce, secret, _SEAL_INFO)).decode()


def unseal(private: X25519PrivateKey, blob: str) -> bytes:
    raw = base64.b64decode(blob, validate=True)
    eph, nonce, sealed = raw[:32], raw[32:44], raw[44:]
    box = ChaCha20Poly1305(_box_key(private.exchange(X25519PublicKey.from_public_bytes(eph))))
    try:
        return box.decrypt(nonce, sealed, _SEAL_INFO)
    except InvalidTag:
        raise LineError("the sealed chain key does not open with this audit key") from None


def _box_key(shared: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_SEAL_INFO).derive(shared)


# ------------------------------------------------------------------------------ file layout


def audit_files(folder: Path) -> list[tuple[int, Path]]:
    """The audit files in ``folder`` as ``(n, path)``, oldest first."""
    found = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = _FILE.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def file_name(n: int) -> str:
    return f"audit-{n:06d}.jsonl"


def stream_dir(root: Path | None = None) -> Path:
    """This process's own chain: ``audit/<host>-<pid>/``.

    Each server process writes its own chain, so that two of them on one box (a rolling upgrade
    starts the new replica before the old one stops) never contend for one folder.
    """
    base = root if root is not None else state_dir("audit")
    return base / f"{socket.gethostname()}-{os.getpid()}"


def streams(root: Path) -> list[Path]:
    """Every chain under ``root``: the folder itself if it holds audit files, and its sub-folders."""
    found = [root] if audit_files(root) else []
    if root.is_dir():
        found += sorted(p for p in root.iterdir() if p.is_dir() and audit_files(p))
    return found
