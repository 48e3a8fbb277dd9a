"""The Ray cluster's TLS material: one CA, a node certificate per box, reissued only when needed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from appliance.security import cluster_tls

SCRIPT = Path(cluster_tls.__file__)


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-I", str(SCRIPT), *argv], capture_output=True, text=True, check=False
    )


def _sans(cert_path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} | set(
        names.get_values_for_type(x509.DNSName)
    )


def test_ca_once_and_node_certificates_signed_by_it(tmp_path: Path) -> None:
    assert _run("init-ca", str(tmp_path)).stdout.strip() == "changed"
    ca_before = (tmp_path / "ca.crt").read_bytes()
    assert _run("init-ca", str(tmp_path)).stdout.strip() == "unchanged"
    assert (tmp_path / "ca.crt").read_bytes() == ca_before
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600

    issued = _run("issue", str(tmp_path), "box1", "10.20.0.11", "box1.example", "127.0.0.1")
    assert issued.returncode == 0 and issued.stdout.strip() == "changed", issued.stderr
    node = tmp_path / "nodes" / "box1.crt"
    cert = x509.load_pem_x509_certificate(node.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_before))
    assert _sans(node) == {"10.20.0.11", "box1.example", "127.0.0.1"}
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
    assert (tmp_path / "nodes" / "box1.key").stat().st_mode & 0o777 == 0o600


def test_node_certificate_is_reissued_only_when_its_names_change(tmp_path: Path) -> None:
    cluster_tls.init_ca(tmp_path)
    assert cluster_tls.issue_node(tmp_path, "box1", ["10.20.0.11"])
    first = (tmp_path / "nodes" / "box1.crt").read_bytes()
    assert not cluster_tls.issue_node(tmp_path, "box1", ["10.20.0.11"])
    assert (tmp_path / "nodes" / "box1.crt").read_bytes() == first
    assert cluster_tls.issue_node(tmp_path, "box1", ["10.20.0.12"])
    assert _sans(tmp_path / "nodes" / "box1.crt") == {"10.20.0.12"}
    assert _run("issue", str(tmp_path), "../escape", "10.0.0.1").returncode == 1


def test_the_script_needs_nothing_but_the_standard_library_and_cryptography() -> None:
    """The installer runs it with the Ansible controller's Python, where the appliance is absent."""
    tree = ast.parse(SCRIPT.read_text())
    roots = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert roots - {"__future__", "cryptography"} <= set(sys.stdlib_module_names), roots
    role_copy = Path(__file__).parents[2] / "ansible/roles/appliance_common/files/cluster_tls.py"
    assert role_copy.resolve() == SCRIPT.resolve()
