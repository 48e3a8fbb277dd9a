"""Fixtures for the install tests: a cached debootstrap tree, fresh targets, a minimal wheelhouse."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from install_harness import REPO, build_rootfs, require_root_tools


@pytest.fixture(scope="session")
def rootfs() -> Path:
    require_root_tools()
    return build_rootfs()


@pytest.fixture(scope="session")
def make_target(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Fresh copies of the pristine tree. They live in pytest's temporary folders, which pytest
    prunes to the last few sessions; deleting gigabytes of small files here would only slow CI."""

    def make(name: str) -> Path:
        target = tmp_path_factory.mktemp("targets") / name
        subprocess.run(["cp", "-a", str(rootfs), str(target)], check=True)
        return target

    return make


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A minimal bundle: the appliance wheel and Ray's closure (the full one is bench/install)."""
    out = tmp_path_factory.mktemp("bundle") / "wheelhouse"
    subprocess.run(
        [sys.executable, "-m", "appliance.bundle", "--profile", "core", "--minimal", "--out", str(out)],
        check=True,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
    )
    return out
