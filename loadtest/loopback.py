"""The one rule of where load may go: loopback addresses, unless the user passes --allow-remote."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def is_loopback(url: str) -> bool:
    """True for http(s)://localhost, 127.0.0.0/8 and [::1]; names other than localhost are not resolved."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
