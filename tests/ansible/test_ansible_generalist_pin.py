"""The common role pins the generalist's model folder with the real `appliance generalist pin`:
once, as root, in a root-owned keys/generalist/; a second run changes nothing; a folder that
changed since is refused unless the inventory asks for a re-pin.

Like the key steps, these run on the controller with this checkout's CLI, into a scratch
APPLIANCE_HOME.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from install_harness import ANSIBLE_DIR, VENV_BIN, PlaybookRun, ansible_env

from appliance.engines.model_pin import pin_path, verify_model

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _play(tmp_path: Path, model_dir: Path, **extra: object) -> PlaybookRun:
    variables = {
        "appliance_common_venv": str(VENV_BIN.parent),
        "appliance_common_home": str(tmp_path / "home"),
        "appliance_generalist_model_dir": str(model_dir),
        **extra,
    }
    playbook = tmp_path / "generalist.yml"
    task = {"ansible.builtin.import_role": {"name": "appliance_common", "tasks_from": "generalist.yml"}}
    play = {
        "name": "Run the common role's generalist pin steps",
        "hosts": "localhost",
        "connection": "local",
        "gather_facts": False,
        "vars": variables,
        "tasks": [task],
    }
    playbook.write_text(yaml.safe_dump([play]))
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


def test_the_installer_pins_the_generalist_once_and_refuses_a_changed_folder(tmp_path: Path) -> None:
    if not (VENV_BIN / "appliance").exists() or not (VENV_BIN / "ansible-playbook").exists():
        pytest.skip("needs the project and ansible-core installed in the virtualenv")
    keys = tmp_path / "home" / "keys"
    keys.mkdir(parents=True)
    model = tmp_path / "generalist"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}\n')
    (model / "weights.bin").write_bytes(b"\0" * 64)

    first = _play(tmp_path, model)
    assert first.returncode == 0, first.output[-4000:]
    assert first.recap()["localhost"]["changed"] >= 1
    pin = pin_path(model, keys)
    assert verify_model(model, keys) == 2
    folder = pin.parent.stat()
    assert (folder.st_uid, folder.st_mode & 0o777) == (0, 0o755)  # readable, not writable, by the account
    assert (pin.stat().st_uid, pin.stat().st_mode & 0o777) == (0, 0o644)
    recorded = pin.read_bytes()

    again = _play(tmp_path, model)
    assert again.returncode == 0, again.output[-4000:]
    assert again.recap()["localhost"]["changed"] == 0, again.output[-4000:]
    assert pin.read_bytes() == recorded

    (model / "weights.bin").write_bytes(b"\1" * 64)
    refused = _play(tmp_path, model)
    assert refused.returncode != 0 and "weights.bin was modified" in refused.output, refused.output[-4000:]
    assert pin.read_bytes() == recorded  # the changed folder was not re-pinned

    repinned = _play(tmp_path, model, appliance_generalist_repin=True)
    assert repinned.returncode == 0, repinned.output[-4000:]
    assert verify_model(model, keys) == 2
    assert json.loads(pin.read_text())["files"] != json.loads(recorded)["files"]
