"""Fixtures for the install tests: a cached debootstrap tree, fresh targets, a minimal wheelhouse."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from install_harness import REPO, build_rootfs, require_root_tools

from appliance.security import release


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
def release_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The release key that signs the test bundles; its public key is given to the playbook."""
    key = tmp_path_factory.mktemp("release") / "release.key"
    release.init_key(key)
    return key


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory, release_key: Path) -> Path:
    """A minimal bundle: the appliance wheel and Ray's closure (the full one is bench/install)."""
    out = tmp_path_factory.mktemp("bundle") / "wheelhouse"
    subprocess.run(
        [
            *(sys.executable, "-m", "appliance.bundle", "--profile", "core", "--minimal"),
            *("--out", str(out), "--release-key", str(release_key)),
        ],
        check=True,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
    )
    return out


@pytest.fixture(scope="session")
def bundle_with_model(wheelhouse: Path, release_key: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The minimal wheelhouse plus a model version and a trusted key, signed again."""
    folder = Path(shutil.copytree(wheelhouse, tmp_path_factory.mktemp("bundle-model") / "wheelhouse"))
    version = folder / "models" / "demo" / "1"
    version.mkdir(parents=True)
    (version / "manifest.json").write_text('{"name": "demo", "version": 1}')
    (version / "manifest.sig").write_text('{"alg": "ed25519"}')
    (version / "head.npz").write_bytes(b"head weights")
    (folder / "keys" / "trusted").mkdir(parents=True)
    (folder / "keys" / "trusted" / "0123456789abcdef.pub").write_text("factory key\n")
    release.sign_bundle(folder, release.load_private_key(release_key))
    return folder
