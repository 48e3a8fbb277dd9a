"""The model store: versioned, content-hashed, signed, published atomically.

Layout under ``$APPLIANCE_HOME``::

    models/<name>/<version>/manifest.json   every file's sha256, labels, metrics, threshold ...
    models/<name>/<version>/manifest.sig    ed25519 signature over manifest.json
    models/<name>/<version>/head.npz        the classification head (weight [C, D], bias [C])
    models/<name>/<version>/MODEL_CARD.md
    models/<name>/SERVING                   the version a bare <name> serves (AdminService.LoadModel)
    encoders/<encoder_id>/encoder.json      shared encoders, stored once, named by content hash
    encoders/<encoder_id>/model.onnx, tokenizer.json, ...

A version becomes visible only through one ``rename`` of a fully written folder, so an
interrupted publish leaves no half model. Loading re-hashes every file and checks the signature.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from appliance import config
from appliance.artifact.manifest import SpecialistManifest
from appliance.errors import IntegrityError, InvalidArgument, NotFound
from appliance.files import make_private_dir, private_mode, restrict_tree

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
ENCODER_MANIFEST = "encoder.json"
MANIFEST_FORMAT = 1
# models/<name>/SERVING: the version a bare NAME is served at, as an admin last chose it.
SERVING = "SERVING"
# Lower-case names that are safe as one path component on every platform.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
# ASCII digits only: str.isdigit() also accepts '²' or '١', which int() rejects or misreads; and
# few of them, so that int() never meets a 5,000-digit string (it refuses over 4,300).
MAX_VERSION_DIGITS = 9
VERSION_RE = re.compile(rf"[0-9]{{1,{MAX_VERSION_DIGITS}}}")
_STAGING_PREFIX = ".staging-"


def validate_name(name: str) -> str:
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidArgument(
            f"invalid model name {name!r}: use 1-63 characters of a-z, 0-9, '_', '-', '.', "
            "starting with a letter or digit (no paths)"
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME:VERSION`` → (name, version or None)."""
    name, sep, version = ref.partition(":")
    validate_name(name)
    if not sep:
        return name, None
    return name, parse_version(version, where=ref)


def parse_version(version: str, where: str = "") -> int:
    """A version as callers write it: a positive integer of at most 9 ASCII digits."""
    if not VERSION_RE.fullmatch(version) or int(version) < 1:
        shown = where or version
        shown = shown if len(shown) <= 80 else f"{shown[:80]}... ({len(shown)} characters)"
        raise InvalidArgument(
            f"invalid model version in {shown!r}: expected a positive integer of at most "
            f"{MAX_VERSION_DIGITS} digits"
        )
    return int(version)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(folder: Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every regular file below ``folder``, keyed by POSIX relative path."""
    out: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in exclude:
            out[rel] = sha256_file(path)
    return out


def canonical_json(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def folder_digest(files: Mapping[str, str]) -> str:
    """One content hash for a set of files, independent of where the folder lives."""
    return hashlib.sha256(canonical_json(files)).hexdigest()


def _check_files(folder: Path, expected: Mapping[str, str], exclude: tuple[str, ...]) -> None:
    actual = hash_files(folder, exclude)
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    changed = sorted(k for k in expected.keys() & actual.keys() if expected[k] != actual[k])
    problems = [f"missing {missing}"] * bool(missing) + [f"unexpected {extra}"] * bool(extra)
    problems += [f"modified {changed}"] * bool(changed)
    if problems:
        raise IntegrityError(f"{folder}: files do not match the manifest: {'; '.join(problems)}")


@dataclass(frozen=True)
class Manifest:
    """A verified manifest and the folder it describes.

    ``data`` is the JSON object exactly as signed; the store itself needs only its name, version
    and file hashes. ``spec`` is the same object read as a specialist's manifest.
    """

    folder: Path
    data: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.data["name"])

    @property
    def version(self) -> int:
        return int(self.data["version"])

    @functools.cached_property
    def spec(self) -> SpecialistManifest:
        """The typed specialist manifest; IntegrityError when the JSON is not one."""
        try:
            return SpecialistManifest.model_validate(self.data)
        except ValidationError as exc:
            raise IntegrityError(f"{self.folder / MANIFEST}: not a specialist manifest: {exc}") from exc

    @property
    def encoder_id(self) -> str:
        return self.spec.encoder.id


class ModelStore:
    def __init__(self, home: Path | None = None, *, require_signature: bool = True) -> None:
        self.home = home or config.appliance_home()
        self.models_root = self.home / "models"
        self.encoders_root = self.home / "encoders"
        self.keys_dir = self.home / "keys"
        self.require_signature = require_signature

    # ------------------------------------------------------------------ listing
    def names(self) -> list[str]:
        if not self.models_root.is_dir():
            return []
        return sorted(p.name for p in self.models_root.iterdir() if p.is_dir() and NAME_RE.fullmatch(p.name))

    def versions(self, name: str) -> list[int]:
        folder = self.models_root / validate_name(name)
        if not folder.is_dir():
            return []
        return sorted(
            int(p.name) for p in folder.iterdir() if VERSION_RE.fullmatch(p.name) and (p / MANIFEST).is_file()
        )

    def resolve(self, ref: str) -> tuple[str, int]:
        name, version = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            raise NotFound(f"no published model named {name!r} in {self.models_root}")
        if version is None:
            return name, versions[-1]
        if version not in versions:
            raise NotFound(f"model {name!r} has no version {version} (published: {versions})")
        return name, version

    def path(self, name: str, version: int) -> Path:
        return self.models_root / validate_name(name) / str(version)

    # ------------------------------------------------------------------ the serving choice
    def serving_version(self, name: str) -> int | None:
        """The version an admin last chose to serve for a bare ``name``; None if never chosen
        (or the record is unreadable: then the newest version serves, as with no record)."""
        path = self.models_root / validate_name(name) / SERVING
        try:
            text = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return int(text) if VERSION_RE.fullmatch(text) and int(text) >= 1 else None

    def served_version(self, name: str) -> int:
        """The version a bare ``name`` serves: the recorded choice while it is published, else the newest."""
        published = self.versions(name)
        if not published:
            raise NotFound(f"no published model named {name!r} in {self.models_root}")
        chosen = self.serving_version(name)
        return chosen if chosen in published else published[-1]

    def set_serving_version(self, name: str, version: int) -> None:
        """Record the serving choice durably: a temporary file, fsynced, renamed over the old one."""
        folder = self.models_root / validate_name(name)
        make_private_dir(folder)
        temp = folder / f"{_STAGING_PREFIX}{SERVING}-{secrets.token_hex(4)}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, private_mode(folder, folder=False))
            os.write(fd, f"{version}\n".encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(temp, folder / SERVING)
        except OSError:
            temp.unlink(missing_ok=True)
            raise
        _fsync_dir(folder)

    # ------------------------------------------------------------------ loading
    def load(self, ref: str, *, verify: bool = True) -> Manifest:
        """Read a manifest; with ``verify``, check every file hash and the signature."""
        name, version = self.resolve(ref)
        folder = self.path(name, version)
        raw = (folder / MANIFEST).read_bytes()
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise IntegrityError(f"{folder / MANIFEST}: not valid JSON ({exc})") from exc
        if verify:
            self._verify_signature(folder, raw)
            _check_files(folder, data.get("files", {}), exclude=(MANIFEST, SIGNATURE))
        if data.get("name") != name or int(data.get("version", -1)) != version:
            raise IntegrityError(f"{folder}: manifest names {data.get('name')}:{data.get('version')}")
        return Manifest(folder, data)

    def _verify_signature(self, folder: Path, raw: bytes) -> None:
        from appliance.security import signing

        sig_path = folder / SIGNATURE
        if not sig_path.is_file():
            if self.require_signature:
                raise IntegrityError(f"{folder}: unsigned model (no {SIGNATURE})")
            return
        signing.verify_manifest(raw, sig_path.read_bytes(), self.keys_dir / "trusted")

    def encoder_folder(self, encoder_id: str, *, verify: bool = True) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", encoder_id):
            raise IntegrityError(f"invalid encoder id {encoder_id!r}")
        folder = self.encoders_root / encoder_id
        if not (folder / ENCODER_MANIFEST).is_file():
            raise IntegrityError(f"encoder {encoder_id[:12]} is missing from {self.encoders_root}")
        if verify:
            files = json.loads((folder / ENCODER_MANIFEST).read_text())["files"]
            if folder_digest(files) != encoder_id:
                raise IntegrityError(f"{folder}: encoder.json does not match its content hash")
            _check_files(folder, files, exclude=(ENCODER_MANIFEST,))
        return folder

    def encoder_info(self, encoder_id: str) -> dict[str, Any]:
        info: dict[str, Any] = json.loads((self.encoders_root / encoder_id / ENCODER_MANIFEST).read_text())
        return info

    # ------------------------------------------------------------------ writing
    def put_encoder(self, source: Path, info: Mapping[str, Any]) -> str:
        """Store an encoder folder once, by content hash; returns its id."""
        files = hash_files(source, exclude=(ENCODER_MANIFEST,))
        encoder_id = folder_digest(files)
        target = self.encoders_root / encoder_id
        if (target / ENCODER_MANIFEST).is_file():
            return encoder_id
        make_private_dir(self.encoders_root)
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=self.encoders_root))
        try:
            for rel in files:
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source / rel, staging / rel)
            (staging / ENCODER_MANIFEST).write_bytes(canonical_json({**info, "files": files}))
            restrict_tree(staging, like=self.encoders_root)
            _fsync_tree(staging)
            try:
                os.rename(staging, target)
            except OSError:
                if not (target / ENCODER_MANIFEST).is_file():  # lost a race to an identical copy
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return encoder_id

    @contextlib.contextmanager
    def staging(self, name: str) -> Iterator[Staging]:
        """A private folder to write a new version into; ``commit`` publishes it atomically.

        Leaving the block without ``commit`` (an error, an interrupt) deletes the folder.
        """
        folder = self.models_root / validate_name(name)
        make_private_dir(folder)
        stage = Staging(self, name, Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=folder)))
        try:
            yield stage
        finally:
            shutil.rmtree(stage.folder, ignore_errors=True)

    def remove(self, ref: str) -> list[int]:
        """Delete one version (``NAME:VERSION``) or every version (``NAME``)."""
        name, version = parse_ref(ref)
        targets = [version] if version is not None else self.versions(name)
        if not targets or (version is not None and version not in self.versions(name)):
            raise NotFound(f"no published model {ref!r}")
        for v in targets:
            # Rename first, so a reader never sees a half-deleted version. A unique name, so the
            # leftover of an interrupted rm never blocks the next one.
            doomed = self.path(name, v).with_name(f"{_STAGING_PREFIX}rm-{v}-{secrets.token_hex(4)}")
            os.rename(self.path(name, v), doomed)
            shutil.rmtree(doomed)
        if self.serving_version(name) in targets:  # a choice of a version that is gone means nothing
            (self.models_root / name / SERVING).unlink(missing_ok=True)
        # rmdir, not rmtree: a concurrent publish may be staging a new version in this folder.
        with contextlib.suppress(OSError):
            (self.models_root / name).rmdir()
        return targets


@dataclass
class Staging:
    store: ModelStore
    name: str
    folder: Path

    def commit(self, fields: Mapping[str, Any]) -> Manifest:
        """Hash the staged files, write and sign the manifest, and publish as the next version."""
        from appliance.security import signing

        files = hash_files(self.folder, exclude=(MANIFEST, SIGNATURE))
        for _ in range(100):  # another publisher may take the version we picked
            versions = self.store.versions(self.name)
            version = (versions[-1] if versions else 0) + 1
            data = {
                **fields,
                "format": MANIFEST_FORMAT,
                "name": self.name,
                "version": version,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "files": files,
            }
            raw = canonical_json(data)
            (self.folder / MANIFEST).write_bytes(raw)
            key = signing.ensure_signing_key(self.store.keys_dir)
            (self.folder / SIGNATURE).write_text(signing.sign_manifest(raw, key))
            restrict_tree(self.folder, like=self.folder.parent)  # files written with the umask's modes
            _fsync_tree(self.folder)
            target = self.store.path(self.name, version)
            try:
                os.rename(self.folder, target)
            except OSError:
                if target.exists():
                    continue
                raise
            self.folder = target.with_name(f"{_STAGING_PREFIX}done")  # nothing left to clean
            return Manifest(target, data)
        raise RuntimeError(f"could not allocate a version for {self.name!r}")


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def iter_staging(root: Path) -> Iterator[Path]:
    """Leftovers of interrupted publishes (never visible as versions)."""
    if root.is_dir():
        yield from (p for p in root.rglob(f"{_STAGING_PREFIX}*") if p.is_dir())
