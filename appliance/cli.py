"""The ``appliance`` command line.

Each concern owns its sub-commands: a module listed in ``COMMAND_MODULES`` exposes
``register(subparsers)``, which adds its parsers and sets ``func`` on each. ``func`` takes the
parsed namespace and returns the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from appliance.config import apply_offline_env

COMMAND_MODULES: tuple[str, ...] = (
    "appliance.factory.commands",
    "appliance.store_commands",
    "appliance.serve.commands",
    "appliance.demo",
    "appliance.client_commands",
    "appliance.security.commands",
    "appliance.security.key_commands",
    "appliance.router.commands",
    "appliance.bundle",
    "appliance.engines.model_pin",
    "appliance.datasets.commands",
    "appliance.feedback.commands",
    "appliance.loop.commands",
    "appliance.workflows.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appliance",
        description="On-prem inference appliance: train specialists, serve them, route decisions.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not name.startswith(exc.name):
                raise  # a real missing dependency, not an absent command module
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    apply_offline_env()
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
