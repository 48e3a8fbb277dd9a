"""The private PKI: what the certificates say, who signed them, and how keys are stored."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.errors import InvalidArgument, NotFound
from appliance.security import pki


def load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_server_certificate_carries_dns_and_ip_sans_and_chains_to_the_ca(tmp_path):
    ca = pki.init_ca(tmp_path)
    cert_path, key_path = pki.issue_server(tmp_path, ["appliance.lan", "10.0.0.7", "::1"])
    cert, ca_cert = load(cert_path), load(ca.cert)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["appliance.lan"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    cert.verify_directly_issued_by(ca_cert)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert mode(key_path) == 0o600 and mode(ca.key) == 0o600


def test_client_certificate_names_the_client(tmp_path):
    pki.init_ca(tmp_path)
    cert_path, key_path = pki.issue_client(tmp_path, "billing-svc")
    cert = load(cert_path)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "billing-svc"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert.verify_directly_issued_by(load(pki.ca_paths(tmp_path).cert))
    assert mode(key_path) == 0o600


def test_init_ca_keeps_an_existing_ca(tmp_path):
    first = pki.init_ca(tmp_path).cert.read_bytes()
    assert pki.init_ca(tmp_path).cert.read_bytes() == first


def test_bad_input_is_refused_with_a_reason(tmp_path):
    with pytest.raises(NotFound, match="pki init"):
        pki.issue_client(tmp_path, "alice")
    pki.init_ca(tmp_path)
    with pytest.raises(InvalidArgument, match="client name"):
        pki.issue_client(tmp_path, "../escape")
    with pytest.raises(InvalidArgument, match="at least one host"):
        pki.issue_server(tmp_path, [])
    with pytest.raises(InvalidArgument, match="not a DNS name"):
        pki.issue_server(tmp_path, ["bad host!"])
    with pytest.raises(NotFound, match="issue-client"):
        pki.channel_credentials(tmp_path, "nobody")


def test_ensure_local_pki_is_idempotent_and_uses_appliance_home(home):
    local = pki.ensure_local_pki()
    assert local.dir == home / "pki"
    contents = {p: p.read_bytes() for p in (local.ca_cert, local.server_cert, local.admin_cert)}
    again = pki.ensure_local_pki()
    assert again == local
    assert {p: p.read_bytes() for p in contents} == contents
    sans = load(local.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}


def test_ensure_local_pki_fills_in_what_is_missing(home):
    local = pki.ensure_local_pki()
    ca = local.ca_cert.read_bytes()
    local.admin_cert.unlink()
    pki.ensure_local_pki()
    assert local.admin_cert.exists()
    assert local.ca_cert.read_bytes() == ca
    load(local.admin_cert).verify_directly_issued_by(load(local.ca_cert))
