"""Request checks shared by the guards and the console (a kernel library, not a plugin): the
client address, loopback names and origins, single headers, the bearer token and the
constant-time comparison every guard uses (the write/read guards, the sessions, the data plane)."""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
from typing import Any
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Loopback: 127.0.0.0/8, ::1 and IPv4-mapped loopback (docs/http-security.md).
LOOPBACK_NETS = tuple(
    ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128", "::ffff:127.0.0.0/104")
)
_LOOPBACK_NAMES = {"localhost", "localhost."}


def parse_ip(text: str) -> IPAddress | None:
    """An IP address (zone ids dropped, IPv4-mapped IPv6 unwrapped), or None."""
    text = text.strip()
    if "%" in text:  # fe80::1%eth0: the zone is local detail, not identity
        text = text.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@functools.lru_cache(maxsize=4096)
def is_loopback(address: str) -> bool:
    """True if ``address`` (a socket peer or decided client) is a loopback address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    return any(ip.version == net.version and ip in net for net in LOOPBACK_NETS)


def is_local_client(info: Any) -> bool:
    """The request comes from this machine itself, not relayed by a proxy."""
    return not info.via_proxy and is_loopback(info.client)


@functools.lru_cache(maxsize=64)
def networks(cidrs: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs)


def in_networks(ip: IPAddress, nets: tuple[IPNetwork, ...]) -> bool:
    return any(ip.version == n.version and ip in n for n in nets)


def host_is_loopback(host: str) -> bool:
    """A ``Host`` value (``name[:port]``, ``[v6][:port]``) naming this machine's loopback."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        rest = host[end + 1:] if end > 0 else ""
        if end < 0 or (rest and not (rest[0] == ":" and _port_ok(rest[1:]))):
            return False
        return is_loopback(host[1:end])
    if host.count(":") > 1:  # an unbracketed IPv6 literal is not a valid Host
        return False
    name, sep, port = host.partition(":")
    if sep and not _port_ok(port):
        return False
    return name in _LOOPBACK_NAMES or is_loopback(name)


def _port_ok(text: str) -> bool:
    return text.isdigit() and len(text) <= 5


def origin_is_loopback(origin: str) -> bool:
    """An ``Origin`` value that is an http(s) origin on a loopback host ("null" is not)."""
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or parts.path or parts.query or parts.fragment:
        return False
    if parts.username is not None or parts.password is not None:
        return False
    return host_is_loopback(parts.netloc)


def single_header(headers: Any, name: str) -> tuple[int, str]:
    """(count, value): how many ``name`` headers were sent and the value when exactly one."""
    values = headers.getlist(name)
    return len(values), (values[0] if len(values) == 1 else "")


MISSING, MALFORMED = None, ""


def bearer_token(headers: Any) -> str | None:
    """The bearer token; None when no Authorization header; "" when it cannot be one.

    The scheme is case-insensitive (RFC 7235); several Authorization headers are
    malformed (which one would be meant?). The query string is never consulted.
    """
    count, value = single_header(headers, "Authorization")
    if count == 0:
        return MISSING
    if count > 1:
        return MALFORMED
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return MALFORMED
    return token.strip()


def _as_bytes(text: str) -> bytes:
    # ASGI header values arrive as latin-1-decoded bytes: latin-1 gives the bytes back.
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def token_digest(token: str) -> bytes:
    """SHA-256 of a token's bytes as they were sent: what a guard that keeps only the digest of
    its secret (the data plane) compares with :func:`digest_matches`."""
    return hashlib.sha256(_as_bytes(token)).digest()


def digest_matches(given: str | None, digest: bytes | None) -> bool:
    """Constant-time comparison of a sent token with a secret's digest; never raises.

    Both sides are digests, so neither the content nor the length of the secret leaks
    through timing. No token or no digest never matches.
    """
    if not given or not digest:
        return False
    try:
        return hmac.compare_digest(token_digest(given), digest)
    except Exception:  # defensive: odd input is a mismatch, never an error
        return False


def tokens_equal(given: str | None, expected: str) -> bool:
    """:func:`digest_matches` against a configured token. An empty configured token never matches."""
    if not expected:
        return False
    try:
        return digest_matches(given, hashlib.sha256(expected.encode("utf-8")).digest())
    except Exception:  # a configured token that is not encodable matches nothing
        return False


def matches_any(given: str | None, *expected: str) -> bool:
    # evaluate every candidate so the time does not depend on which one matched
    results = [tokens_equal(given, e) for e in expected]
    return any(results)


def guarded_path(info: Any) -> str:
    """The path a guard judges: the matched rule, else the normalised path (app.py)."""
    return info.route if info.route is not None else (info.norm_path or info.path)
