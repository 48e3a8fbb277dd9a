"""Release signatures over a whole bundle: ``SHA256SUMS`` and its detached ``SHA256SUMS.sig``.

``appliance bundle --release-key KEY`` lists the sha256 of every file of the bundle (wheels, lock,
``bundle.json``, models, encoders, trusted keys) in ``SHA256SUMS`` (the ``sha256sum`` format, so
``sha256sum -c`` reads it too) and signs that list with an ed25519 release key. The installer
verifies it against a public key it is given from outside the bundle and refuses to install a
bundle with a changed, missing or extra file, or one signed by any other key.

This module is self-contained (the standard library and ``cryptography`` only): the installer runs
this very file with the Ansible controller's Python (ansible-core requires ``cryptography``),
before the appliance is installed anywhere. ``ansible/roles/appliance_common/files/release.py``
links here. ``python release.py --help`` lists its commands.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path, PurePosixPath

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MANIFEST = "SHA256SUMS"
SIGNATURE = "SHA256SUMS.sig"


class ReleaseError(Exception):
    """A release key or a bundle's signature is missing, malformed or does not match."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """The first 16 hex digits of the sha256 of the raw public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def init_key(path: Path) -> Path:
    """Create an ed25519 release key at ``path`` (0600) and its public key beside it (``.pub``).

    An existing key is never replaced: every box that pins its public key would refuse the next
    bundle."""
    public_path = path.with_name(path.name + ".pub")
    if path.exists():
        raise ReleaseError(f"{path} already exists; a release key is created once")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write(path, private, 0o600)
    _write(public_path, public, 0o644)
    return public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ReleaseError(f"cannot read the release key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ReleaseError(f"{path} is not an ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ReleaseError(f"cannot read the release public key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ReleaseError(f"{path} is not an ed25519 public key")
    return key


def digest_tree(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` but the signature's own two, by POSIX relative path.

    Links and special files are refused: a copy would follow a link out of the bundle."""
    files: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel in (MANIFEST, SIGNATURE):
            continue
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise ReleaseError(f"{rel}: not a regular file or folder; a bundle holds plain files only")
        if "\n" in rel or "\\" in rel:
            raise ReleaseError(f"{rel!r}: a file name with a newline or backslash cannot be listed")
        if path.is_file():
            files[rel] = _sha256(path)
    return files


def render(files: dict[str, str]) -> bytes:
    return "".join(f"{digest}  {rel}\n" for rel, digest in sorted(files.items())).encode()


def parse(text: bytes) -> dict[str, str]:
    files: dict[str, str] = {}
    for number, line in enumerate(text.decode().splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        pure = PurePosixPath(rel)
        if not sep or len(digest) != 64 or pure.is_absolute() or ".." in pure.parts or rel in files:
            raise ReleaseError(f"{MANIFEST} line {number} is malformed: {line[:120]!r}")
        files[rel] = digest
    return files


def sign_bundle(root: Path, key: Ed25519PrivateKey) -> str:
    """Write ``SHA256SUMS`` and ``SHA256SUMS.sig`` into ``root``; return the signer's key id."""
    manifest = render(digest_tree(root))
    kid = key_id(key.public_key())
    body = {"alg": "ed25519", "key_id": kid, "sig": base64.b64encode(key.sign(manifest)).decode()}
    _write(root / MANIFEST, manifest, 0o644)
    _write(root / SIGNATURE, (json.dumps(body, sort_keys=True) + "\n").encode(), 0o644)
    return kid


def verify_bundle(root: Path, public: Ed25519PublicKey) -> int:
    """Check the signature with ``public`` and every file against it; return the file count."""
    manifest_path, signature_path = root / MANIFEST, root / SIGNATURE
    if not signature_path.is_file() or not manifest_path.is_file():
        raise ReleaseError(
            f"{root} is not signed ({MANIFEST} or {SIGNATURE} is missing); "
            "build it with `appliance bundle --release-key KEY`"
        )
    manifest = manifest_path.read_bytes()
    try:
        body = json.loads(signature_path.read_text())
        alg, kid, sig = body["alg"], body["key_id"], base64.b64decode(body["sig"], validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise ReleaseError(f"{signature_path} is malformed: {exc}") from exc
    pinned = key_id(public)
    if alg != "ed25519" or kid != pinned:
        raise ReleaseError(f"{root} is signed by release key {kid!r} ({alg}), not by the pinned key {pinned}")
    try:
        public.verify(sig, manifest)
    except InvalidSignature:
        raise ReleaseError(f"{root}: {SIGNATURE} does not match {MANIFEST}; the list was changed") from None
    listed, present = parse(manifest), digest_tree(root)
    problems = [f"{rel}: missing" for rel in sorted(listed.keys() - present.keys())]
    problems += [f"{rel}: not in the signed {MANIFEST}" for rel in sorted(present.keys() - listed.keys())]
    problems += [
        f"{rel}: sha256 differs from the signed {MANIFEST}"
        for rel in sorted(listed.keys() & present.keys())
        if listed[rel] != present[rel]
    ]
    if problems:
        raise ReleaseError(f"{root} does not match its release signature: " + "; ".join(problems))
    return len(listed)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write through a temp file with ``mode`` from the start, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="release.py", description="Sign and verify appliance bundles.")
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init-key", help="create a release key and its .pub beside it")
    init.add_argument("key", type=Path)
    sign = sub.add_parser("sign", help="sign a bundle folder")
    sign.add_argument("bundle", type=Path)
    sign.add_argument("--key", type=Path, required=True)
    verify = sub.add_parser("verify", help="verify a bundle folder against a pinned public key")
    verify.add_argument("bundle", type=Path)
    verify.add_argument("--pubkey", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "init-key":
            print(f"release key {args.key}; pin its public key {init_key(args.key)} on the installer")
        elif args.command == "sign":
            kid = sign_bundle(args.bundle, load_private_key(args.key))
            print(f"bundle {args.bundle} signed by release key {kid}")
        else:
            public = load_public_key(args.pubkey)
            count = verify_bundle(args.bundle, public)
            print(f"bundle {args.bundle}: {count} files match the signature of release key {key_id(public)}")
    except ReleaseError as exc:
        print(f"release: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
