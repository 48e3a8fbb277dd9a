"""Serving nodes without a shared filesystem: each ingress mirrors what it needs from the head.

The head's ``APPLIANCE_HOME`` is the cluster's one source of truth for what a node must agree on:
the published models and encoders, each model's serving choice (``SERVING``), the token store
(so a revocation made on the head holds everywhere) and the client-certificate revocation list.
``appliance serve`` starts a :class:`HomeSource` actor on its own node; every ingress replica on
another node runs a :class:`HomeMirror` that pulls over the cluster (Ray's object transfer, the
TLS channel between nodes) what it lacks or what changed, once before it warms and then every
:data:`MIRROR_PERIOD_S`.

Nothing that arrives is trusted for being from the head: a model version lands under a staging
name and becomes visible only after the local store has re-hashed every file and checked the
manifest's signature against this node's own trusted keys (an encoder: its content hash); one
that fails is deleted and logged, and never served. Small files are replaced atomically.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

from appliance.errors import ApplianceError
from appliance.files import make_private_dir, private_mode
from appliance.store import ENCODER_MANIFEST, MANIFEST, SERVING, ModelStore

if TYPE_CHECKING:
    from ray.actor import ActorHandle  # to a HomeSource

log = logging.getLogger(__name__)

SOURCE_NAME = "appliance-home-source"
SOURCE_NAMESPACE = "appliance"
MIRROR_PERIOD_S = 1.0
# The mutable files that every node must see as the head does (relative to APPLIANCE_HOME).
SHARED_FILES = ("tokens/tokens.json", "pki/ca.crl")
_STAGING = ".mirror-"
_NAME = r"[a-z0-9][a-z0-9_.-]{0,62}"  # the store's model names
_SHARED_FOLDER = re.compile(rf"models/{_NAME}/[0-9]{{1,9}}|encoders/[0-9a-f]{{64}}")
_SHARED_FILE = re.compile("|".join([*map(re.escape, SHARED_FILES), rf"models/{_NAME}/{SERVING}"]))


@dataclass(frozen=True)
class Listing:
    """What the head holds: immutable folders by name, small mutable files by content digest."""

    models: tuple[tuple[str, int], ...] = ()
    encoders: tuple[str, ...] = ()
    files: dict[str, str] = field(default_factory=dict)


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


class HomeSource:
    """Runs on the head as a Ray actor; reads its home, never writes it."""

    def __init__(self, home: str) -> None:
        self.store = ModelStore(Path(home))
        self.home = Path(home)

    def node_id(self) -> str:
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def listing(self) -> Listing:
        store = self.store
        models = tuple((name, version) for name in store.names() for version in store.versions(name))
        root = self.store.encoders_root
        encoders = (
            tuple(sorted(p.name for p in root.iterdir() if (p / ENCODER_MANIFEST).is_file()))
            if root.is_dir()
            else ()
        )
        rels = [*SHARED_FILES, *(f"models/{name}/{SERVING}" for name in self.store.names())]
        files = {rel: digest for rel in rels if (digest := _digest(self.home / rel)) is not None}
        return Listing(models, encoders, files)

    def folder(self, rel: str) -> dict[str, bytes]:
        """Every file of ``models/<name>/<version>`` or ``encoders/<id>``, by relative path."""
        root = self._shared(rel, _SHARED_FOLDER)
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    def file(self, rel: str) -> bytes | None:
        path = self._shared(rel, _SHARED_FILE)
        return path.read_bytes() if path.is_file() else None

    def _shared(self, rel: str, allowed: re.Pattern[str]) -> Path:
        """Only what every node must see: never the CA or signing keys, nor client secrets."""
        path = (self.home / rel).resolve()
        if not allowed.fullmatch(rel) or not path.is_relative_to(self.home.resolve()):
            raise ValueError(f"not a shared path: {rel!r}")
        return path


def start_source(home: Path) -> ActorHandle[HomeSource]:
    """The head's :class:`HomeSource`, pinned to this process's node; one per cluster."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    actor = ray.remote(num_cpus=0)(HomeSource)
    handle = actor.options(
        name=SOURCE_NAME,
        namespace=SOURCE_NAMESPACE,
        get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
    ).remote(str(home))
    return cast("ActorHandle[HomeSource]", handle)  # Ray's stubs type .remote() loosely


def find_source() -> ActorHandle[HomeSource] | None:
    """The cluster's source, or None (a single node, or a cluster started without one)."""
    import ray

    try:
        handle: ActorHandle[HomeSource] = ray.get_actor(SOURCE_NAME, namespace=SOURCE_NAMESPACE)
    except ValueError:
        return None
    return handle


class HomeMirror:
    """Keeps this node's home in step with the head's, verifying what it receives."""

    def __init__(self, home: Path, source: ActorHandle[HomeSource]) -> None:
        self.home = home
        self.store = ModelStore(home)
        self.source = source
        self.refused: set[str] = set()  # versions are immutable: one that failed is not fetched again

    async def sync_once(self) -> list[str]:
        """Pull what is missing or changed; returns what was installed (for logs and tests)."""
        listing: Listing = await self.source.listing.remote()
        installed: list[str] = []
        wanted = [  # encoders before the models that name them
            (f"encoders/{encoder_id}", self._check_encoder(encoder_id))
            for encoder_id in listing.encoders
            if not (self.store.encoders_root / encoder_id / ENCODER_MANIFEST).is_file()
        ] + [
            (f"models/{name}/{version}", self._check_model(name, version))
            for name, version in listing.models
            if not (self.store.path(name, version) / MANIFEST).is_file()
        ]
        for rel, check in wanted:
            if rel in self.refused:
                continue
            if await self._install(rel, check):
                installed.append(rel)
            else:
                self.refused.add(rel)
        for rel, digest in listing.files.items():
            if _digest(self.home / rel) != digest:
                data: bytes | None = await self.source.file.remote(rel)
                if data is not None and hashlib.sha256(data).hexdigest() == digest:
                    _replace_file(self.home / rel, data)
                    installed.append(rel)
        return installed

    async def run(self, period_s: float = MIRROR_PERIOD_S) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                changed = await self.sync_once()
            except Exception as exc:  # the head restarting: the last copy keeps serving
                log.warning("home mirror: %s", exc)
            else:
                if changed:
                    log.info("home mirror installed %s", ", ".join(changed))

    def _check_model(self, name: str, version: int) -> Callable[[], object]:
        return lambda: self.store.load(f"{name}:{version}", verify=True)

    def _check_encoder(self, encoder_id: str) -> Callable[[], object]:
        return lambda: self.store.encoder_folder(encoder_id, verify=True)

    async def _install(self, rel: str, check: Callable[[], object]) -> bool:
        """Write the head's folder under a staging name, rename it into place, verify it there
        (the store reads versions only from their final path) and delete it if it fails."""
        files: dict[str, bytes] = await self.source.folder.remote(rel)
        target = self.home / rel
        make_private_dir(target.parent)
        staging = Path(tempfile.mkdtemp(prefix=_STAGING, dir=target.parent))
        try:
            for name, data in files.items():
                path = (staging / name).resolve()
                if not path.is_relative_to(staging.resolve()):
                    raise ValueError(f"{rel}: a file outside its folder ({name!r})")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            os.chmod(staging, private_mode(target.parent, folder=True))
            os.rename(staging, target)
        except ValueError as exc:  # the head sent a path outside the folder: refuse the version
            shutil.rmtree(staging, ignore_errors=True)
            log.error("home mirror: refused %s from the head: %s", rel, exc)
            return False
        except OSError:  # this node's disk (full, read-only): tried again on the next sync
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            check()
        except (ApplianceError, OSError, ValueError, KeyError) as exc:
            shutil.rmtree(target, ignore_errors=True)
            log.error("home mirror: refused %s from the head: %s", rel, exc)
            return False
        return True


def _replace_file(path: Path, data: bytes) -> None:
    make_private_dir(path.parent)
    fd, temp = tempfile.mkstemp(prefix=_STAGING, dir=path.parent)
    try:
        os.fchmod(fd, private_mode(path.parent, folder=False))
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)


async def mirror_from_head(home: Path) -> HomeMirror | None:
    """On a node other than the head's: a mirror after its first full sync. None on the head's
    own node (same home) or where no source runs."""
    import ray

    source = find_source()
    if source is None:
        return None
    if await source.node_id.remote() == ray.get_runtime_context().get_node_id():
        return None
    mirror = HomeMirror(home, source)
    try:
        installed = await mirror.sync_once()
    except Exception as exc:  # serve what this node holds; the mirror's loop tries again
        log.warning("home mirror: first sync failed: %s", exc)
    else:
        log.info("home mirror: first sync installed %d item(s)", len(installed))
    return mirror
