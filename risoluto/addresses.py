"""Address facts the kernel and several plugins share (kept here so no plugin imports the CLI)."""

from __future__ import annotations

import ipaddress


def is_loopback_bind(host: str) -> bool:
    """True when a listen address only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
