"""The server role's TLS and token steps, with the real `appliance` CLI of this checkout.

The chroot install runs a minimal wheelhouse, whose CLI lacks the crypto stack; these steps are
run here instead, on the controller with the project's own virtualenv, into a scratch
APPLIANCE_HOME: the real CA, the real certificate, the real token store. Then once more, to show
they are idempotent, and with new names, to show the certificate is reissued.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from install_harness import ANSIBLE_DIR, VENV_BIN, PlaybookRun, ansible_env

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _play(tmp_path: Path, hosts: list[str]) -> PlaybookRun:
    home, etc = tmp_path / "home", tmp_path / "etc"
    variables = {
        "appliance_common_venv": str(VENV_BIN.parent),
        "appliance_common_home": str(home),
        "appliance_common_config_dir": str(etc),
        "appliance_common_user": "root",
        "appliance_common_group": "root",
        "appliance_address": "127.0.0.1",
        "appliance_server_pki_hosts": hosts,
        "appliance_server_start": False,
    }
    playbook = tmp_path / "pki.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Run the server role's TLS and token steps",
                    "hosts": "localhost",
                    "connection": "local",
                    "gather_facts": False,
                    "vars": variables,
                    "tasks": [
                        {"ansible.builtin.import_role": {"name": "appliance_server", "tasks_from": name}}
                        for name in ("pki.yml", "token.yml", "ownership.yml")
                    ],
                }
            ]
        )
    )
    for folder in (home / "pki", home / "tokens", etc):
        folder.mkdir(parents=True, exist_ok=True)
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


def test_tls_material_and_admin_token_with_the_real_cli(tmp_path: Path) -> None:
    if not (VENV_BIN / "appliance").exists() or not (VENV_BIN / "ansible-playbook").exists():
        pytest.skip("needs the project and ansible-core installed in the virtualenv")
    first = _play(tmp_path, ["box1.example.internal", "10.20.0.11"])
    assert first.returncode == 0, first.output[-4000:]
    assert first.recap()["localhost"]["changed"] >= 3  # CA, names, certificate, token

    pki = tmp_path / "home" / "pki"
    cert = x509.load_pem_x509_certificate((pki / "server.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "box1.example.internal" in names.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.20.0.11"]
    token_file = tmp_path / "etc" / "admin.token"
    secret = token_file.read_text().strip()
    assert secret and " " not in secret and token_file.stat().st_mode & 0o777 == 0o600
    assert secret not in (tmp_path / "home" / "tokens").joinpath("tokens.json").read_text()  # hashed only

    again = _play(tmp_path, ["box1.example.internal", "10.20.0.11"])
    assert again.returncode == 0 and again.recap()["localhost"]["changed"] == 0, again.output[-4000:]
    assert token_file.read_text().strip() == secret  # created once, never rotated by a rerun

    renamed = _play(tmp_path, ["box1.example.internal", "10.20.0.12"])
    assert renamed.returncode == 0, renamed.output[-4000:]
    cert = x509.load_pem_x509_certificate((pki / "server.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.20.0.12"]
