"""``egress.deny`` and ``egress.rules``: parsed once per settings object, matched per request.

The deny list uses the allowlist's grammar (``example.com``, ``*.example.com``, ``:port``,
IP literals) and wins over every allow. ``egress.rules`` are HTTP rules: each is
``{hosts, methods, paths, verdict}``, checked in order, the first that matches decides.
They need a method and a path, so they apply where the proxy sees them: plain-HTTP
requests, and requests inside TLS the proxy terminates (the matcher takes plain values so
any caller can use it). A rule without ``methods`` matches every method, one without
``paths`` every path; a path pattern ending in ``*`` is a prefix, anything else must equal
the request's path (the query string is not part of the path compared). The path is compared
percent-decoded (``/%61dmin`` is ``/admin``), and when a rule names the host, a path an origin
could resolve to another one (dot segments, backslashes, NUL) is refused instead of compared
(``rule_path``). A deny entry without a port denies the host on every port.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable
from urllib.parse import unquote

import attrs

from risoluto.errors import ConfigError

from ._hosts import IPAddress, Rule, parse_entry

if TYPE_CHECKING:
    from risoluto.settings import EgressConfig, EgressRuleConfig

_METHOD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ-")


def _patterns(entries: Iterable[str], where: str) -> tuple[Rule, ...]:
    out = []
    for i, entry in enumerate(entries):
        try:
            out.append(parse_entry(entry))
        except ConfigError as exc:
            # parse_entry names the allowlist key; say which key really holds the entry
            detail = str(exc).split(": ", 1)[-1]
            raise ConfigError(f"{where}[{i}]: {detail}") from None
    return tuple(out)


def _host_match(rules: tuple[Rule, ...], host: str | IPAddress, port: int) -> Rule | None:
    return next((r for r in rules if r.matches_host(host) and r.matches_port(port)), None)


def rule_path(target: str) -> str | None:
    """The path HTTP rules compare: no query string or fragment, percent-decoded. None when it
    could mean another path to the origin than the one compared: not starting with ``/``, a ``.``
    or ``..`` segment (also encoded), a backslash or a NUL."""
    path = unquote(target.split("?", 1)[0].split("#", 1)[0])
    if not path.startswith("/") or "\\" in path or "\x00" in path:
        return None
    return None if any(seg in (".", "..") for seg in path.split("/")) else path


@attrs.frozen
class HttpRule:
    index: int
    hosts: tuple[Rule, ...]
    methods: frozenset[str]  # empty = every method
    paths: tuple[str, ...]  # empty = every path
    verdict: str  # allow | deny

    @property
    def name(self) -> str:
        """How the audit names this rule: its position in ``egress.rules``."""
        return f"rules[{self.index}]"

    def matches(self, host: str | IPAddress, port: int, method: str, path: str) -> bool:
        if _host_match(self.hosts, host, port) is None:
            return False
        if self.methods and method.upper() not in self.methods:
            return False
        if not self.paths:
            return True
        bare = path.split("?", 1)[0] or "/"
        return any(bare.startswith(p[:-1]) if p.endswith("*") else bare == p for p in self.paths)


def parse_rule(index: int, raw: EgressRuleConfig) -> HttpRule:
    where = f"egress.rules[{index}]"
    if not raw.hosts:
        raise ConfigError(f"{where}.hosts: a rule needs at least one host pattern")
    methods = []
    for i, method in enumerate(raw.methods):
        if not method or not set(method.upper()) <= _METHOD_CHARS:
            raise ConfigError(f"{where}.methods[{i}]: {method!r} is not an HTTP method")
        methods.append(method.upper())
    for i, path in enumerate(raw.paths):
        if not path.startswith("/") or "*" in path[:-1]:
            raise ConfigError(f"{where}.paths[{i}]: {path!r} must start with '/' and may end with one '*'")
    return HttpRule(index, _patterns(raw.hosts, f"{where}.hosts"), frozenset(methods), tuple(raw.paths),
                    raw.verdict)


class EgressRules:
    """The deny list and the HTTP rules of one ``EgressConfig``."""

    def __init__(self, cfg: EgressConfig):
        self.deny = _patterns(cfg.deny, "egress.deny")
        self.http = tuple(parse_rule(i, r) for i, r in enumerate(cfg.rules))

    def denied(self, host: str | IPAddress, port: int) -> Rule | None:
        """The deny entry naming ``host``, if any (it wins over every allow). A deny entry without
        a port covers every port of the host, not only 80 and 443."""
        return next((r for r in self.deny if r.matches_host(host) and r.port in (None, port)), None)

    def http_rule(self, host: str | IPAddress, port: int, method: str, path: str) -> HttpRule | None:
        """The first HTTP rule matching the request, or None (then the allowlist decides)."""
        return next((r for r in self.http if r.matches(host, port, method, path)), None)

    def covers(self, host: str | IPAddress, port: int) -> bool:
        """Whether some HTTP rule names ``host:port`` (then its requests' paths must be comparable)."""
        return any(_host_match(r.hosts, host, port) is not None for r in self.http)


__all__ = ["EgressRules", "HttpRule", "parse_rule", "rule_path"]
