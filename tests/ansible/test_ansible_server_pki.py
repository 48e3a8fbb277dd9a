"""The server role's TLS and token steps, with the real `appliance` CLI of this checkout.

The chroot install runs a minimal wheelhouse, whose CLI lacks the crypto stack; these steps are
run here instead, on the controller with the project's own virtualenv, into a scratch
APPLIANCE_HOME: the real CA, the real certificate, the real token store. Then once more, to show
they are idempotent, and with new names, to show the certificate is reissued. A second local host
plays a worker: it gets the head's certificate (every node's address and the shared name) by the
play that site.yml runs on the workers.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from install_harness import ANSIBLE_DIR, VENV_BIN, PlaybookRun, ansible_env

pytestmark = [pytest.mark.slow, pytest.mark.integration]


HEAD, WORKER = "box1.example.internal", "box2.example.internal"
SHARED_NAME = "appliance.internal"


def _play(tmp_path: Path, worker_address: str) -> PlaybookRun:
    """The head's TLS and token steps, then site.yml's worker play that copies the certificate,
    on two local hosts with their own homes; the certificate's names come from the role defaults."""
    common = {
        "appliance_common_venv": str(VENV_BIN.parent),
        "appliance_common_user": "root",
        "appliance_common_group": "root",
        "appliance_server_pki_shared_name": SHARED_NAME,
        "appliance_server_start": False,
    }
    site = yaml.safe_load((ANSIBLE_DIR / "site.yml").read_text())
    worker_play = next(play for play in site if play["hosts"] == "appliance_workers")
    head_play = {
        "name": "Run the server role's TLS and token steps",
        "hosts": "appliance_head",
        "gather_facts": False,
        "tasks": [
            {"ansible.builtin.import_role": {"name": "appliance_server", "tasks_from": name}}
            for name in ("pki.yml", "token.yml", "ownership.yml")
        ],
    }
    playbook = tmp_path / "pki.yml"
    playbook.write_text(yaml.safe_dump([head_play, worker_play]))
    lines = [f"[all:vars]\nansible_connection=local\nansible_python_interpreter={VENV_BIN / 'python'}"]
    lines += [f"{key}={json.dumps(value)}" for key, value in common.items()]
    boxes = (("appliance_head", HEAD, "10.20.0.11"), ("appliance_workers", WORKER, worker_address))
    for group, host, address in boxes:
        home, etc = tmp_path / host / "home", tmp_path / host / "etc"
        for folder in (home / "pki", home / "tokens", etc):
            folder.mkdir(parents=True, exist_ok=True)
        lines += [f"[{group}]", f"{host} appliance_address={address} appliance_common_home={home} "
                  f"appliance_common_config_dir={etc}"]  # fmt: skip
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("\n".join(lines) + "\n")
    proc = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), str(playbook)],
        cwd=ANSIBLE_DIR,
        env=ansible_env(inventory),
        capture_output=True,
        text=True,
        check=False,
    )
    return PlaybookRun(proc.returncode, proc.stdout + proc.stderr)


def _names(pki: Path) -> tuple[set[str], list[str]]:
    cert = x509.load_pem_x509_certificate((pki / "server.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    return set(names.get_values_for_type(x509.DNSName)), ips


def _same_on_the_worker(tmp_path: Path) -> None:
    head, worker = tmp_path / HEAD / "home" / "pki", tmp_path / WORKER / "home" / "pki"
    for name in ("ca.crt", "server.crt", "server.key"):
        assert (worker / name).read_bytes() == (head / name).read_bytes(), name
    assert (worker / "server.key").stat().st_mode & 0o777 == 0o600
    assert not (worker / "ca.key").exists()  # the CA key stays on the head


def test_tls_material_and_admin_token_with_the_real_cli(tmp_path: Path) -> None:
    if not (VENV_BIN / "appliance").exists() or not (VENV_BIN / "ansible-playbook").exists():
        pytest.skip("needs the project and ansible-core installed in the virtualenv")
    first = _play(tmp_path, "10.20.0.12")
    assert first.returncode == 0, first.output[-4000:]
    assert first.recap()[HEAD]["changed"] >= 3  # CA, names, certificate, token
    assert first.recap()[WORKER]["changed"] == 1  # one task: CA certificate, server certificate, key

    pki = tmp_path / HEAD / "home" / "pki"
    dns, ips = _names(pki)
    assert {HEAD, WORKER, SHARED_NAME, "localhost"} <= dns, dns
    assert ips == ["10.20.0.11", "127.0.0.1", "10.20.0.12"]
    _same_on_the_worker(tmp_path)
    token_file = tmp_path / HEAD / "etc" / "admin.token"
    secret = token_file.read_text().strip()
    assert secret and " " not in secret and token_file.stat().st_mode & 0o777 == 0o600
    assert secret not in (pki.parent / "tokens" / "tokens.json").read_text()  # hashed only

    again = _play(tmp_path, "10.20.0.12")
    assert again.returncode == 0, again.output[-4000:]
    assert again.recap()[HEAD]["changed"] == 0 and again.recap()[WORKER]["changed"] == 0, again.output[-4000:]
    assert token_file.read_text().strip() == secret  # created once, never rotated by a rerun

    readdressed = _play(tmp_path, "10.20.0.13")  # a worker's new address: reissued, and copied again
    assert readdressed.returncode == 0, readdressed.output[-4000:]
    assert _names(pki)[1] == ["10.20.0.11", "127.0.0.1", "10.20.0.13"]
    _same_on_the_worker(tmp_path)
