"""Client address: the socket peer, or the right-most untrusted ``X-Forwarded-For`` entry
when (and only when) the peer is a trusted proxy (docs/http-security.md).

This one decision feeds the write/read guards, the rate limiter and the logs.

Choices made here (docs/http-security.md):
- A request whose peer is a trusted proxy is always ``via_proxy=True``, even without an
  ``X-Forwarded-For`` header: we cannot tell a relayed request from the proxy's own, and a
  relayed request must never count as loopback.
- A malformed entry met while walking the header from the right (not an IP address, or
  an obfuscated RFC 7239 identifier such as ``unknown``) stops the walk: the client is the
  proxy-side neighbour of that entry we could still vouch for (i.e. the address that
  relayed it), still ``via_proxy=True``. No 400: a broken proxy must not take the API
  down, and the result can never be loopback or a spoofed address.
- Entries may carry a port (``1.2.3.4:567``, ``[2001:db8::1]:443``); it is ignored.
- IPv4-mapped IPv6 addresses are reported as IPv4, zone ids are dropped.
- Every loopback address (127.0.0.0/8, ::1, ::ffff:127.0.0.0/104) is reported as ``127.0.0.1``:
  they are all this machine, so one client for the rate limiter and the audit logs (else each of
  the 16 million addresses of 127.0.0.0/8 would buy a bucket of its own).
"""

from __future__ import annotations

from typing import Any

from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.auth import RequestInfo
from risoluto.hookspecs.doctor import FAIL, PASS, WARN, CheckResult
from risoluto.settings import Settings

from risoluto.http_checks import IPAddress, in_networks, is_loopback, networks, parse_ip

MAX_XFF_ENTRIES = 64  # a longer chain is not a real proxy chain; walk no further
LOOPBACK_CLIENT = "127.0.0.1"  # the one name of every loopback address


def _named(ip: IPAddress) -> str:
    text = str(ip)
    return LOOPBACK_CLIENT if is_loopback(text) else text


def _entry_ip(entry: str) -> IPAddress | None:
    entry = entry.strip().strip('"')
    if entry.startswith("["):  # [v6] or [v6]:port
        end = entry.find("]")
        return parse_ip(entry[1:end]) if end > 0 else None
    if entry.count(":") == 1:  # v4:port
        entry = entry.split(":", 1)[0]
    return parse_ip(entry)


def decide(peer: str, headers: Any, trusted: tuple[str, ...]) -> tuple[str, bool]:
    """(client, via_proxy) for a request from ``peer`` carrying ``headers``."""
    if not trusted and "." in peer and ":" not in peer:
        # fast path: a socket's IPv4 peer is already canonical
        return (LOOPBACK_CLIENT if peer.startswith("127.") and is_loopback(peer) else peer), False
    peer_ip = parse_ip(peer)
    canonical_peer = _named(peer_ip) if peer_ip is not None else peer
    if peer_ip is None or not trusted:
        return canonical_peer, False
    nets = networks(trusted)
    if not in_networks(peer_ip, nets):
        return canonical_peer, False  # an untrusted peer's X-Forwarded-For is ignored
    entries = [e for v in headers.getlist("X-Forwarded-For") for e in v.split(",")]
    client = peer_ip
    for entry in reversed(entries[-MAX_XFF_ENTRIES:]):
        ip = _entry_ip(entry)
        if ip is None:
            break  # malformed: keep the last address we could vouch for
        client = ip
        if not in_networks(ip, nets):
            break  # the right-most untrusted entry is the client
    return _named(client), True


@hookimpl
def risoluto_client_address(info: RequestInfo, settings: Settings) -> tuple[str, bool] | None:
    return decide(info.peer, info.headers, tuple(settings.server.trusted_proxies))


@hookimpl
def risoluto_doctor_checks(kernel: Any) -> list[CheckResult]:
    item = "Trusted proxies"
    proxies = tuple(kernel.settings.server.trusted_proxies)
    if not proxies:
        return [CheckResult(item=item, status=PASS,
                            reason="no trusted proxies: X-Forwarded-For is ignored, the socket peer is the client")]
    try:
        nets = networks(proxies)
    except ValueError as exc:  # settings validate CIDRs; keep the doctor from raising anyway
        return [CheckResult(item=item, status=FAIL, reason=f"invalid CIDR: {exc}",
                            fix="list proxy addresses as CIDRs in RISOLUTO_TRUSTED_PROXIES")]
    everything = [str(n) for n in nets if n.prefixlen == 0]
    if everything:
        return [CheckResult(
            item=item, status=FAIL,
            reason=f"{', '.join(everything)} trusts every peer: any client can spoof X-Forwarded-For",
            fix="list only your reverse proxies' addresses in RISOLUTO_TRUSTED_PROXIES",
        )]
    broad = [str(n) for n in nets if n.prefixlen < (16 if n.version == 4 else 48)]
    public = [str(n) for n in nets if n.is_global]
    if broad or public:
        return [CheckResult(
            item=item, status=WARN,
            reason="trusted proxy ranges are broad or public: " + ", ".join(sorted(set(broad + public))),
            fix="narrow RISOLUTO_TRUSTED_PROXIES to the exact proxy addresses",
        )]
    loop = [str(n) for n in nets if any(n.overlaps(ln) for ln in networks(("127.0.0.0/8", "::1/128")))]
    note = " (loopback requests are then never treated as local)" if loop else ""
    return [CheckResult(item=item, status=PASS,
                        reason=f"X-Forwarded-For honoured only from {', '.join(map(str, nets))}{note}")]


@hookimpl
def risoluto_checklist_provides() -> list[str]:
    return ["client address"]
