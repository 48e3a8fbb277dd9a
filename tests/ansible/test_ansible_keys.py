"""The common role's key steps on a factory box, with the real `appliance` CLI of this checkout.

A chroot of the minimal wheelhouse has no crypto stack for `appliance keys signing-init`, so (as
for the PKI steps) these run on the controller into a scratch APPLIANCE_HOME: a factory gets one
signing key, trusted read-only; turning the box into a serving box marks it, and `appliance train`
there then refuses to start, and the private key is removed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from install_harness import ANSIBLE_DIR, VENV_BIN, PlaybookRun, ansible_env

from appliance.security import signing

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _play(tmp_path: Path, factory: bool) -> PlaybookRun:
    variables = {
        "appliance_common_venv": str(VENV_BIN.parent),
        "appliance_common_home": str(tmp_path / "home"),
        "appliance_common_user": "root",
        "appliance_common_group": "root",
        "appliance_common_trusted_keys_src": str(tmp_path / "no-bundle"),
        "appliance_factory": factory,
    }
    playbook = tmp_path / "keys.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Run the common role's key steps",
                    "hosts": "localhost",
                    "connection": "local",
                    "gather_facts": False,
                    "vars": variables,
                    "tasks": [
                        {
                            "ansible.builtin.import_role": {
                                "name": "appliance_common",
                                "tasks_from": "keys.yml",
                            }
                        }
                    ],
                }
            ]
        )
    )
    (tmp_path / "home").mkdir(exist_ok=True)
    inventory = tmp_path / "localhost.ini"
    inventory.write_text("localhost ansible_python_interpreter=" + str(VENV_BIN / "python") + "\n")
    proc = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), str(playbook)],
        cwd=ANSIBLE_DIR,
        env=ansible_env(inventory),
        capture_output=True,
        text=True,
        check=False,
    )
    return PlaybookRun(proc.returncode, proc.stdout + proc.stderr)


def test_a_factory_gets_one_trusted_signing_key_and_a_serving_box_none(tmp_path: Path) -> None:
    if not (VENV_BIN / "appliance").exists() or not (VENV_BIN / "ansible-playbook").exists():
        pytest.skip("needs the project and ansible-core installed in the virtualenv")
    keys = tmp_path / "home" / "keys"
    first = _play(tmp_path, factory=True)
    assert first.returncode == 0, first.output[-4000:]
    key_file = keys / "signing.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    kid = signing.key_id(signing.ensure_signing_key(keys).public_key())
    [trusted] = (keys / "trusted").iterdir()
    assert trusted.name == f"{kid}.pub" and trusted.stat().st_mode & 0o777 == 0o444
    assert (keys / "trusted").stat().st_mode & 0o777 == 0o755
    assert not (keys / signing.SERVING_ONLY).exists()

    again = _play(tmp_path, factory=True)
    assert again.returncode == 0 and again.recap()["localhost"]["changed"] == 0, again.output[-4000:]
    assert signing.key_id(signing.ensure_signing_key(keys).public_key()) == kid  # never replaced

    serving = _play(tmp_path, factory=False)
    assert serving.returncode == 0, serving.output[-4000:]
    assert (keys / signing.SERVING_ONLY).stat().st_mode & 0o777 == 0o444
    assert not key_file.exists()  # the private key is gone; its models stay trusted
    assert [p.name for p in (keys / "trusted").iterdir()] == [f"{kid}.pub"]
    env = {"APPLIANCE_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    train = subprocess.run(
        [str(VENV_BIN / "appliance"), "train", "--data", str(tmp_path / "none.csv"), "--name", "m"],
        capture_output=True, text=True, check=False, env=env,
    )  # fmt: skip
    assert train.returncode == 2 and "this box cannot sign models" in train.stderr, train.stderr
