"""Bundle release signatures: one ed25519 signature over the sha256 of every file of a bundle.

The checks run the verifier the way the installer does: this module's file, as a script, with an
isolated interpreter, against a public key that is not in the bundle.
"""

from __future__ import annotations

import ast
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.security import release

RELEASE_PY = Path(release.__file__)


def _bundle(root: Path) -> Path:
    """A bundle-shaped folder: wheels, the lock, the description, a model, a trusted key."""
    files = {
        "wheels/appliance-1.0-py3-none-any.whl": b"wheel bytes",
        "requirements.lock": b"appliance==1.0 --hash=sha256:" + b"a" * 64,
        "bundle.json": b'{"profile": "core"}',
        "models/demo/1/manifest.json": b'{"name": "demo"}',
        "models/demo/1/head.npz": b"weights",
        "keys/trusted/factory.pub": b"factory public key",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


@pytest.fixture
def release_key(tmp_path: Path) -> tuple[Path, Path]:
    key = tmp_path / "keys" / "release.key"
    return key, release.init_key(key)


def _verify(bundle: Path, pubkey: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-I", str(RELEASE_PY), "verify", str(bundle), "--pubkey", str(pubkey)],
        capture_output=True, text=True, check=False, cwd=bundle.parent,
    )  # fmt: skip


def _signed(tmp_path: Path, release_key: tuple[Path, Path]) -> Path:
    bundle = _bundle(tmp_path / "bundle")
    release.sign_bundle(bundle, release.load_private_key(release_key[0]))
    return bundle


def test_release_key_is_private_and_never_replaced(release_key: tuple[Path, Path]) -> None:
    key, public = release_key
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert public == key.with_name("release.key.pub")
    assert release.key_id(release.load_public_key(public)) == release.key_id(
        release.load_private_key(key).public_key()
    )
    before = key.read_bytes()
    with pytest.raises(release.ReleaseError, match="already exists"):
        release.init_key(key)
    assert key.read_bytes() == before


def test_signed_bundle_verifies_with_the_pinned_key(tmp_path: Path, release_key: tuple[Path, Path]) -> None:
    bundle = _signed(tmp_path, release_key)
    listed = (bundle / release.MANIFEST).read_text().splitlines()
    assert len(listed) == 6 and all(line.split("  ")[1] != release.SIGNATURE for line in listed)
    proc = _verify(bundle, release_key[1])
    assert proc.returncode == 0, proc.stderr
    assert "6 files match" in proc.stdout
    # The list is in sha256sum's format, so `sha256sum -c` agrees.
    check = subprocess.run(["sha256sum", "--strict", "-c", release.MANIFEST], cwd=bundle, capture_output=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("wheels/appliance-1.0-py3-none-any.whl", "wheels/appliance-1.0-py3-none-any.whl: sha256 differs"),
        ("models/demo/1/head.npz", "models/demo/1/head.npz: sha256 differs"),
        ("keys/trusted/factory.pub", "keys/trusted/factory.pub: sha256 differs"),
    ],
)
def test_a_tampered_file_is_refused_and_named(
    tmp_path: Path, release_key: tuple[Path, Path], change: str, message: str
) -> None:
    bundle = _signed(tmp_path, release_key)
    (bundle / change).write_bytes(b"tampered")
    proc = _verify(bundle, release_key[1])
    assert proc.returncode == 1
    assert message in proc.stderr


def test_an_added_or_removed_file_is_refused(tmp_path: Path, release_key: tuple[Path, Path]) -> None:
    bundle = _signed(tmp_path, release_key)
    (bundle / "keys" / "trusted" / "attacker.pub").write_bytes(b"another key")
    (bundle / "models" / "demo" / "1" / "head.npz").unlink()
    proc = _verify(bundle, release_key[1])
    assert proc.returncode == 1
    assert "keys/trusted/attacker.pub: not in the signed SHA256SUMS" in proc.stderr
    assert "models/demo/1/head.npz: missing" in proc.stderr


def test_a_rewritten_list_or_another_key_is_refused(tmp_path: Path, release_key: tuple[Path, Path]) -> None:
    bundle = _signed(tmp_path, release_key)
    # Re-listing a tampered wheel breaks the signature.
    (bundle / "wheels" / "appliance-1.0-py3-none-any.whl").write_bytes(b"tampered")
    manifest = bundle / release.MANIFEST
    manifest.write_bytes(release.render(release.digest_tree(bundle)))
    proc = _verify(bundle, release_key[1])
    assert proc.returncode == 1 and "SHA256SUMS.sig does not match SHA256SUMS" in proc.stderr
    # Re-signing with a key of one's own is refused too: the pinned key is what counts.
    _, other_public = release.init_key(tmp_path / "other.key"), tmp_path / "other.key.pub"
    release.sign_bundle(bundle, release.load_private_key(tmp_path / "other.key"))
    assert _verify(bundle, other_public).returncode == 0
    proc = _verify(bundle, release_key[1])
    assert proc.returncode == 1
    pinned = release.key_id(release.load_public_key(release_key[1]))
    assert f"not by the pinned key {pinned}" in proc.stderr


def test_an_unsigned_bundle_is_refused_with_the_fix(tmp_path: Path, release_key: tuple[Path, Path]) -> None:
    proc = _verify(_bundle(tmp_path / "bundle"), release_key[1])
    assert proc.returncode == 1
    assert "is not signed" in proc.stderr and "--release-key" in proc.stderr


def test_links_are_refused(tmp_path: Path, release_key: tuple[Path, Path]) -> None:
    bundle = _bundle(tmp_path / "bundle")
    (bundle / "wheels" / "link.whl").symlink_to("/etc/passwd")
    with pytest.raises(release.ReleaseError, match="not a regular file"):
        release.sign_bundle(bundle, release.load_private_key(release_key[0]))


def test_the_verifier_needs_nothing_but_the_standard_library_and_cryptography() -> None:
    """The installer runs it with the Ansible controller's Python, where the appliance is absent."""
    tree = ast.parse(RELEASE_PY.read_text())
    roots = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert roots - {"__future__", "cryptography"} <= set(sys.stdlib_module_names), roots
    role_copy = Path(__file__).parents[2] / "ansible/roles/appliance_common/files/release.py"
    assert role_copy.resolve() == RELEASE_PY.resolve()


def test_keys_release_init_command(tmp_path: Path) -> None:
    key = tmp_path / "release.key"
    proc = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "keys", "release-init", str(key)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "appliance_release_pubkey" in proc.stdout
    assert release.load_public_key(tmp_path / "release.key.pub")
    again = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "keys", "release-init", str(key)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert again.returncode == 1 and "already exists" in again.stderr
