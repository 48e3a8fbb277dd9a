"""Real targets for the install tests: Debian chroots built with debootstrap, reached by Ansible.

The pristine tree is built once and cached outside the repository, keyed by a hash of what went
into it; every test module gets fresh copies. Ansible reaches the copies through the netns_chroot
connection (tests/ansible/plugins/connection), which runs every target command with no network.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.system_tools import ensure_tool

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
PLUGINS = Path(__file__).resolve().parent / "plugins" / "connection"
VENV_BIN = Path(sys.executable).parent

SUITE = "bookworm"  # its python3 is 3.11, like ours
MIRROR = os.environ.get("APPLIANCE_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = ("python3", "python3-venv", "nftables", "systemd")
CACHE_ROOT = Path(os.environ.get("APPLIANCE_TEST_CACHE", "/var/tmp/appliance-tests"))
RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.MULTILINE)


def require_root_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("the install tests need root (debootstrap, chroot, network namespaces)")
    if not (VENV_BIN / "ansible-playbook").exists():
        pytest.skip(f"ansible-core is not installed in {VENV_BIN} (it is in the dev extras)")
    for command in ("debootstrap", "ip"):  # building the trees, and the tests' network namespaces
        ensure_tool(command)


def build_rootfs() -> Path:
    """The cached pristine Debian tree, built by debootstrap if absent."""
    key = hashlib.sha256(json.dumps([SUITE, MIRROR, PACKAGES, "minbase", 1]).encode()).hexdigest()[:16]
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    tree = CACHE_ROOT / f"debootstrap-{SUITE}-{key}"
    with (CACHE_ROOT / f"{tree.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others wait and reuse it
        if (tree / ".complete").exists():
            return tree
        scratch = tree.with_name(tree.name + ".partial")
        shutil.rmtree(scratch, ignore_errors=True)
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(scratch),
                MIRROR,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        shutil.rmtree(tree, ignore_errors=True)
        scratch.rename(tree)
        (tree / ".complete").touch()
    return tree


@dataclass
class PlaybookRun:
    returncode: int
    output: str

    def recap(self) -> dict[str, dict[str, int]]:
        """Per host: ok, changed, unreachable, failed, from the PLAY RECAP."""
        return {
            host: {"ok": int(ok), "changed": int(changed), "unreachable": int(unreach), "failed": int(failed)}
            for host, ok, changed, unreach, failed in RECAP.findall(self.output)
        }


def ansible_env(inventory: Path) -> dict[str, str]:
    return {
        **os.environ,
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
        "ANSIBLE_CONNECTION_PLUGINS": str(PLUGINS),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": str(inventory.parent / ".ansible-tmp"),
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
    }


def run_playbook(inventory: Path, *extra: str) -> PlaybookRun:
    """``ansible-playbook site.yml`` against ``inventory``."""
    proc = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), "site.yml", *extra],
        cwd=ANSIBLE_DIR,
        env=ansible_env(inventory),
        capture_output=True,
        text=True,
        check=False,
    )
    return PlaybookRun(proc.returncode, proc.stdout + proc.stderr)


def run_adhoc(inventory: Path, pattern: str, module: str, args: dict[str, object]) -> PlaybookRun:
    """One module on the hosts matching ``pattern``, the way the playbook's tasks run."""
    proc = subprocess.run(
        [str(VENV_BIN / "ansible"), "-i", str(inventory), pattern, "-m", module, "-a", json.dumps(args)],
        cwd=ANSIBLE_DIR,
        env=ansible_env(inventory),
        capture_output=True,
        text=True,
        check=False,
    )
    return PlaybookRun(proc.returncode, proc.stdout + proc.stderr)


def write_inventory(
    path: Path, heads: dict[str, dict[str, str]], workers: dict[str, dict[str, str]], **common: str
) -> Path:
    """An INI inventory: host name -> host variables, plus variables for every host."""

    def host_line(name: str, hostvars: dict[str, str]) -> str:
        return " ".join([name, *(f"{key}={value}" for key, value in hostvars.items())])

    lines = ["[appliance_head]", *(host_line(n, v) for n, v in heads.items()), ""]
    lines += ["[appliance_workers]", *(host_line(n, v) for n, v in workers.items()), ""]
    lines += ["[appliance:children]", "appliance_head", "appliance_workers", ""]
    lines += ["[appliance:vars]", *(f"{key}={value}" for key, value in common.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def release_pubkey(key: Path) -> Path:
    """The public key `appliance keys release-init KEY` writes beside the release key."""
    return key.with_name(key.name + ".pub")


def chroot_vars(wheelhouse: Path, serve_config: str = "", *, release_key: Path) -> dict[str, str]:
    """Variables for a chroot target: the services are installed and enabled, not started
    (there is no init in a chroot); the perimeter policy is loaded for real, in the command's own
    network namespace. The CLI-driven PKI, token and audit-key steps need the full profile
    (bench/install).
    ``release_key`` signed the wheelhouse; the install is given its public key."""
    return {
        "ansible_connection": "netns_chroot",
        "ansible_python_interpreter": "/usr/bin/python3",
        "appliance_wheelhouse": str(wheelhouse),
        "appliance_release_pubkey": str(release_pubkey(release_key)),
        "appliance_profile": "core",
        "appliance_ray_head_start": "false",
        "appliance_ray_worker_start": "false",
        "appliance_server_start": "false",
        "appliance_server_pki_manage": "false",
        "appliance_server_admin_token": "false",
        "appliance_common_audit_seal_manage": "false",
        "appliance_server_serve_config_src": serve_config,
        "appliance_perimeter_client_networks": "['198.51.100.0/24']",
    }


def assert_untouched(box: Path) -> None:
    """Nothing of the install reached ``box``: no code, no configuration, no account."""
    assert not (box / "opt" / "appliance").exists()
    assert not (box / "etc" / "appliance").exists()
    assert "appliance:" not in (box / "etc" / "passwd").read_text()
