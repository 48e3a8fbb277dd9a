"""System tools that tests shell out to, installed with apt-get when a bare CI machine lacks them.

CI machines start clean and reach the Debian archive as a package registry, so a missing tool is
installed (as root) rather than skipped; without root or apt-get the test is skipped, saying why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading

import pytest

# The Debian package that provides each command.
PACKAGES = {
    "debootstrap": "debootstrap",
    "ip": "iproute2",
    "nft": "nftables",
    "strace": "strace",
    "systemd-analyze": "systemd",
}

_lock = threading.Lock()
_apt_updated = False


def ensure_tool(command: str) -> str:
    """The path of ``command``, installing its package first when it is missing."""
    found = shutil.which(command)
    if found is not None:
        return found
    package = PACKAGES[command]
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"{command} is not installed, and installing {package} needs root and apt-get")
    _apt_install(package)
    found = shutil.which(command)
    if found is None:
        raise AssertionError(f"apt-get installed {package}, but {command} is still not on PATH")
    return found


def _apt_install(package: str) -> None:
    global _apt_updated
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with _lock:
        if not _apt_updated:  # a fresh machine has no package lists; one update serves every install
            _run(["apt-get", "update", "-qq"], env)
            _apt_updated = True
        _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", package], env)


def _run(argv: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
