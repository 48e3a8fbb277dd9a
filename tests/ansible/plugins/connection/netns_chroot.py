"""Ansible connection to a Debian chroot whose every command runs with no network at all.

The install tests point Ansible at a debootstrap tree on this machine. Each command runs in a
fresh, empty network namespace (only a downed loopback), so the playbook proves that nothing is
fetched on the target: a stray download fails instead of quietly succeeding. /proc is mounted in a
private mount namespace for the command's lifetime, so systemctl and Ansible's fact gathering see a
chroot (their "offline" code paths) and nothing leaks onto the host's mount table.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from typing import Any

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

DOCUMENTATION = """
name: netns_chroot
short_description: Run tasks in a chroot, each command in a new empty network namespace
description:
  - The host's address (C(ansible_host), else the inventory name) is the chroot directory.
  - Commands run as C(unshare --net --mount) + C(chroot); files move through C(dd) inside the chroot,
    so absolute symlinks in the tree are resolved inside it, never on the controller.
  - A missing tree, or one without C(/bin/sh), makes the host unreachable.
author: appliance
options: {}
"""

display = Display()

# Mount /proc privately, then enter the tree. "$0" is the root and "$1" the command, so neither
# is ever re-parsed by the shell.
_TARGET_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ENTER = 'mount -t proc proc "$0/proc" && exec chroot "$0" /bin/sh -c "$1"'


class Connection(ConnectionBase):
    """Connect to a chroot directory on the controller."""

    transport = "netns_chroot"
    has_pipelining = True
    has_tty = False
    default_user = "root"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.root = os.path.abspath(self._play_context.remote_addr or "")

    def _connect(self) -> Connection:
        if os.geteuid() != 0:
            raise AnsibleConnectionFailure("the netns_chroot connection needs root on the controller")
        shell = os.path.join(self.root, "bin", "sh")
        if not os.path.isdir(self.root) or not os.access(shell, os.X_OK):
            raise AnsibleConnectionFailure(f"chroot {self.root} does not exist or has no /bin/sh")
        if not self._connected:
            display.vvv(f"ENTER CHROOT {self.root} (no network)", host=self.root)
            self._connected = True
        return self

    def exec_command(
        self, cmd: str, in_data: bytes | None = None, sudoable: bool = True
    ) -> tuple[int, bytes, bytes]:
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        argv = ["unshare", "--net", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", _ENTER]
        argv += [self.root, cmd]
        display.vvv(f"EXEC {cmd}", host=self.root)
        proc = subprocess.run(argv, input=in_data, capture_output=True, check=False, env=_clean_env())
        return proc.returncode, proc.stdout, proc.stderr

    def put_file(self, in_path: str, out_path: str) -> None:
        super().put_file(in_path, out_path)
        display.vvv(f"PUT {in_path} TO {out_path}", host=self.root)
        script = f"dd of={shlex.quote(out_path)} bs=65536 status=none"
        with open(in_path, "rb") as source:
            proc = subprocess.run(
                ["chroot", self.root, "/bin/sh", "-c", script],
                stdin=source,
                capture_output=True,
                check=False,
                env=_clean_env(),
            )
        if proc.returncode != 0:
            detail = proc.stderr.decode(errors="replace")
            raise AnsibleError(f"could not write {out_path} in {self.root}: {detail}")

    def fetch_file(self, in_path: str, out_path: str) -> None:
        super().fetch_file(in_path, out_path)
        display.vvv(f"FETCH {in_path} TO {out_path}", host=self.root)
        with open(out_path, "wb") as target:
            proc = subprocess.run(
                ["chroot", self.root, "cat", "--", in_path],
                stdout=target,
                stderr=subprocess.PIPE,
                check=False,
                env=_clean_env(),
            )
        if proc.returncode != 0:
            detail = proc.stderr.decode(errors="replace")
            raise AnsibleError(f"could not read {in_path} in {self.root}: {detail}")

    def close(self) -> None:
        self._connected = False


def _clean_env() -> dict[str, str]:
    """The target gets a plain root environment, not the controller's virtualenv or proxies."""
    return {"PATH": _TARGET_PATH, "LANG": "C.UTF-8", "HOME": "/root"}
