"""Strict parsing of proxy request heads, and the proxy's own short answers.

Anything odd is refused rather than guessed at: obsolete line folding, bare LF, control
characters, conflicting framing headers, origin-form targets (not a proxy request),
userinfo in an absolute URI, schemes other than http.
"""

from __future__ import annotations

import re

import attrs

from ._hosts import HostError, split_host_port

MAX_HEAD = 16 * 1024
_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET_OK = re.compile(r"^[\x21-\x7e]+\Z")
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authorization", "proxy-authenticate", "proxy-connection",
    "te", "trailer", "upgrade", "host",
}


class BadRequest(ValueError):
    """Refuse with ``status`` and a reason code (``str(exc)``) the client may see."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.status = status


@attrs.frozen
class RequestHead:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]

    def get(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name]


@attrs.frozen
class Target:
    host: str  # as written (brackets kept for IPv6), not yet normalised
    port: int
    path: str  # origin-form path for plain HTTP, "" for CONNECT


def parse_head(raw: bytes) -> RequestHead:
    """``raw`` is the head without its final CRLFCRLF."""
    lines = raw.split(b"\r\n")
    if any(b"\n" in line or b"\r" in line for line in lines):
        raise BadRequest("bare_newline")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadRequest("malformed_request_line")
    try:
        target = parts[1].decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("malformed_request_line") from None
    if not _TARGET_OK.match(target):
        raise BadRequest("malformed_request_line")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise BadRequest("malformed_header")  # also catches obs-fold (leading whitespace)
        value = value.strip(b" \t")
        if _VALUE_BAD.search(value):
            raise BadRequest("malformed_header")
        headers.append((name.decode("ascii"), value.decode("latin-1")))
    return RequestHead(parts[0].decode("ascii"), target, parts[2].decode("ascii"), headers)


def parse_target(head: RequestHead) -> Target:
    if head.method == "CONNECT":
        authority, path, default = head.target, "", None
    else:
        scheme, sep, rest = head.target.partition("://")
        if not sep:
            raise BadRequest("not_a_proxy_request")  # origin-form: the client forgot the proxy
        if scheme.lower() != "http":
            raise BadRequest("unsupported_scheme")
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        authority, path, default = rest[:cut], rest[cut:], 80
        path = path if path.startswith("/") else "/" + path
        path = path.split("#", 1)[0]
    if "@" in authority:
        raise BadRequest("userinfo_in_uri")
    try:
        host, port = split_host_port(authority)
    except HostError:
        raise BadRequest("malformed_authority") from None
    if port is None:
        if default is None:
            raise BadRequest("connect_needs_port")
        port = default
    if not host:
        raise BadRequest("malformed_authority")
    return Target(host=host, port=port, path=path)


def upstream_head(head: RequestHead, target: Target, authority: str) -> bytes:
    """The request as sent to the origin: origin-form, our Host, hop-by-hop headers gone."""
    listed = {t.strip().lower() for v in head.get("connection") for t in v.split(",")}
    lines = [f"{head.method} {target.path} {head.version}", f"Host: {authority}"]
    for name, value in head.headers:
        low = name.lower()
        if low not in HOP_BY_HOP and low not in listed:
            lines.append(f"{name}: {value}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def body_framing(head: RequestHead) -> tuple[str, int]:
    """("none"|"length"|"chunked", length). Refuses ambiguous framing (smuggling)."""
    te = head.get("transfer-encoding")
    cl = head.get("content-length")
    if te:
        if cl:
            raise BadRequest("conflicting_framing")
        if len(te) != 1 or te[0].strip().lower() != "chunked":
            raise BadRequest("unsupported_transfer_encoding", 501)
        return "chunked", 0
    if cl:
        values = {v.strip() for v in cl}
        if len(values) != 1 or not next(iter(values)).isdigit():
            raise BadRequest("bad_content_length")
        return "length", int(next(iter(values)))
    return "none", 0


_STATUS = {
    400: "Bad Request", 403: "Forbidden", 407: "Proxy Authentication Required", 408: "Request Timeout",
    431: "Request Header Fields Too Large", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout",
}


def answer(status: int, reason: str, message: str) -> bytes:
    """A short plain-text answer; ``X-Risoluto-Egress`` carries the machine-readable reason."""
    body = f"{message}\n".encode()
    extra = 'Proxy-Authenticate: Basic realm="risoluto-egress"\r\n' if status == 407 else ""
    return (
        f"HTTP/1.1 {status} {_STATUS.get(status, 'Error')}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
        f"X-Risoluto-Egress: {reason}\r\n{extra}Connection: close\r\n\r\n"
    ).encode() + body
