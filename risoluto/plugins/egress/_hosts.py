"""Egress host patterns: parsing and matching of allowlist and deny-list entries (docs/egress.md).

Grammar of one entry::

    example.com            that host only, ports 80 and 443
    *.example.com          any subdomain (any depth), never example.com itself
    example.com:8443       that host, that port only
    203.0.113.7[:port]     an IPv4 literal: only reachable when listed as such
    [2001:db8::7][:port]   an IPv6 literal, always in brackets

Names are compared case-insensitively, without a trailing dot, in IDNA (punycode) form.
The same normalisation is applied to the host a client asks for, so ``EXAMPLE.com.``
and ``bücher.example`` / ``xn--bcher-kva.example`` match the way an operator expects.

A private library of the egress plugins (the allowlist, the proxy, the resolver, the rules, the
broker): no hooks, so disabling a plugin never leaves it half-loaded through another's import.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Iterable

import attrs

from risoluto.errors import ConfigError

DEFAULT_PORTS = frozenset({80, 443})
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_PORT = re.compile(r"^[0-9]{1,5}\Z")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class HostError(ValueError):
    """A host that is not a valid DNS name or IP literal (the message says why)."""


def normalise_host(host: str) -> str | IPAddress:
    """Canonical form of a host: an IP address object, or a lower-case punycode name.

    Raises HostError for anything that is neither. Names whose last label is numeric
    (``127.1``, ``0x7f.1``, ``2130706433``) are refused: resolvers read them as IPv4
    addresses, which would let an unlisted address pass for a name.
    """
    if host.startswith("[") and host.endswith("]"):
        try:
            return ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise HostError(f"{host!r} is not an IPv6 address") from None
    if ":" in host:
        raise HostError(f"{host!r}: IPv6 literals must be written in brackets, e.g. [2001:db8::1]")
    try:
        return ipaddress.IPv4Address(host)
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        raise HostError(f"{host!r} is not a host name")
    try:
        name = name.encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise HostError(f"{host!r} is not a valid (IDNA) host name: {exc}") from None
    labels = name.split(".")
    bad = next((label for label in labels if not _LABEL.match(label)), None)
    if bad is not None:
        raise HostError(f"{host!r} is not a host name (label {bad!r})")
    last = labels[-1]
    if last.isdigit() or re.fullmatch(r"0x[0-9a-f]*", last):
        raise HostError(f"{host!r} looks like an IPv4 address in a non-canonical form")
    if len(name) > 253:
        raise HostError(f"{host!r} is longer than 253 characters")
    return name


def split_host_port(text: str) -> tuple[str, int | None]:
    """``host[:port]`` / ``[v6][:port]`` -> (host, port or None); raises HostError."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise HostError(f"{text!r}: unclosed '['")
        host, rest = text[: end + 1], text[end + 1:]
        if rest and not rest.startswith(":"):
            raise HostError(f"{text!r}: unexpected text after ']'")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, None
    if port_text is None:
        return host, None
    if not _PORT.match(port_text) or not 1 <= int(port_text) <= 65535:
        raise HostError(f"{text!r}: {port_text!r} is not a port (1-65535)")
    return host, int(port_text)


@attrs.frozen
class Rule:
    entry: str  # as written, for messages and logs
    host: str | IPAddress  # normalised name (without "*.") or address
    wildcard: bool
    port: int | None  # None = the default ports 80 and 443

    def matches_host(self, host: str | IPAddress) -> bool:
        if isinstance(self.host, str) != isinstance(host, str):
            return False
        if self.wildcard:
            return isinstance(host, str) and host.endswith("." + str(self.host))
        return host == self.host

    def matches_port(self, port: int) -> bool:
        return port in DEFAULT_PORTS if self.port is None else port == self.port


def parse_entry(entry: str) -> Rule:
    """One allowlist entry -> Rule; ConfigError names the entry and the reason."""
    if not isinstance(entry, str) or not entry.strip():
        raise ConfigError(f"codex.sandbox.egressAllowlist: {entry!r} is not a host name")
    text = entry.strip()
    try:
        host, port = split_host_port(text)
        wildcard = host.startswith("*.")
        if wildcard:
            host = host[2:]
        if "*" in host:
            raise HostError("a wildcard is allowed only as the first label, as in *.example.com")
        norm = normalise_host(host)
        if wildcard and not isinstance(norm, str):
            raise HostError("a wildcard cannot cover an IP address")
        if wildcard and "." not in str(norm):
            raise HostError("a wildcard over a whole top-level domain is not allowed")
    except HostError as exc:
        raise ConfigError(f"codex.sandbox.egressAllowlist: invalid entry {entry!r}: {exc}") from None
    return Rule(entry=entry, host=norm, wildcard=wildcard, port=port)


@attrs.frozen
class Match:
    allowed: bool
    reason: str  # allowlist | host_not_allowed | port_not_allowed | ip_literal_not_allowed
    rule: Rule | None = None


class Allowlist:
    """The parsed entries of one sandbox's allowlist."""

    def __init__(self, entries: Iterable[str]):
        self.entries: tuple[str, ...] = tuple(entries)
        self.rules = tuple(parse_entry(e) for e in self.entries)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def match(self, host: str | IPAddress, port: int) -> Match:
        """``host`` is already normalised (see :func:`normalise_host`)."""
        host_rules = [r for r in self.rules if r.matches_host(host)]
        rule = next((r for r in host_rules if r.matches_port(port)), None)
        if rule is not None:
            return Match(True, "allowlist", rule)
        if host_rules:
            return Match(False, "port_not_allowed")
        if not isinstance(host, str):
            return Match(False, "ip_literal_not_allowed")
        return Match(False, "host_not_allowed")
