"""The server side of TLS: certificates re-read from disk when they change, and watched for expiry.

grpc calls :meth:`ServerCertificates.fetch` before every new TLS handshake; it re-reads the CA,
the server certificate and its key only when one of the files changed, so ``appliance pki
issue-server`` renews a running server's certificate without a restart (connections already open
keep the old one until they reconnect).

:class:`ExpiryWatch` publishes the seconds left on the server certificate and the CA as a gauge,
logs a warning once either is within ``warn_days`` of its end, and names the reason once the
server certificate has expired, so that health can say NOT_SERVING and why.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry, Gauge

from appliance.errors import InvalidArgument, NotFound
from appliance.security import pki

log = logging.getLogger(__name__)

DEFAULT_WARN_DAYS = 30
CHECK_SECONDS = 2.0  # how often the expiry watch re-reads the certificates

_Stamp = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class _Files:
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def of(cls, folder: str | os.PathLike[str] | None) -> _Files:
        cert, key = pki.server_paths(folder)
        return cls(ca=pki.ca_paths(folder).cert, cert=cert, key=key)

    def stamp(self) -> _Stamp:
        """What changes when any of the files is replaced (write_atomic renames a new inode in)."""
        stats = (os.stat(p) for p in (self.ca, self.cert, self.key))
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in stats)


class ServerCertificates:
    """The server's key pair and its client CA, as grpc's dynamic certificate configuration."""

    def __init__(self, folder: str | os.PathLike[str] | None) -> None:
        self.files = _Files.of(folder)
        for path in (self.files.ca, self.files.cert, self.files.key):
            if not path.exists():
                raise NotFound(f"missing {path}: run `appliance pki init` first")
        self._stamp = self.files.stamp()
        self.initial = self._load()
        self.reloads = 0

    def credentials(self, require_client_cert: bool) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial, self.fetch, require_client_authentication=require_client_cert
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's callback before each handshake: a new configuration if the files changed, else
        None (keep the current one). It must not raise; a bad new pair keeps the old one."""
        try:
            stamp = self.files.stamp()
            if stamp == self._stamp:
                return None
            config = self._load()
        except (OSError, ValueError, InvalidArgument) as exc:
            # often a renewal caught between writing the key and the certificate: retry next time
            log.warning("keeping the current TLS certificate: %s", exc)
            return None
        self._stamp = stamp
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.files.cert)
        return config

    def _load(self) -> grpc.ServerCertificateConfiguration:
        ca, chain, key = (p.read_bytes() for p in (self.files.ca, self.files.cert, self.files.key))
        _check_pair(chain, key, self.files.cert)
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca)


def server_credentials(
    folder: str | os.PathLike[str] | None, require_client_cert: bool
) -> grpc.ServerCredentials:
    """TLS credentials for the server, renewed from disk. Client certificates signed by the CA are
    always accepted (and surface as the caller's identity); with ``require_client_cert`` they are
    mandatory."""
    return ServerCertificates(folder).credentials(require_client_cert)


def _check_pair(chain: bytes, key: bytes, where: Path) -> None:
    cert = x509.load_pem_x509_certificate(chain)
    private = serialization.load_pem_private_key(key, password=None)
    public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*public) != private.public_key().public_bytes(*public):
        raise InvalidArgument(f"{where} does not match its key")


class ExpiryWatch:
    """Seconds to expiry of the server certificate and the CA: a gauge, a warning, a reason."""

    def __init__(
        self,
        folder: str | os.PathLike[str] | None,
        warn_days: float = DEFAULT_WARN_DAYS,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.files = _Files.of(folder)
        self.warn = dt.timedelta(days=warn_days)
        self.gauge = Gauge(
            "appliance_certificate_expiry_seconds",
            "seconds until the certificate expires (negative: expired)",
            ["certificate"],
            registry=registry or CollectorRegistry(),
        )
        self.problem: str | None = None
        self._checked = -float("inf")
        self._said: set[tuple[str, int, str]] = set()  # (certificate, serial, level) already logged

    def check(self, now: dt.datetime | None = None) -> str | None:
        """Re-read the certificates (at most every :data:`CHECK_SECONDS`); the reason the server
        cannot serve TLS, or None."""
        if now is None and time.monotonic() - self._checked < CHECK_SECONDS:
            return self.problem
        self._checked = time.monotonic()
        now = now or dt.datetime.now(dt.UTC)
        problem = None
        for name, path in (("server", self.files.cert), ("ca", self.files.ca)):
            try:
                cert = pki.load_certificate(path)
            except (OSError, ValueError) as exc:
                problem = problem or f"cannot read the {name} certificate {path}: {exc}"
                continue
            left = cert.not_valid_after_utc - now
            self.gauge.labels(name).set(left.total_seconds())
            if left <= dt.timedelta(0):
                problem = problem or f"the {name} certificate {path} expired at {cert.not_valid_after_utc}"
                self._say(name, cert, "expired", logging.ERROR, problem)
            elif left <= self.warn:
                hint = "`appliance pki renew-server`" if name == "server" else "a new CA and certificates"
                message = (
                    f"the {name} certificate {path} expires in {left.days} days "
                    f"({cert.not_valid_after_utc}); renew it: {hint}"
                )
                self._say(name, cert, "expiring", logging.WARNING, message)
        if problem is None and self.problem is not None:
            log.info("TLS certificates valid again: %s", self.files.cert)
        self.problem = problem
        return problem

    def _say(self, name: str, cert: x509.Certificate, level: str, severity: int, message: str) -> None:
        key = (name, cert.serial_number, level)
        if key not in self._said:
            self._said.add(key)
            log.log(severity, message)
