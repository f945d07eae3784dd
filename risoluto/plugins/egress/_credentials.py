"""Brokered credentials: ``egress.credentials`` parsed and checked, placeholders, and matching.

A brokered secret never enters a worker. The worker gets a placeholder
``risoluto-placeholder-<NAME>-<32 hex>`` (128 random bits, new for every sandbox), and the
egress proxy swaps it for the real value only in a request whose sandbox, host, port, method,
path and header all match an entry. Everything about *where* a placeholder may be used lives
here; the proxy side (TLS, HTTP) is ``_broker``.
"""

from __future__ import annotations

import fnmatch
import re
import secrets
from typing import Iterable
from urllib.parse import unquote

import attrs

from risoluto.errors import ConfigError
from risoluto.settings import CredentialConfig, Settings

from ._hosts import Allowlist, HostError, IPAddress, Rule, normalise_host, split_host_port

PREFIX = "risoluto-placeholder-"
PLACEHOLDER = re.compile(r"risoluto-placeholder-([A-Za-z0-9_.:-]{1,256})-([0-9a-f]{32})(?![0-9a-f])")
_HEADER = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_METHOD = _HEADER
# Headers a credential may never be put in: they frame or route the request.
_FORBIDDEN_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "te", "upgrade", "trailer",
                      "proxy-authorization", "keep-alive", "expect"}


@attrs.frozen
class Credential:
    """One entry of ``egress.credentials``, parsed."""

    index: int
    secret: str
    rules: tuple[Rule, ...]  # the hosts; a rule without a port means 443
    header: str  # lower case
    format: str
    paths: tuple[str, ...]
    methods: frozenset[str]  # empty: every method

    def covers_host(self, host: str | IPAddress, port: int) -> bool:
        return any(r.matches_host(host) and port == (r.port or 443) for r in self.rules)

    def allows(self, host: str | IPAddress, port: int, method: str, path: str) -> bool:
        if not self.covers_host(host, port):
            return False
        if self.methods and method.upper() not in self.methods:
            return False
        return path_is_plain(path) and any(fnmatch.fnmatchcase(path, glob) for glob in self.paths)

    def render(self, value: str) -> str:
        return self.format.replace("{value}", value)


def path_is_plain(path: str) -> bool:
    """Whether ``path`` means what it says: no dot segments, encoded slashes or backslashes, which
    an origin could read as another path than the glob was matched against."""
    if not path.startswith("/") or "\\" in path:
        return False
    lowered = path.lower()
    if "%2f" in lowered or "%5c" in lowered or "%00" in lowered:
        return False
    return not any(seg in (".", "..") for seg in unquote(path).split("/"))


def parse(entries: Iterable[CredentialConfig], allowlist: Allowlist | None = None) -> tuple[Credential, ...]:
    """``egress.credentials`` -> Credentials; ConfigError names the key path and the reason.

    With ``allowlist``, every host must also be on it (brokering works only through the proxy).
    """
    out = []
    for i, entry in enumerate(entries):
        where = f"egress.credentials[{i}]"
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,256}", entry.secret):
            raise ConfigError(f"{where}.secret: {entry.secret!r} is not a secret name ([A-Za-z0-9_.:-]{{1,256}})")
        rules = tuple(_host_rule(f"{where}.hosts[{j}]", h) for j, h in enumerate(entry.hosts))
        if allowlist is not None:
            for j, rule in enumerate(rules):
                if not _on_allowlist(rule, allowlist):
                    raise ConfigError(f"{where}.hosts[{j}]: {rule.entry!r} (port {rule.port or 443}) is not covered by "
                                      "codex.sandbox.egressAllowlist; a brokered host must also be allowed")
        if not _HEADER.match(entry.header) or entry.header.lower() in _FORBIDDEN_HEADERS:
            raise ConfigError(f"{where}.header: {entry.header!r} is not a header a credential may be put in")
        if entry.format.count("{value}") != 1 or any(c in entry.format for c in "\r\n\x00"):
            raise ConfigError(f"{where}.format: must contain {{value}} exactly once, on one line")
        for j, glob in enumerate(entry.paths):
            if not glob.startswith("/") or any(c in glob for c in " \r\n\x00?#"):
                raise ConfigError(f"{where}.paths[{j}]: {glob!r} must be a path glob starting with / (no query)")
        for j, method in enumerate(entry.methods):
            if not _METHOD.match(method) or method.upper() == "CONNECT":
                raise ConfigError(f"{where}.methods[{j}]: {method!r} is not an HTTP method")
        out.append(Credential(index=i, secret=entry.secret, rules=rules, header=entry.header.lower(),
                              format=entry.format, paths=tuple(entry.paths),
                              methods=frozenset(m.upper() for m in entry.methods)))
    return tuple(out)


def _host_rule(where: str, text: str) -> Rule:
    from ._hosts import parse_entry

    try:
        rule = parse_entry(text)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {str(exc).split(': ', 1)[1]}") from None
    return rule


def _on_allowlist(rule: Rule, allowlist: Allowlist) -> bool:
    """Whether every host/port ``rule`` covers is also allowed by ``allowlist``."""
    port = rule.port or 443
    if rule.wildcard:
        return any(a.wildcard and (rule.host == a.host or str(rule.host).endswith("." + str(a.host)))
                   and a.matches_port(port) for a in allowlist.rules)
    return allowlist.match(rule.host, port).allowed


def validate(settings: Settings) -> tuple[Credential, ...]:
    """Startup and overlay check: the entries parse, brokering has an allowlist to work through,
    every brokered host is on it, and ``egress.upstreamCaFile`` is readable."""
    entries = settings.egress.credentials
    if not entries:
        return ()
    allow = settings.codex.sandbox.egress_allowlist
    if not allow:
        raise ConfigError("egress.credentials: brokering works through the egress proxy, which runs only with a "
                          "non-empty codex.sandbox.egressAllowlist; list the brokered hosts there")
    creds = parse(entries, Allowlist(allow))
    ca_file = settings.egress.upstream_ca_file
    if ca_file:
        import ssl

        try:
            ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"egress.upstreamCaFile: cannot load {ca_file!r} as PEM certificates ({exc})") from None
    return creds


def brokered_names(settings: Settings) -> frozenset[str]:
    return frozenset(entry.secret for entry in settings.egress.credentials)


def new_placeholder(name: str) -> str:
    return f"{PREFIX}{name}-{secrets.token_hex(16)}"


def mentions_placeholder(text: str) -> bool:
    """Whether ``text`` holds anything that looks like a placeholder, also percent-encoded."""
    lowered = text.lower()
    return PREFIX in lowered or PREFIX in unquote(lowered)


def host_of(authority: str) -> tuple[str | IPAddress, int | None] | None:
    """A ``Host`` header value -> (normalised host, port or None); None when malformed."""
    try:
        host, port = split_host_port(authority)
        return normalise_host(host), port
    except HostError:
        return None
