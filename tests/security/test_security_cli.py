"""``appliance pki|tokens|audit`` through the security command module's own parsers."""

from __future__ import annotations

import argparse

from appliance.security import commands
from appliance.security.audit import AuditLog, audit_files, stream_dir
from appliance.security.tokens import TokenStore


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="appliance")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_pki_commands(home, capsys):
    assert cli(["pki", "init"]) == 0
    assert (home / "pki" / "ca.crt").exists() and (home / "pki" / "clients" / "admin.crt").exists()
    assert cli(["pki", "issue-server", "appliance.lan", "10.1.2.3"]) == 0
    assert cli(["pki", "issue-client", "billing"]) == 0
    assert (home / "pki" / "clients" / "billing.key").exists()
    assert cli(["pki", "issue-client", "no/slashes"]) == 1
    assert "client name" in capsys.readouterr().err


def test_tokens_create_prints_the_secret_last_and_it_verifies(home, capsys):
    assert cli(["tokens", "create", "bank", "--scope", "classify:banking77", "--scope", "models:read"]) == 0
    secret = capsys.readouterr().out.strip().splitlines()[-1]
    principal = TokenStore().verify(secret)
    assert principal is not None and principal.scopes == {"classify:banking77", "models:read"}

    assert cli(["tokens", "list"]) == 0
    listing = capsys.readouterr().out
    assert "bank" in listing and "classify:banking77" in listing and secret not in listing

    assert cli(["tokens", "revoke", "bank"]) == 0
    assert TokenStore().verify(secret) is None
    assert cli(["tokens", "revoke", "bank"]) == 1
    assert "no active token named 'bank'" in capsys.readouterr().err
    assert cli(["tokens", "create", "x", "--scope", "everything"]) == 1
    assert "unknown scope" in capsys.readouterr().err


def test_audit_verify_exit_codes(home, capsys):
    with AuditLog() as log:
        for i in range(3):
            log.append({"rpc": "/a/B", "i": i})
    assert cli(["audit", "verify"]) == 0
    assert "3 records" in capsys.readouterr().out
    path = audit_files(stream_dir(home / "audit"))[0][1]
    path.write_text(path.read_text().replace('"i":1', '"i":7'))
    assert cli(["audit", "verify", "--dir", str(home / "audit")]) == 1
    err = capsys.readouterr().err
    assert "BROKEN" in err and "line 3" in err  # line 1 is the file's header
    assert cli(["audit", "verify", "--dir", str(home / "nowhere")]) == 1
