"""Name resolution for the egress proxy: pins, a configured DNS server, or the host resolver.

``egress.resolver`` (``host:port``) is asked with a minimal DNS client (one UDP query per
record type, A and AAAA, recursion desired, CNAME chains followed inside the answer). A
truncated answer is an error rather than a TCP retry: names an allowlist is about have
short answers. ``egress.hosts`` pins names as ``/etc/hosts`` does and is checked first.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import struct
from typing import Mapping

import anyio

from risoluto.errors import ConfigError

from ._hosts import HostError, IPAddress, normalise_host, split_host_port

A, AAAA, CNAME = 1, 28, 5


class ResolveError(Exception):
    """The name does not resolve (the message says why, without secrets)."""


def parse_resolver(text: str) -> tuple[str, int]:
    try:
        host, port = split_host_port(text)
        addr = normalise_host(host)
    except HostError as exc:
        raise ConfigError(f"egress.resolver: {exc}") from None
    if isinstance(addr, str):
        raise ConfigError(f"egress.resolver: {text!r} must be an IP address (host:port), not a name")
    return str(addr), port or 53


def parse_pins(hosts: Mapping[str, str]) -> dict[str, IPAddress]:
    pins: dict[str, IPAddress] = {}
    for name, address in hosts.items():
        try:
            key = normalise_host(name)
        except HostError as exc:
            raise ConfigError(f"egress.hosts.{name}: {exc}") from None
        try:
            pins[str(key)] = ipaddress.ip_address(address)
        except ValueError:
            raise ConfigError(f"egress.hosts.{name}: {address!r} is not an IP address") from None
    return pins


def _encode_query(qid: int, name: str, qtype: int) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode("ascii") for p in name.split(".") if p)
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\x00" + struct.pack("!HH", qtype, 1)


def _read_name(msg: bytes, pos: int) -> tuple[str, int]:
    """A possibly compressed name at ``pos`` -> (lower-case name, position after it)."""
    labels: list[str] = []
    end = -1
    for _ in range(128):  # bounded: a pointer loop cannot spin forever
        length = msg[pos]
        if length & 0xC0 == 0xC0:
            if end < 0:
                end = pos + 2
            pos = ((length & 0x3F) << 8) | msg[pos + 1]
            continue
        if length == 0:
            return ".".join(labels).lower(), (end if end >= 0 else pos + 1)
        labels.append(msg[pos + 1: pos + 1 + length].decode("ascii", "replace"))
        pos += 1 + length
    raise ResolveError("malformed DNS answer (name too long)")


def parse_answer(msg: bytes, qid: int, name: str, qtype: int) -> list[IPAddress]:
    """Addresses of ``name`` (following CNAMEs) in a DNS response; raises ResolveError."""
    try:
        rid, flags, qd, an, _ns, _ar = struct.unpack_from("!HHHHHH", msg, 0)
        if rid != qid or not flags & 0x8000:
            raise ResolveError("unrelated DNS answer")
        if flags & 0x0200:
            raise ResolveError("truncated DNS answer")
        rcode = flags & 0x000F
        if rcode == 3:
            return []
        if rcode != 0:
            raise ResolveError(f"DNS server answered rcode {rcode}")
        pos = 12
        for _ in range(qd):
            _qname, pos = _read_name(msg, pos)
            pos += 4
        records: list[tuple[str, int, bytes]] = []
        for _ in range(an):
            owner, pos = _read_name(msg, pos)
            rtype, _cls, _ttl, rdlen = struct.unpack_from("!HHIH", msg, pos)
            pos += 10
            rdata_pos = pos
            pos += rdlen
            if rtype == CNAME:
                target, _ = _read_name(msg, rdata_pos)
                records.append((owner, rtype, target.encode()))
            else:
                records.append((owner, rtype, msg[rdata_pos:pos]))
    except (struct.error, IndexError):
        raise ResolveError("malformed DNS answer") from None
    wanted = {name.lower()}
    for _ in range(8):  # follow CNAME chains inside the answer, bounded
        more = {data.decode() for owner, rtype, data in records if rtype == CNAME and owner in wanted}
        if more <= wanted:
            break
        wanted |= more
    out: list[IPAddress] = []
    for owner, rtype, data in records:
        if owner in wanted and rtype == qtype == A and len(data) == 4:
            out.append(ipaddress.IPv4Address(data))
        elif owner in wanted and rtype == qtype == AAAA and len(data) == 16:
            out.append(ipaddress.IPv6Address(data))
    return out


async def dns_query(server: tuple[str, int], name: str, qtype: int, timeout: float) -> list[IPAddress]:
    qid = secrets.randbits(16)
    packet = _encode_query(qid, name, qtype)
    try:
        with anyio.fail_after(timeout):
            async with await anyio.create_connected_udp_socket(server[0], server[1]) as udp:
                await udp.send(packet)
                while True:  # ignore stray datagrams; a matching id ends the wait
                    try:
                        return parse_answer(await udp.receive(), qid, name, qtype)
                    except ResolveError as exc:
                        if str(exc) != "unrelated DNS answer":
                            raise
    except TimeoutError:
        raise ResolveError("DNS server did not answer in time") from None
    except OSError as exc:
        raise ResolveError(f"DNS server unreachable ({exc.strerror or exc})") from None


class Resolver:
    """Pins first, then the configured DNS server, else the host's resolver."""

    def __init__(self, server: str, hosts: Mapping[str, str], timeout: float):
        self.server = parse_resolver(server) if server else None
        self.pins = parse_pins(hosts)
        self.timeout = timeout

    async def resolve(self, name: str, port: int) -> list[IPAddress]:
        if name in self.pins:
            return [self.pins[name]]
        if self.server is not None:
            found: list[IPAddress] = []
            for qtype in (A, AAAA):
                found += await dns_query(self.server, name, qtype, self.timeout)
        else:
            try:
                with anyio.fail_after(self.timeout):
                    infos = await anyio.getaddrinfo(name, port, type=socket.SOCK_STREAM)
            except TimeoutError:
                raise ResolveError("the host resolver did not answer in time") from None
            except OSError as exc:
                raise ResolveError(f"does not resolve ({exc.strerror or exc})") from None
            found = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        unique = list(dict.fromkeys(found))
        if not unique:
            raise ResolveError("no address")
        return unique
