"""``appliance keys``: the release key that signs bundles, and this box's model-signing key."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from appliance.errors import ApplianceError
from appliance.security import release, signing


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("keys", help="the release key that signs bundles; this box's signing key")
    commands = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    release_init = commands.add_parser(
        "release-init",
        help="create an ed25519 release key (PATH) and its public key (PATH.pub) to pin on the installer",
    )
    release_init.add_argument("path", type=Path, metavar="PATH")
    release_init.set_defaults(func=_release_init)
    signing_init = commands.add_parser(
        "signing-init", help="create this box's model-signing key and trust it (factory boxes only)"
    )
    signing_init.add_argument("--dir", default=None, help="keys folder (default: $APPLIANCE_HOME/keys)")
    signing_init.set_defaults(func=_signing_init)


def _release_init(args: argparse.Namespace) -> int:
    try:
        public = release.init_key(args.path)
    except (release.ReleaseError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"release key {args.path}: keep it off the boxes")
    print(f"public key {public}: give it to the installer as appliance_release_pubkey")
    return 0


def _signing_init(args: argparse.Namespace) -> int:
    try:
        key = signing.ensure_signing_key(args.dir)
    except (ApplianceError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    kid = signing.key_id(key.public_key())
    print(f"signing key {signing.keys_dir(args.dir) / 'signing.key'}, trusted as {kid}")
    return 0
