"""Promotion and rollback: one durable serving choice, changed only through AdminService.LoadModel.

``LoadModel`` verifies the version's files and signature, opens and warms it (and runs its
self-check set) before one assignment swaps it in, and records ``models/<name>/SERVING``; a
version that fails any of that is refused and the champion keeps serving. Every other replica
follows the record (:mod:`.follow`). Here, in front of it: a version is promoted only with a
passing gate verdict on that very manifest (unless forced), and every change is appended to the
history that rollback replays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from appliance.errors import FailedPrecondition
from appliance.loop.choices import ServingChange, append_history, rollback_target
from appliance.loop.gate import GateConfig, load_verdict
from appliance.store import ModelStore

POLICY_FILE = "policy.json"


class Loader(Protocol):
    """AdminService.LoadModel as the caller reaches it: returns the version served before (0: none)."""

    def __call__(self, ref: str) -> int: ...


@dataclass(frozen=True)
class LoopPolicy:
    """``$APPLIANCE_HOME/loop/policy.json``: the gate's rule, and whether a pass promotes at once."""

    auto_promote: bool = False
    gate: GateConfig = field(default_factory=GateConfig)

    @classmethod
    def read(cls, home: Path) -> LoopPolicy:
        path = home / "loop" / POLICY_FILE
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(bool(data.get("auto_promote", False)), GateConfig(**data.get("gate", {})))
        except (ValueError, TypeError) as exc:
            raise FailedPrecondition(f"{path}: not a loop policy ({exc})") from exc


def promote(store: ModelStore, name: str, version: int, load: Loader, *, force: bool = False) -> int:
    """Make ``name:version`` the serving version; returns the version it replaced."""
    if not force:
        verdict = load_verdict(store, name, version)
        if verdict is None:
            raise FailedPrecondition(
                f"{name}:{version} has not been gated (run `appliance gate {name}:{version}`, or --force)"
            )
        if not verdict.passed:
            failed = ", ".join(c.name for c in verdict.checks if not c.passed)
            raise FailedPrecondition(f"{name}:{version} failed the gate ({failed}); use --force to override")
    previous = load(f"{name}:{version}")  # refused: nothing changes, the champion keeps serving
    append_history(store, name, ServingChange(version, previous, "promote", forced=force))
    return previous


def rollback(store: ModelStore, name: str, load: Loader) -> tuple[int, int]:
    """Return to the champion before the serving one; returns (now serving, was serving)."""
    serving = store.serving_version(name)
    target = rollback_target(store, name, serving)
    previous = load(f"{name}:{target}")
    append_history(store, name, ServingChange(target, previous, "rollback"))
    return target, previous
