"""The common role makes the audit seal key pair with the real `appliance audit init-key`: the
private half root-owned 0400 (the service account cannot read chain keys back), the public half
0444 for the writer; a second run keeps the pair."""

from __future__ import annotations

from pathlib import Path

import pytest
from install_harness import VENV_BIN
from test_ansible_keys import _play

from appliance.security import audit_chain

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_the_installer_makes_a_root_only_audit_key(tmp_path: Path) -> None:
    if not (VENV_BIN / "appliance").exists() or not (VENV_BIN / "ansible-playbook").exists():
        pytest.skip("needs the project and ansible-core installed in the virtualenv")
    paths = audit_chain.key_paths(tmp_path / "home" / "keys")
    first = _play(tmp_path, factory=False)
    assert first.returncode == 0, first.output[-4000:]
    assert paths.private.stat().st_mode & 0o777 == 0o400 and paths.private.stat().st_uid == 0
    assert paths.public.stat().st_mode & 0o777 == 0o444
    public = paths.public.read_bytes()
    again = _play(tmp_path, factory=False)
    assert again.returncode == 0, again.output[-4000:]
    assert paths.public.read_bytes() == public  # chains sealed to it stay verifiable
    sealed = audit_chain.seal(audit_chain.writer_public_key(paths), b"k" * 32)
    assert audit_chain.unseal(audit_chain.verifier_private_key(paths), sealed) == b"k" * 32
