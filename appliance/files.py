"""Crash-safe file writes for secrets and state files, and the modes that state is created with.

Everything the appliance creates under its home is private: files 0600, folders 0700, whatever
the umask. An installer that shares a folder with a group (Ansible gives ``models``, ``audit``
and the home itself mode 0750 and the appliance group) keeps that: what is created inside a
folder its group may read gets group read too (0640, 0750). Others never get a bit.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import IO

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def private_mode(parent: Path, *, folder: bool) -> int:
    """The mode for a new file (or ``folder``) in ``parent``: private, plus group read where
    ``parent`` grants its group read."""
    try:
        shared = bool(os.stat(parent).st_mode & stat.S_IRGRP)
    except FileNotFoundError:
        shared = False
    if folder:
        return PRIVATE_DIR | (0o050 if shared else 0)
    return PRIVATE_FILE | (0o040 if shared else 0)


def make_private_dir(path: Path) -> None:
    """``mkdir -p`` whose new folders get :func:`private_mode` (existing ones are left as they are)."""
    path = Path(path)
    missing: list[Path] = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        mode = private_mode(folder.parent, folder=True)
        try:
            os.mkdir(folder, mode)
        except FileExistsError:  # made by someone else meanwhile: theirs
            continue
        os.chmod(folder, mode)  # mkdir's mode passes through the umask


def create_private_file(path: Path) -> bool:
    """Create an empty ``path`` with :func:`private_mode` unless it exists; True when it was made."""
    make_private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, private_mode(path.parent, folder=False))
    finally:
        os.close(fd)
    return True


def open_private_append(path: Path) -> IO[bytes]:
    """``open(path, "ab")``, creating the file with :func:`private_mode` when it is new."""
    create_private_file(path)
    return open(path, "ab")  # the caller owns the handle


def restrict_tree(root: Path, like: Path) -> None:
    """Give ``root`` and everything under it the modes of new entries of the folder ``like`` (a
    staged tree about to be renamed into it, whose files other code wrote with the umask's modes)."""
    file_mode = private_mode(like, folder=False)
    dir_mode = private_mode(like, folder=True)
    os.chmod(root, dir_mode)
    for path in root.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, dir_mode if path.is_dir() else file_mode)


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a temp file in the same folder, fsync it, then rename it over ``path``.

    The temp file has ``mode`` from the start, so a secret is never readable by others, not even
    for a moment, and readers never see a half-written file."""
    make_private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
