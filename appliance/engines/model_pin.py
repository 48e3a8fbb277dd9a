"""Pins for the generalist's model folder: the sha256 of every file, recorded once, checked on load.

A specialist is signed by the factory; the generalist is a folder of weights and configs that an
operator copies onto the box. ``appliance generalist pin PATH`` (run at install, as the user that
owns ``$APPLIANCE_HOME/keys``) records the hash of each of its files in
``$APPLIANCE_HOME/keys/generalist/<id>.json``, outside the folder it describes; the engine then
refuses to start when any file was changed, removed or added, and names it. On boxes installed by
the Ansible roles ``keys/`` is root-owned, so the serving account cannot re-pin a modified folder.

A folder with no pin is served with a warning, so that ad-hoc development use keeps working; pin
every folder a box serves.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

from appliance.config import appliance_home
from appliance.errors import IntegrityError
from appliance.files import write_atomic
from appliance.store import hash_files

PIN_FORMAT = 1
log = logging.getLogger(__name__)


def pin_path(model_dir: Path, keys: Path | None = None) -> Path:
    """Where the pin of ``model_dir`` lives: named by a hash of the folder's resolved path."""
    folder = str(model_dir.resolve())
    name = hashlib.sha256(folder.encode()).hexdigest()[:16]
    return (keys if keys is not None else appliance_home() / "keys") / "generalist" / f"{name}.json"


def pin_model(model_dir: Path, keys: Path | None = None) -> Path:
    """Record the sha256 of every file of ``model_dir``; returns the pin file."""
    if not model_dir.is_dir():
        raise IntegrityError(f"{model_dir} is not a folder")
    files = hash_files(model_dir)
    if not files:
        raise IntegrityError(f"{model_dir} holds no files")
    body = {"format": PIN_FORMAT, "path": str(model_dir.resolve()), "files": files}
    target = pin_path(model_dir, keys)
    write_atomic(target, (json.dumps(body, indent=1, sort_keys=True) + "\n").encode(), mode=0o644)
    return target


def verify_model(model_dir: Path, keys: Path | None = None) -> int | None:
    """Check ``model_dir`` against its pin: the number of files checked, None when not pinned.

    IntegrityError, naming every file that differs, when a pinned folder changed."""
    target = pin_path(model_dir, keys)
    if not target.exists():
        log.warning("generalist model %s is not pinned; `appliance generalist pin` it", model_dir)
        return None
    try:
        pinned: dict[str, str] = json.loads(target.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"the pin {target} of {model_dir} is unreadable: {exc}") from exc
    present = hash_files(model_dir)
    problems = [f"{rel} is missing" for rel in sorted(pinned.keys() - present.keys())]
    problems += [f"{rel} is not pinned (added)" for rel in sorted(present.keys() - pinned.keys())]
    problems += [
        f"{rel} was modified" for rel in sorted(pinned.keys() & present.keys()) if pinned[rel] != present[rel]
    ]
    if problems:
        raise IntegrityError(
            f"generalist model {model_dir} does not match its pin {target}: {'; '.join(problems)}. "
            "Restore the folder, or re-pin it if the change is intended."
        )
    return len(pinned)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("generalist", help="the generalist LLM's model folder")
    commands = parser.add_subparsers(dest="generalist_command", metavar="ACTION", required=True)
    pin = commands.add_parser("pin", help="record the sha256 of every file of a model folder")
    pin.add_argument("path", type=Path, metavar="PATH")
    pin.set_defaults(func=_pin)
    verify = commands.add_parser("verify", help="check a model folder against its pin")
    verify.add_argument("path", type=Path, metavar="PATH")
    verify.set_defaults(func=_verify)


def _pin(args: argparse.Namespace) -> int:
    try:
        target = pin_model(args.path)
    except (IntegrityError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"pinned {args.path}: {len(json.loads(target.read_text())['files'])} files in {target}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    try:
        count = verify_model(args.path)
    except (IntegrityError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if count is None:
        print(f"error: {args.path} is not pinned (no {pin_path(args.path)})", file=sys.stderr)
        return 1
    print(f"{args.path}: {count} files match {pin_path(args.path)}")
    return 0
