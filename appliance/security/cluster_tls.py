"""TLS material for Ray's internal gRPC (``RAY_USE_TLS``): one cluster CA, one certificate per node.

Every Ray process on a node presents that node's certificate both as a server and as a client, and
accepts only peers whose certificates the cluster CA signed. The installer runs this file with the
Ansible controller's Python (the standard library and ``cryptography``, which ansible-core
requires; ``ansible/roles/appliance_common/files/cluster_tls.py`` links here) and keeps the CA in a
folder on the controller, so the CA key never reaches a box. This CA is not the appliance's own
gRPC CA (``appliance pki``): it vouches for cluster nodes, not for the API's server and callers.

    python cluster_tls.py init-ca DIR
    python cluster_tls.py issue DIR NAME ADDRESS...   # DIR/nodes/NAME.crt and NAME.key
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
NODE_DAYS = 825
# Reissue a node certificate when less than this much of its life is left.
RENEW_BEFORE = dt.timedelta(days=30)


def init_ca(folder: Path) -> bool:
    """Create the cluster CA in ``folder`` unless it exists; True when it was created."""
    if (folder / "ca.crt").exists() and (folder / "ca.key").exists():
        return False
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "appliance Ray cluster CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    _write(folder / "ca.key", _private_pem(key), 0o600)
    _write(folder / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return True


def issue_node(folder: Path, name: str, addresses: list[str]) -> bool:
    """Issue ``nodes/<name>.crt`` for ``addresses`` (IPs and DNS names) unless a current one covers
    exactly them; True when it was (re)issued."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"{name!r} is not a node name")
    cert_path, key_path = folder / "nodes" / f"{name}.crt", folder / "nodes" / f"{name}.key"
    wanted = _general_names(addresses)
    if cert_path.exists() and key_path.exists() and _current(cert_path, wanted):
        return False
    ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{folder / 'ca.key'} is not the cluster CA's key")
    ca_cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=NODE_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(wanted), critical=False)
        # A Ray process is a server to some peers and a client of others, with this one certificate.
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(key_path, _private_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return True


def _general_names(addresses: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for address in dict.fromkeys(addresses):  # unique, in order
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            names.append(x509.DNSName(address))
    return names


def _current(cert_path: Path, wanted: list[x509.GeneralName]) -> bool:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    fresh = cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > RENEW_BEFORE
    return fresh and set(sans) == set(wanted)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write through a temp file with ``mode`` from the start, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cluster_tls.py", description="TLS material for Ray's gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)
    ca = sub.add_parser("init-ca", help="create the cluster CA in DIR unless it exists")
    ca.add_argument("dir", type=Path)
    node = sub.add_parser("issue", help="issue DIR/nodes/NAME.crt for these addresses unless current")
    node.add_argument("dir", type=Path)
    node.add_argument("name")
    node.add_argument("addresses", nargs="+")
    args = parser.parse_args(argv)
    try:
        if args.command == "init-ca":
            changed = init_ca(args.dir)
        else:
            changed = issue_node(args.dir, args.name, args.addresses)
    except (OSError, ValueError) as exc:
        print(f"cluster_tls: {exc}", file=sys.stderr)
        return 1
    print("changed" if changed else "unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
