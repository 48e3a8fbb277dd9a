"""Durable choices beside the serving record: the shadow setting and the history of serving choices.

Under ``models/<name>/``, next to ``SERVING`` (the version a bare name serves):

- ``SHADOW``: ``{"version": V, "fraction": F}`` while version V answers a share F of live traffic
  in shadow; absent when shadow is off. Every replica's runtime watches it (:mod:`.follow`).
- ``HISTORY.jsonl``: one line per promotion or rollback, appended and fsynced, oldest first; what
  ``appliance rollback`` replays to find the previous champion.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from appliance.errors import FailedPrecondition, InvalidArgument
from appliance.files import make_private_dir
from appliance.store import ModelStore, validate_name

SHADOW = "SHADOW"
HISTORY = "HISTORY.jsonl"


@dataclass(frozen=True)
class ShadowChoice:
    version: int
    fraction: float

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise InvalidArgument(f"shadow fraction {self.fraction:g}: must be in (0, 1]")
        if self.version < 1:
            raise InvalidArgument(f"shadow version {self.version}: must be a published version")


def _folder(store: ModelStore, name: str) -> Path:
    return store.models_root / validate_name(name)


def _write_atomic(path: Path, data: bytes) -> None:
    make_private_dir(path.parent)
    temp = path.with_name(f".{path.name}-{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)


def read_shadow(store: ModelStore, name: str) -> ShadowChoice | None:
    """The shadow choice, or None when off (or the record is unreadable: shadow never harms serving)."""
    try:
        data = json.loads((_folder(store, name) / SHADOW).read_text(encoding="utf-8"))
        return ShadowChoice(int(data["version"]), float(data["fraction"]))
    except (OSError, ValueError, KeyError, TypeError, InvalidArgument):
        return None


def set_shadow(store: ModelStore, name: str, choice: ShadowChoice | None) -> None:
    path = _folder(store, name) / SHADOW
    if choice is None:
        path.unlink(missing_ok=True)
        return
    _write_atomic(path, json.dumps(asdict(choice)).encode())


Action = Literal["promote", "rollback"]


@dataclass(frozen=True)
class ServingChange:
    version: int
    previous: int  # 0: nothing was serving
    action: Action
    forced: bool = False
    epoch: float = 0.0


def append_history(store: ModelStore, name: str, change: ServingChange) -> None:
    path = _folder(store, name) / HISTORY
    make_private_dir(path.parent)
    line = json.dumps({**asdict(change), "epoch": change.epoch or time.time()}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_history(store: ModelStore, name: str) -> list[ServingChange]:
    path = _folder(store, name) / HISTORY
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    changes = []
    for line in lines:
        try:
            changes.append(ServingChange(**json.loads(line)))
        except (ValueError, TypeError):
            continue  # a torn last line of a crashed append
    return changes


def champions(changes: list[ServingChange]) -> list[int]:
    """The stack of champions the history leaves: a promotion pushes, a rollback pops."""
    stack: list[int] = []
    for change in changes:
        if change.action == "promote":
            if not stack and change.previous:
                stack.append(change.previous)
            if not stack or stack[-1] != change.version:
                stack.append(change.version)
        else:
            while stack and stack[-1] != change.version:
                stack.pop()
            if not stack:
                stack.append(change.version)
    return stack


def rollback_target(store: ModelStore, name: str, serving: int | None) -> int:
    """The champion before the one serving now; FailedPrecondition when there is none."""
    stack = champions(read_history(store, name))
    if serving is not None:
        while stack and stack[-1] != serving:
            stack.pop()
    published = set(store.versions(name))
    for version in reversed(stack[:-1]):
        if version in published:
            return version
    raise FailedPrecondition(
        f"no previous champion of {name!r} to roll back to (serving {serving or 'none'}; "
        f"history: {stack or 'empty'})"
    )
