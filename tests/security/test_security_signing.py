"""Signed manifests: ed25519, trusted key folder, and every way a signature can be wrong."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import pytest

from appliance.errors import IntegrityError
from appliance.security import signing


def test_signing_key_is_created_once_private_and_trusted(home):
    key = signing.ensure_signing_key()
    path = home / "keys" / "signing.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    kid = signing.key_id(key.public_key())
    assert (home / "keys" / "trusted" / f"{kid}.pub").exists()
    assert signing.key_id(signing.ensure_signing_key().public_key()) == kid


def test_signed_manifest_verifies_and_names_its_key(home):
    manifest = json.dumps({"name": "banking77", "files": {"model.onnx": "ab" * 32}}).encode()
    signature = signing.sign_manifest(manifest)
    kid = signing.verify_manifest(manifest, signature)
    assert kid == signing.key_id(signing.ensure_signing_key().public_key())
    assert signing.verify_manifest(manifest, signature.encode()) == kid


def test_changed_manifest_fails(home):
    manifest = b'{"name": "banking77", "version": 1}'
    signature = signing.sign_manifest(manifest)
    with pytest.raises(IntegrityError, match="does not match"):
        signing.verify_manifest(manifest.replace(b"1", b"2"), signature)


def test_unsigned_and_malformed_signatures_fail(home):
    manifest = b"{}"
    with pytest.raises(IntegrityError, match="not signed"):
        signing.verify_manifest(manifest, None)
    with pytest.raises(IntegrityError, match="not signed"):
        signing.verify_manifest(manifest, "")
    with pytest.raises(IntegrityError, match="malformed"):
        signing.verify_manifest(manifest, "not json")
    with pytest.raises(IntegrityError, match="unsupported"):
        signing.verify_manifest(manifest, json.dumps({"alg": "rsa", "key_id": "00" * 8, "sig": ""}))
    with pytest.raises(IntegrityError, match="unsupported"):
        signing.verify_manifest(manifest, json.dumps({"alg": "ed25519", "key_id": "../../x", "sig": ""}))


def test_key_from_another_appliance_is_untrusted_until_installed(home, tmp_path):
    other = signing.ensure_signing_key(tmp_path / "other-keys")
    manifest = b'{"name": "intent"}'
    signature = signing.sign_manifest(manifest, other)
    with pytest.raises(IntegrityError, match="untrusted key"):
        signing.verify_manifest(manifest, signature)
    kid = signing.key_id(other.public_key())
    source = tmp_path / "other-keys" / "trusted" / f"{kid}.pub"
    (home / "keys" / "trusted").mkdir(parents=True, exist_ok=True)
    (home / "keys" / "trusted" / f"{kid}.pub").write_bytes(source.read_bytes())
    assert signing.verify_manifest(manifest, signature) == kid


def test_trusted_file_must_hold_the_key_it_is_named_for(home, tmp_path):
    mine = signing.ensure_signing_key()
    other = signing.ensure_signing_key(tmp_path / "other-keys")
    manifest = b"{}"
    signature = signing.sign_manifest(manifest, other)
    kid = signing.key_id(other.public_key())
    mine_pub = home / "keys" / "trusted" / f"{signing.key_id(mine.public_key())}.pub"
    (home / "keys" / "trusted" / f"{kid}.pub").write_bytes(mine_pub.read_bytes())
    with pytest.raises(IntegrityError, match="does not hold key"):
        signing.verify_manifest(manifest, signature)


def test_sign_file_writes_manifest_sig_beside_it(home, tmp_path):
    manifest = tmp_path / "model" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text('{"name": "banking77"}')
    sig = signing.sign_file(manifest)
    assert sig == manifest.parent / "manifest.sig"
    assert signing.verify_file(manifest)
    manifest.write_text('{"name": "evil"}')
    with pytest.raises(IntegrityError):
        signing.verify_file(manifest)
    sig.unlink()
    with pytest.raises(IntegrityError, match=r"manifest\.sig is missing"):
        signing.verify_file(manifest)


def test_a_serving_box_cannot_create_or_use_a_signing_key(home):
    """The installer marks serving boxes (appliance_factory=false): no key is minted there."""
    (home / "keys").mkdir(parents=True)
    (home / "keys" / signing.SERVING_ONLY).write_text("installed by the appliance roles\n")
    with pytest.raises(signing.SigningUnavailable, match="this box cannot sign models: it is a serving box"):
        signing.ensure_signing_key()
    assert not (home / "keys" / "signing.key").exists()
    assert not (home / "keys" / "trusted").exists()


def test_train_on_a_serving_box_fails_before_training(home, tmp_path):
    (home / "keys").mkdir(parents=True)
    (home / "keys" / signing.SERVING_ONLY).write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "train", "--data", str(tmp_path / "none.csv"), "--name", "m"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "this box cannot sign models" in proc.stderr and "factory box" in proc.stderr
    assert not (home / "models").exists()
