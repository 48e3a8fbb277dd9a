"""Revoked client certificates, as the running server sees them.

``appliance pki revoke-client NAME`` adds the certificate's serial to the CA-signed CRL
(``ca.crl``, see :mod:`appliance.security.pki`). The interceptor asks :meth:`RevocationList.is_revoked`
about the peer's certificate on every call; the CRL is re-read whenever the file changes, so a
revocation holds from the next call on, without a restart, also on connections already open.

A CRL that is present but unreadable, or not signed by the CA, fails closed: every call that
presents a client certificate is refused until the file is fixed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cryptography import x509

from appliance.errors import ApplianceError
from appliance.security import pki

log = logging.getLogger(__name__)

_MAX_REMEMBERED = 4096  # peer certificates whose serial is cached; more only costs a re-parse


class RevocationUnavailable(Exception):
    """The CRL exists but cannot be trusted; the message says why."""


class RevocationList:
    def __init__(self, folder: str | os.PathLike[str] | None) -> None:
        self.path = pki.crl_path(folder)
        self.ca_path = pki.ca_paths(folder).cert
        self._stamp: tuple[int, int, int] | None = None
        self._revoked: frozenset[int] = frozenset()
        self._error: str | None = None
        self._serials: dict[bytes, int] = {}

    def is_revoked(self, pem_cert: bytes) -> bool:
        """Whether the client certificate (PEM, as grpc's auth context holds it) is revoked.
        Raises :class:`RevocationUnavailable` when the CRL cannot be trusted."""
        self._refresh()
        if self._error is not None:
            raise RevocationUnavailable(self._error)
        return bool(self._revoked) and self._serial(pem_cert) in self._revoked

    def _serial(self, pem_cert: bytes) -> int:
        serial = self._serials.get(pem_cert)
        if serial is None:
            serial = x509.load_pem_x509_certificate(pem_cert).serial_number
            if len(self._serials) >= _MAX_REMEMBERED:
                self._serials.clear()
            self._serials[pem_cert] = serial
        return serial

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._revoked, self._error = None, frozenset(), None
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            crl = pki.load_crl(Path(self.path), pki.load_certificate(self.ca_path))
        except (OSError, ValueError, ApplianceError) as exc:
            message = exc.message if isinstance(exc, ApplianceError) else str(exc)
            self._revoked, self._error = frozenset(), f"the revocation list cannot be used: {message}"
            log.error("%s; refusing client certificates until it is fixed", self._error)
            return
        self._revoked, self._error = frozenset(entry.serial_number for entry in crl), None
        log.info("revocation list %s: %d revoked client certificate(s)", self.path, len(self._revoked))
