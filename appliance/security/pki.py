"""A small private PKI for the gRPC server: one CA, server certificates, client certificates.

Layout of a PKI folder (default ``$APPLIANCE_HOME/pki``)::

    ca.crt  ca.key               the certificate authority
    server.crt  server.key       the server's certificate (SANs: the given DNS names / IPs)
    clients/<name>.crt|.key      client certificates (CN=<name>, clientAuth)
    ca.crl                       revoked client certificates, signed by the CA (once one is revoked)

Keys are ECDSA P-256: BoringSSL (inside grpcio) accepts them for both server and client auth,
which it does not reliably do for ed25519 certificates. Private keys are written 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.config import state_dir
from appliance.errors import InvalidArgument, NotFound
from appliance.files import write_atomic

CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=825)  # the longest leaf lifetime common TLS clients accept
LOCAL_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
ADMIN_CLIENT = "admin"

_CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


@dataclass(frozen=True)
class CaPaths:
    cert: Path
    key: Path


@dataclass(frozen=True)
class LocalPki:
    """The files ``appliance serve`` needs for TLS/mTLS on first start."""

    dir: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    admin_cert: Path
    admin_key: Path


def pki_dir(path: str | os.PathLike[str] | None = None) -> Path:
    if path is None:
        return state_dir("pki")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def ca_paths(folder: str | os.PathLike[str] | None = None) -> CaPaths:
    base = pki_dir(folder)
    return CaPaths(cert=base / "ca.crt", key=base / "ca.key")


def server_paths(folder: str | os.PathLike[str] | None = None) -> tuple[Path, Path]:
    base = pki_dir(folder)
    return base / "server.crt", base / "server.key"


def client_paths(folder: str | os.PathLike[str] | None, name: str) -> tuple[Path, Path]:
    _check_client_name(name)
    base = pki_dir(folder) / "clients"
    return base / f"{name}.crt", base / f"{name}.key"


def init_ca(folder: str | os.PathLike[str] | None = None, common_name: str = "appliance local CA") -> CaPaths:
    """Create the CA if it does not exist yet; an existing CA is kept (its certificates stay valid)."""
    paths = ca_paths(folder)
    if paths.cert.exists() and paths.key.exists():
        return paths
    if paths.cert.exists() or paths.key.exists():
        raise InvalidArgument(
            f"half a CA in {paths.cert.parent}: ca.crt and ca.key must both exist or neither"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(paths.key, key)
    _write_public(paths.cert, cert.public_bytes(serialization.Encoding.PEM))
    return paths


def crl_path(folder: str | os.PathLike[str] | None = None) -> Path:
    return pki_dir(folder) / "ca.crl"


def issue_server(
    folder: str | os.PathLike[str] | None, hosts: list[str], validity: dt.timedelta | None = None
) -> tuple[Path, Path]:
    """Issue (or re-issue) the server certificate for ``hosts``: DNS names and IP addresses.
    ``validity`` defaults to :data:`LEAF_VALIDITY`; a running server picks the new files up."""
    if not hosts:
        raise InvalidArgument("a server certificate needs at least one host name or IP address")
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]{0,252})", host):
                raise InvalidArgument(f"not a DNS name or IP address: {host!r}") from None
            sans.append(x509.DNSName(host))
    cert_path, key_path = server_paths(folder)
    _issue_leaf(
        folder,
        common_name=hosts[0],
        sans=sans,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        cert_path=cert_path,
        key_path=key_path,
        validity=validity,
    )
    return cert_path, key_path


def renew_server(folder: str | os.PathLike[str] | None, validity: dt.timedelta | None = None) -> list[str]:
    """Re-issue the server certificate for the hosts of the current one; returns those hosts."""
    cert_path, _ = server_paths(folder)
    if not cert_path.exists():
        raise NotFound(f"no server certificate at {cert_path}: run `appliance pki init` first")
    try:
        sans = load_certificate(cert_path).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        raise InvalidArgument(f"{cert_path} names no hosts: use `appliance pki issue-server HOST`") from None
    hosts = [str(ip) for ip in sans.value.get_values_for_type(x509.IPAddress)]
    hosts = sans.value.get_values_for_type(x509.DNSName) + hosts
    issue_server(folder, hosts, validity)
    return hosts


def issue_client(
    folder: str | os.PathLike[str] | None, name: str, validity: dt.timedelta | None = None
) -> tuple[Path, Path]:
    """Issue a client certificate with subject CN=``name`` and the clientAuth extended key usage."""
    cert_path, key_path = client_paths(folder, name)
    _issue_leaf(
        folder,
        common_name=name,
        sans=[],
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        cert_path=cert_path,
        key_path=key_path,
        validity=validity,
    )
    return cert_path, key_path


def revoke_client(folder: str | os.PathLike[str] | None, name: str) -> int:
    """Add client ``name``'s current certificate to the CA's CRL; returns its serial number.
    A running server refuses the certificate on its next call (it re-reads the CRL when it changes)."""
    cert_path, _ = client_paths(folder, name)
    if not cert_path.exists():
        raise NotFound(f"no client certificate {name!r} in {cert_path.parent}")
    serial = x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number
    ca_cert, ca_key = _load_ca(folder)
    path = crl_path(folder)
    revoked = list(load_crl(path, ca_cert)) if path.exists() else []
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(ca_cert.not_valid_after_utc)
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    if all(entry.serial_number != serial for entry in revoked):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    _write_public(path, crl.public_bytes(serialization.Encoding.PEM))
    return serial


def load_crl(path: Path, ca_cert: x509.Certificate) -> x509.CertificateRevocationList:
    """The CRL at ``path``, after checking that ``ca_cert`` signed it."""
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except ValueError as exc:
        raise InvalidArgument(f"{path} is not a PEM certificate revocation list: {exc}") from exc
    public_key = ca_cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(public_key):
        raise InvalidArgument(f"{path} is not signed by the CA {ca_cert.subject.rfc4514_string()}")
    return crl


def load_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def ensure_local_pki(folder: str | os.PathLike[str] | None = None) -> LocalPki:
    """The CA, a loopback server certificate and an admin client certificate; each made only if absent."""
    base = pki_dir(folder)
    ca = init_ca(base)
    server_cert, server_key = server_paths(base)
    if not (server_cert.exists() and server_key.exists()):
        issue_server(base, list(LOCAL_HOSTS))
    admin_cert, admin_key = client_paths(base, ADMIN_CLIENT)
    if not (admin_cert.exists() and admin_key.exists()):
        issue_client(base, ADMIN_CLIENT)
    return LocalPki(
        dir=base,
        ca_cert=ca.cert,
        server_cert=server_cert,
        server_key=server_key,
        admin_cert=admin_cert,
        admin_key=admin_key,
    )


def channel_credentials(
    folder: str | os.PathLike[str] | None, client_name: str | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials for a client that trusts this PKI's CA, presenting ``client_name``'s certificate."""
    ca = ca_paths(folder)
    if not ca.cert.exists():
        raise NotFound(f"missing {ca.cert}: run `appliance pki init` first")
    if client_name is None:
        return grpc.ssl_channel_credentials(root_certificates=ca.cert.read_bytes())
    cert_path, key_path = client_paths(folder, client_name)
    if not (cert_path.exists() and key_path.exists()):
        raise NotFound(
            f"no client certificate {client_name!r}: run `appliance pki issue-client {client_name}`"
        )
    return grpc.ssl_channel_credentials(
        root_certificates=ca.cert.read_bytes(),
        private_key=key_path.read_bytes(),
        certificate_chain=cert_path.read_bytes(),
    )


# ---------------------------------------------------------------------------------------------- internals


def _issue_leaf(
    folder: str | os.PathLike[str] | None,
    *,
    common_name: str,
    sans: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    cert_path: Path,
    key_path: Path,
    validity: dt.timedelta | None = None,
) -> None:
    validity = LEAF_VALIDITY if validity is None else validity
    if validity <= dt.timedelta(0):
        raise InvalidArgument(f"a certificate's validity must be positive, got {validity}")
    ca_cert, ca_key = _load_ca(folder)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # backdated for clock skew, except for the short-lived certificates that tests ask for
        .not_valid_before(now - min(dt.timedelta(minutes=5), validity))
        .not_valid_after(min(now + validity, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=False,
                crl_sign=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    _write_key(key_path, key)
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def _load_ca(folder: str | os.PathLike[str] | None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    paths = ca_paths(folder)
    if not (paths.cert.exists() and paths.key.exists()):
        raise NotFound(f"no CA in {paths.cert.parent}: run `appliance pki init` first")
    cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidArgument(f"{paths.key} is not an ECDSA key")
    return cert, key


def _check_client_name(name: str) -> None:
    if not _CLIENT_NAME.fullmatch(name):
        raise InvalidArgument(
            f"client name {name!r} must be 1-64 characters of letters, digits, '.', '_', '@', '-'"
        )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_atomic(path, data, mode=0o600)


def _write_public(path: Path, data: bytes) -> None:
    write_atomic(path, data, mode=0o644)
