"""The install believes a bundle only with a valid signature by the release key given to it.

Each case runs the real playbook against a real (fresh) chroot with a bundle that was changed
after it was signed, or with the wrong or no release key, and checks that it fails with a clear
message and that nothing was installed. The control case installs the same bundle, signed.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from install_harness import (
    PlaybookRun,
    assert_untouched,
    chroot_vars,
    release_pubkey,
    run_playbook,
    write_inventory,
)

from appliance.security import release

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def box(make_target) -> Path:
    return make_target("release-check")


def _tamper_wheel(bundle: Path) -> None:
    wheel = next((bundle / "wheels").glob("appliance-*.whl"))
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0xFF
    wheel.write_bytes(bytes(data))


def _add_trusted_key(bundle: Path) -> None:
    (bundle / "keys" / "trusted" / "fedcba9876543210.pub").write_text("attacker key\n")


# Each case: how the signed bundle is changed afterwards, and the words the failure must say.
CASES: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "tampered wheel": (
        _tamper_wheel,
        ["wheels/appliance-", ".whl: sha256 differs from the signed SHA256SUMS"],
    ),
    "tampered model": (
        lambda b: (b / "models" / "demo" / "1" / "head.npz").write_bytes(b"other weights"),
        ["models/demo/1/head.npz: sha256 differs from the signed SHA256SUMS"],
    ),
    "added trusted key": (
        _add_trusted_key,
        ["keys/trusted/fedcba9876543210.pub: not in the signed SHA256SUMS"],
    ),
    "lock edited": (
        lambda b: (b / "requirements.lock").write_text((b / "requirements.lock").read_text() + "# edited\n"),
        ["requirements.lock: sha256 differs"],
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_a_changed_bundle_is_refused_and_installs_nothing(
    case: str, box: Path, bundle_with_model: Path, release_key: Path, tmp_path: Path
) -> None:
    change, expected = CASES[case]
    bundle = Path(shutil.copytree(bundle_with_model, tmp_path / "bundle"))
    change(bundle)
    run = _install(box, tmp_path, **chroot_vars(bundle, release_key=release_key))
    _assert_refused(run.returncode, run.output, ["Refusing to install on head", *expected])
    assert_untouched(box)


def test_a_bundle_signed_by_another_key_is_refused(
    box: Path, bundle_with_model: Path, release_key: Path, tmp_path: Path
) -> None:
    bundle = Path(shutil.copytree(bundle_with_model, tmp_path / "bundle"))
    _tamper_wheel(bundle)
    impostor = tmp_path / "impostor.key"
    release.init_key(impostor)
    release.sign_bundle(bundle, release.load_private_key(impostor))  # a consistent, re-signed bundle
    run = _install(box, tmp_path, **chroot_vars(bundle, release_key=release_key))
    pinned = release.key_id(release.load_public_key(release_pubkey(release_key)))
    _assert_refused(run.returncode, run.output, [f"not by the pinned key {pinned}"])
    assert_untouched(box)


def test_without_a_release_key_nothing_is_installed(
    box: Path, bundle_with_model: Path, release_key: Path, tmp_path: Path
) -> None:
    variables = {**chroot_vars(bundle_with_model, release_key=release_key), "appliance_release_pubkey": ""}
    run = _install(box, tmp_path, **variables)
    _assert_refused(
        run.returncode, run.output, ["set appliance_release_pubkey", "appliance keys release-init"]
    )
    assert_untouched(box)


def test_the_signed_bundle_passes_the_check(
    box: Path, bundle_with_model: Path, release_key: Path, tmp_path: Path
) -> None:
    """The control case: the same box and bundle, untouched, get past the check (in check mode)."""
    run = _install(box, tmp_path, "--check", **chroot_vars(bundle_with_model, release_key=release_key))
    assert run.returncode == 0, run.output[-3000:]
    assert (
        "TASK [appliance_common : Verify the bundle's release signature and every file's hash]" in run.output
    )
    assert "TASK [appliance_common : Create the appliance service account]" in run.output
    assert_untouched(box)


def _install(box: Path, tmp_path: Path, *extra: str, **variables: str) -> PlaybookRun:
    inventory = write_inventory(
        tmp_path / "inventory.ini",
        heads={"head": {"ansible_host": str(box), "appliance_address": "192.0.2.10"}},
        workers={},
        **variables,
    )
    return run_playbook(inventory, *extra)


def _assert_refused(returncode: int, output: str, expected: list[str]) -> None:
    assert returncode != 0, output[-3000:]
    flat = " ".join(output.split())  # Ansible wraps long messages
    missing = [words for words in expected if words not in flat]
    assert not missing, f"{missing} not in:\n{output[-3000:]}"
    assert "TASK [appliance_common : Create the appliance group]" not in output
