"""Addresses: what stays on this machine."""

from __future__ import annotations

import ipaddress


def is_loopback(bind_address: str) -> bool:
    """Whether ``host``, ``host:port``, ``[v6]:port`` or a unix socket address stays on this machine
    (literals only: no name is resolved)."""
    if bind_address.startswith(("unix:", "unix-abstract:")):
        return True
    host = bind_address.rsplit(":", 1)[0] if bind_address.count(":") == 1 else bind_address
    if host.startswith("["):
        host = host[1 : host.index("]")]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
