"""Ed25519 signatures for artifact manifests (``manifest.json`` is signed into ``manifest.sig``).

The signing key lives at ``$APPLIANCE_HOME/keys/signing.key`` (0600). Trust is a folder of public
keys, ``keys/trusted/<key_id>.pub``, where ``key_id`` is the first 16 hex digits of the sha256 of
the raw public key: installing another appliance's public key there makes its artifacts trusted.

A signature file is one line of JSON: ``{"alg": "ed25519", "key_id": ..., "sig": <base64>}``.

A serving box installed by the Ansible roles (``appliance_factory: false``) holds no signing key:
the installer leaves a root-owned ``keys/SERVING_ONLY`` marker, and every attempt to create or
use a signing key there fails, so a process on that box cannot mint a key and vouch for its own
models. ``keys/trusted`` is root-owned and read-only there as well.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.config import state_dir
from appliance.errors import FailedPrecondition, IntegrityError
from appliance.files import write_atomic
from appliance.security.release import key_id as key_id  # one definition, shared with bundles

SIGNATURE_SUFFIX = ".sig"
SERVING_ONLY = "SERVING_ONLY"
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")


def keys_dir(folder: str | os.PathLike[str] | None = None) -> Path:
    return Path(folder) if folder is not None else state_dir("keys")


def trusted_dir(folder: str | os.PathLike[str] | None = None) -> Path:
    return keys_dir(folder) / "trusted"


class SigningUnavailable(FailedPrecondition):
    """This box is not allowed to sign: it is a serving box."""


def require_signing_box(folder: str | os.PathLike[str] | None = None) -> None:
    """Refuse, with the reason and the way out, when this box must not sign models."""
    marker = keys_dir(folder) / SERVING_ONLY
    if marker.exists():
        raise SigningUnavailable(
            f"this box cannot sign models: it is a serving box ({marker}; installed with "
            "appliance_factory=false) and holds no signing key. Train on the factory box and "
            "install the model here from a signed bundle."
        )


def ensure_signing_key(folder: str | os.PathLike[str] | None = None) -> Ed25519PrivateKey:
    """Load the signing key, creating it on first use; its public key is always kept trusted."""
    require_signing_box(folder)
    base = keys_dir(folder)
    path = base / "signing.key"
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise IntegrityError(f"{path} is not an ed25519 private key")
    else:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_atomic(path, pem, mode=0o600)
    public = key.public_key()
    trusted = trusted_dir(base) / f"{key_id(public)}.pub"
    if not trusted.exists():
        pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        write_atomic(trusted, pem, mode=0o644)
    return key


def sign_manifest(manifest_bytes: bytes, key: Ed25519PrivateKey | None = None) -> str:
    """The signature file's text for ``manifest_bytes`` (signed by the local key by default)."""
    key = key or ensure_signing_key()
    signature = key.sign(manifest_bytes)
    body = {"alg": "ed25519", "key_id": key_id(key.public_key()), "sig": base64.b64encode(signature).decode()}
    return json.dumps(body, sort_keys=True) + "\n"


def verify_manifest(
    manifest_bytes: bytes,
    signature: str | bytes | None,
    trusted: str | os.PathLike[str] | None = None,
) -> str:
    """The id of the trusted key that signed ``manifest_bytes``; IntegrityError otherwise."""
    if not signature:
        raise IntegrityError("manifest is not signed")
    text = signature.decode() if isinstance(signature, bytes) else signature
    try:
        body = json.loads(text)
        alg, kid, sig = body["alg"], body["key_id"], base64.b64decode(body["sig"], validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"malformed manifest signature: {exc}") from exc
    if alg != "ed25519" or not isinstance(kid, str) or not _KEY_ID.fullmatch(kid):
        raise IntegrityError(f"unsupported manifest signature (alg={alg!r}, key_id={kid!r})")
    folder = Path(trusted) if trusted is not None else trusted_dir()
    public = _load_trusted(folder / f"{kid}.pub", kid)
    try:
        public.verify(sig, manifest_bytes)
    except InvalidSignature:
        raise IntegrityError(f"manifest signature by key {kid} does not match the manifest") from None
    return kid


def sign_file(manifest_path: str | os.PathLike[str], key: Ed25519PrivateKey | None = None) -> Path:
    """Sign ``manifest_path`` into ``<manifest_path>`` with its suffix replaced by ``.sig``."""
    path = Path(manifest_path)
    sig_path = path.with_suffix(SIGNATURE_SUFFIX)
    write_atomic(sig_path, sign_manifest(path.read_bytes(), key).encode(), mode=0o644)
    return sig_path


def verify_file(manifest_path: str | os.PathLike[str], trusted: str | os.PathLike[str] | None = None) -> str:
    """Verify ``manifest_path`` against the ``.sig`` file beside it; returns the signer's key id."""
    path = Path(manifest_path)
    sig_path = path.with_suffix(SIGNATURE_SUFFIX)
    if not sig_path.exists():
        raise IntegrityError(f"{path} is not signed: {sig_path.name} is missing")
    return verify_manifest(path.read_bytes(), sig_path.read_bytes(), trusted)


def _load_trusted(path: Path, kid: str) -> Ed25519PublicKey:
    if not path.exists():
        raise IntegrityError(f"manifest signed by untrusted key {kid} (not in {path.parent})")
    public = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(public, Ed25519PublicKey) or key_id(public) != kid:
        raise IntegrityError(f"trusted key file {path} does not hold key {kid}")
    return public
