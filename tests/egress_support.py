"""Targets the egress tests run themselves: HTTP and TLS origins, a DNS server, a throwaway CA.

Everything listens on addresses of this machine that the test chooses (loopback, or an
address on a dummy interface the Docker tests create). Nothing here ever dials out.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import socket
import ssl
import struct
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketAttribute, TaskGroup
from anyio.streams.tls import TLSListener
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from risoluto.plugins.egress._probe_targets import create_veth_netns, remove_veth_netns, sockets_in_netns

NAMES = ["allowed.test", "*.wild.test", "other.test", "private.test", "unlisted.test", "pinned.test"]


class CA:
    """A throwaway CA and one server certificate for ``names``; files written to ``tmp``."""

    def __init__(self, tmp: Path, names: list[str] = NAMES):
        now = datetime.datetime.now(datetime.timezone.utc)
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "risoluto test CA")])
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(name).public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_path = tmp / "ca.pem"
        self.ca_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.cert_path = tmp / "server.pem"
        self.cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        self.key_path = tmp / "server.key"
        self.key_path.write_bytes(leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_path))


class Origin:
    """An HTTP/1.1 origin answering JSON that describes the request it got."""

    def __init__(self, label: str):
        self.label = label
        self.requests: list[dict[str, Any]] = []
        self.connections = 0

    async def handle(self, stream: Any) -> None:
        self.connections += 1
        async with stream:
            buf = b""
            try:
                with anyio.fail_after(10):
                    while b"\r\n\r\n" not in buf:
                        buf += await stream.receive()
                    head, _, body = buf.partition(b"\r\n\r\n")
                    lines = head.decode("latin-1").split("\r\n")
                    headers = dict(line.split(": ", 1) for line in lines[1:])
                    size = int(headers.get("Content-Length", "0"))
                    if headers.get("Transfer-Encoding") == "chunked":
                        while not body.endswith(b"0\r\n\r\n"):
                            body += await stream.receive()
                    while len(body) < size:
                        body += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, ssl.SSLError, TimeoutError, ValueError):
                return
            record = {"origin": self.label, "line": lines[0], "headers": headers,
                      "body": body.decode("latin-1")}
            self.requests.append(record)
            if lines[0].startswith("GET /big/"):
                n = int(lines[0].split()[1].rsplit("/", 1)[1])
                await stream.send(f"HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n".encode())
                chunk = b"x" * 65536
                while n > 0:
                    await stream.send(chunk[:n])
                    n -= len(chunk)
                return
            payload = json.dumps(record).encode()
            await stream.send(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload
            )


async def start_origin(tg: TaskGroup, host: str, port: int, label: str,
                       tls: ssl.SSLContext | None = None) -> tuple[Origin, int]:
    origin = Origin(label)
    listener: Any = await anyio.create_tcp_listener(local_host=host, local_port=port)
    bound = listener.extra(SocketAttribute.local_port)
    if tls is not None:
        listener = TLSListener(listener, tls, standard_compatible=False)

    async def serve() -> None:
        async with listener:  # cancelling serve() alone would leave the socket open
            await listener.serve(origin.handle)

    tg.start_soon(serve)
    return origin, bound


class DnsServer:
    """A tiny authoritative UDP DNS server: A and AAAA from ``records``, else NXDOMAIN."""

    def __init__(self, records: dict[str, list[str]]):
        self.records = records
        self.queries: list[str] = []
        self.port = 0

    async def start(self, tg: TaskGroup, host: str = "127.0.0.1", raw: socket.socket | None = None) -> int:
        """Serve on ``host`` (a free port), or on an already bound UDP socket ``raw``."""
        from anyio.abc import UDPSocket

        sock: Any = await UDPSocket.from_socket(raw) if raw is not None else await anyio.create_udp_socket(
            local_host=host, local_port=0)
        self.port = sock.extra(SocketAttribute.local_port)
        tg.start_soon(self._serve, sock)
        return self.port

    async def _serve(self, sock: Any) -> None:
        async with sock:
            async for data, addr in sock:
                try:
                    await sock.sendto(self.answer(data), *addr[:2])
                except (ValueError, struct.error, IndexError):
                    continue

    def answer(self, query: bytes) -> bytes:
        qid, _flags, _qd = struct.unpack_from("!HHH", query, 0)
        pos, labels = 12, []
        while query[pos]:
            labels.append(query[pos + 1: pos + 1 + query[pos]].decode())
            pos += 1 + query[pos]
        question = query[12: pos + 5]
        qtype = struct.unpack_from("!H", query, pos + 1)[0]
        name = ".".join(labels).lower()
        self.queries.append(name)
        addrs = [ipaddress.ip_address(a) for a in self.records.get(name, [])]
        found = name in self.records
        answers = b""
        count = 0
        for addr in addrs:
            rtype = 1 if addr.version == 4 else 28
            if rtype == qtype:
                answers += b"\xc0\x0c" + struct.pack("!HHIH", rtype, 1, 5, len(addr.packed)) + addr.packed
                count += 1
        flags = 0x8180 if found else 0x8183
        return struct.pack("!HHHHHH", qid, flags, 1, count, 0, 0) + question + answers


# -- a network namespace for targets the proxy may reach but workers may not -----------------


class TargetNamespace:
    """``ip netns`` + a veth pair: the host routes to ``ns_ip``; workers on an internal Docker
    network have no route there (Docker drops forwarding out of an internal bridge).

    Sockets are opened inside the namespace from a short-lived thread that enters it with
    setns(2), then served by this test's own event loop.
    """

    def __init__(self) -> None:
        import secrets

        tag = secrets.token_hex(3)
        octet = 100 + secrets.randbelow(100)
        self.name = f"rsl-egr-{tag}"
        self.host_if, self.ns_if = f"rvh{tag}", f"rvn{tag}"
        self.host_ip, self.ns_ip = f"198.18.{octet}.1", f"198.18.{octet}.2"
        self.cidr = f"198.18.{octet}.0/30"

    def __enter__(self) -> TargetNamespace:
        for _ in range(5):  # another run may hold this /30: pick another
            try:
                return self._create()
            except Exception:
                self.__init__()  # type: ignore[misc]
        return self._create()

    def _create(self) -> TargetNamespace:
        create_veth_netns(self.name, self.host_if, self.ns_if, self.host_ip, self.ns_ip)
        return self

    def __exit__(self, *exc: Any) -> None:
        remove_veth_netns(self.name, self.host_if)

    def sockets(self, specs: list[tuple[int, int]]) -> list[socket.socket]:
        """Bound sockets inside the namespace: (socket type, port) -> listening/bound sockets."""
        def bind_all() -> list[socket.socket]:
            out = []
            for kind, port in specs:
                sock = socket.socket(socket.AF_INET, kind)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.ns_ip, port))
                if kind == socket.SOCK_STREAM:
                    sock.listen(128)
                sock.setblocking(False)
                out.append(sock)
            return out

        return sockets_in_netns(self.name, bind_all)


async def serve_origin(tg: TaskGroup, sock: socket.socket, label: str, tls: ssl.SSLContext | None = None) -> Origin:
    """Serve an :class:`Origin` on an already bound, listening socket."""
    from anyio.abc import SocketListener

    origin = Origin(label)
    listener: Any = await SocketListener.from_socket(sock)
    if tls is not None:
        listener = TLSListener(listener, tls, standard_compatible=False)

    async def serve() -> None:
        async with listener:
            await listener.serve(origin.handle)

    tg.start_soon(serve)
    return origin


async def exchange(port: int, raw: bytes, source: str = "127.0.0.1", timeout: float = 15) -> bytes:
    """Send ``raw`` to the proxy on loopback and read until it closes."""
    with anyio.fail_after(timeout):
        stream = await anyio.connect_tcp("127.0.0.1", port, local_host=source)
        async with stream:
            await stream.send(raw)
            out = b""
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while True:
                    out += await stream.receive()
            return out
