"""``appliance pki|tokens|audit``: manage certificates and tokens, check the audit trail."""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import sys
from collections.abc import Callable
from pathlib import Path

from appliance.config import state_dir
from appliance.errors import ApplianceError
from appliance.security import audit, audit_chain, audit_verify, pki
from appliance.security.tokens import TokenStore, parse_duration


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _register_pki(subparsers)
    _register_tokens(subparsers)
    _register_audit(subparsers)


def _register_pki(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("pki", help="the CA and TLS certificates of the gRPC server")
    commands = parser.add_subparsers(dest="pki_command", metavar="ACTION", required=True)
    dir_help = "PKI folder (default: $APPLIANCE_HOME/pki)"

    init = commands.add_parser(
        "init", help="create the CA, a loopback server certificate and an admin client"
    )
    init.add_argument("--dir", default=None, help=dir_help)
    init.set_defaults(func=_pki_init)

    days_help = f"validity in days (default {pki.LEAF_VALIDITY.days})"
    server = commands.add_parser("issue-server", help="(re)issue the server certificate for these hosts")
    server.add_argument("hosts", nargs="+", metavar="HOST", help="DNS name or IP address")
    server.set_defaults(func=_pki_issue_server)

    renew = commands.add_parser(
        "renew-server", help="re-issue the server certificate for its hosts; a running server picks it up"
    )
    renew.set_defaults(func=_pki_renew_server)

    client = commands.add_parser("issue-client", help="issue a client certificate (CN=NAME)")
    client.add_argument("name", metavar="NAME")
    client.set_defaults(func=_pki_issue_client)

    revoke = commands.add_parser(
        "revoke-client", help="revoke NAME's client certificate; the running server refuses it at once"
    )
    revoke.add_argument("name", metavar="NAME")
    revoke.set_defaults(func=_pki_revoke_client)

    for leaf in (server, renew, client):
        leaf.add_argument("--days", type=float, default=None, help=days_help)
    for action in (server, renew, client, revoke):
        action.add_argument("--dir", default=None, help=dir_help)


def _register_tokens(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("tokens", help="scoped bearer tokens for the gRPC API")
    commands = parser.add_subparsers(dest="tokens_command", metavar="ACTION", required=True)
    file_help = "token file (default: $APPLIANCE_HOME/tokens/tokens.json)"
    expiry_help = "lifetime of the secret: a whole number and s, m, h, d or w, e.g. 30d"

    create = commands.add_parser(
        "create", help="create a token; its secret is printed once, on the last line"
    )
    create.add_argument("name", metavar="NAME")
    create.add_argument(
        "--scope",
        action="append",
        required=True,
        dest="scopes",
        metavar="SCOPE",
        help="classify:<model>|classify:*, extract:<model>|extract:*, embed:<model>|embed:*, generate, "
        "models:read, admin (repeatable)",
    )
    create.add_argument(
        "--expires-in", default=None, metavar="DURATION", help=f"{expiry_help} (default: never)"
    )
    create.add_argument("--file", default=None, help=file_help)
    create.set_defaults(func=_tokens_create)

    rotate = commands.add_parser(
        "rotate",
        help="a new secret for NAME (printed on the last line); the old one works until the overlap ends",
    )
    rotate.add_argument("name", metavar="NAME")
    rotate.add_argument(
        "--overlap", required=True, metavar="DURATION", help="how long the old secret keeps working, e.g. 1h"
    )
    rotate.add_argument(
        "--expires-in",
        default=None,
        metavar="DURATION",
        help=f"{expiry_help} (default: the old token's lifetime)",
    )
    rotate.add_argument("--file", default=None, help=file_help)
    rotate.set_defaults(func=_tokens_rotate)

    listing = commands.add_parser("list", help="list tokens (never their secrets)")
    listing.add_argument("--all", action="store_true", help="include revoked and expired tokens")
    listing.add_argument("--file", default=None, help=file_help)
    listing.set_defaults(func=_tokens_list)

    revoke = commands.add_parser("revoke", help="revoke a token; the running server refuses it at once")
    revoke.add_argument("name", metavar="NAME")
    revoke.add_argument("--file", default=None, help=file_help)
    revoke.set_defaults(func=_tokens_revoke)


def _register_audit(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("audit", help="the keyed, hash-chained audit trail")
    commands = parser.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    check = commands.add_parser(
        "verify", help="check every record's mac and chain link, and the links between chains"
    )
    check.add_argument("--dir", default=None, help="audit folder (default: $APPLIANCE_HOME/audit)")
    check.add_argument(
        "--keys", default=None, help="folder of audit-seal.key (default: $APPLIANCE_HOME/keys)"
    )
    check.set_defaults(func=_audit_verify)
    init = commands.add_parser(
        "init-key",
        help="create the key pair chains are sealed to (as root: the service must not read its private half)",
    )
    init.add_argument("--keys", default=None, help="folder for the key pair (default: $APPLIANCE_HOME/keys)")
    init.add_argument("--force", action="store_true", help="replace an existing key pair")
    init.set_defaults(func=_audit_init_key)


Command = Callable[[argparse.Namespace], int]


def _guard(func: Command) -> Command:
    """Turn an ApplianceError into its message on stderr and exit code 1."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            code = func(args)
        except ApplianceError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 1
        return code

    return wrapper


@_guard
def _pki_init(args: argparse.Namespace) -> int:
    local = pki.ensure_local_pki(args.dir)
    print(f"CA:     {local.ca_cert}")
    print(f"server: {local.server_cert} ({', '.join(pki.LOCAL_HOSTS)})")
    print(f"admin:  {local.admin_cert}")
    return 0


def _validity(args: argparse.Namespace) -> dt.timedelta | None:
    return None if args.days is None else dt.timedelta(days=args.days)


@_guard
def _pki_issue_server(args: argparse.Namespace) -> int:
    pki.init_ca(args.dir)
    cert, key = pki.issue_server(args.dir, args.hosts, _validity(args))
    print(f"server certificate {cert} (key {key}) for {', '.join(args.hosts)}")
    return 0


@_guard
def _pki_renew_server(args: argparse.Namespace) -> int:
    hosts = pki.renew_server(args.dir, _validity(args))
    cert, _ = pki.server_paths(args.dir)
    expires = pki.load_certificate(cert).not_valid_after_utc
    print(f"server certificate {cert} renewed for {', '.join(hosts)}, valid until {expires}")
    return 0


@_guard
def _pki_issue_client(args: argparse.Namespace) -> int:
    cert, key = pki.issue_client(args.dir, args.name, _validity(args))
    print(f"client certificate {cert} (key {key}) for CN={args.name}")
    return 0


@_guard
def _pki_revoke_client(args: argparse.Namespace) -> int:
    serial = pki.revoke_client(args.dir, args.name)
    print(f"revoked client certificate CN={args.name} (serial {serial:x}) in {pki.crl_path(args.dir)}")
    return 0


@_guard
def _tokens_create(args: argparse.Namespace) -> int:
    expires_in = parse_duration(args.expires_in) if args.expires_in is not None else None
    secret = TokenStore(args.file).create(args.name, args.scopes, expires_in=expires_in)
    until = f", expires in {args.expires_in}" if args.expires_in is not None else ""
    scopes = ", ".join(sorted(set(args.scopes)))
    print(f"token {args.name!r} with scopes {scopes}{until}; the secret is shown once:")
    print(secret)
    return 0


@_guard
def _tokens_rotate(args: argparse.Namespace) -> int:
    overlap = parse_duration(args.overlap)
    expires_in = parse_duration(args.expires_in) if args.expires_in is not None else None
    secret, old = TokenStore(args.file).rotate(args.name, overlap, expires_in=expires_in)
    print(f"rotated token {args.name!r}: the old secret ({old.token_id}) works until {old.expires_at};")
    print("the new secret is shown once:")
    print(secret)
    return 0


@_guard
def _tokens_list(args: argparse.Namespace) -> int:
    tokens = TokenStore(args.file).list(include_revoked=args.all)
    if not tokens:
        print("no tokens")
        return 0
    print(f"{'NAME':24} {'ID':12} {'CREATED':25} {'EXPIRES':25} {'STATE':8} SCOPES")
    for t in tokens:
        expires = t.expires_at or "never"
        print(f"{t.name:24} {t.token_id:12} {t.created_at:25} {expires:25} {t.state:8} {' '.join(t.scopes)}")
    return 0


@_guard
def _tokens_revoke(args: argparse.Namespace) -> int:
    info = TokenStore(args.file).revoke(args.name)
    print(f"revoked token {info.name!r} ({info.token_id})")
    return 0


@_guard
def _audit_init_key(args: argparse.Namespace) -> int:
    paths = audit_chain.key_paths(Path(args.keys) if args.keys else None)
    if paths.public.exists() and not args.force:
        print(f"audit key already exists: {paths.public} (--force replaces it)")
        return 0
    audit_chain.create_keys(paths)
    print(
        f"audit key: {paths.private} (0400, owner uid {paths.private.stat().st_uid}), public {paths.public}"
    )
    return 0


@_guard
def _audit_verify(args: argparse.Namespace) -> int:
    if args.dir is not None and not Path(args.dir).is_dir():
        print(f"error: no audit folder at {args.dir}", file=sys.stderr)
        return 1
    root = Path(args.dir) if args.dir is not None else state_dir("audit")
    if not audit.streams(root):
        if (root / audit_chain.LATEST).exists():
            print(
                f"audit trail BROKEN: {audit_chain.LATEST} names a chain, but no records are left in {root}",
                file=sys.stderr,
            )
            return 1
        print(f"audit trail OK: no records yet in {root}")
        return 0
    key = audit_chain.verifier_private_key(audit_chain.key_paths(Path(args.keys))) if args.keys else None
    trail = audit_verify.verify_trail(root, key)
    broken = 0
    for chain in trail.chains:
        result = chain.result
        if result.ok:
            note = f" ({audit_verify.OLD_FORMAT})" if result.old_format else ""
            print(f"{chain.name}: OK, {result.n_records} records, chain intact{note}")
        else:
            broken += 1
            print(
                f"{chain.name}: BROKEN after {result.n_records} good records: {result.first_error}",
                file=sys.stderr,
            )
    for error in trail.errors:
        print(f"BROKEN: {error}", file=sys.stderr)
    if not trail.ok:
        print(
            f"audit trail BROKEN: {broken} of {len(trail.chains)} chains fail to verify, "
            f"{len(trail.errors)} problems between chains",
            file=sys.stderr,
        )
        return 1
    print(f"audit trail OK: {len(trail.chains)} chain(s) verified")
    return 0
