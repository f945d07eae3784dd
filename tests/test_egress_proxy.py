"""The egress proxy on loopback, no Docker: every refusal is tried from the client's side.

Origins listen on 127.0.77.1 (ports 80 and 443, so allowlist entries use the default
ports) and the proxy gets a test-only ``allowPrivateNetworks: [127.0.0.0/8]``; names
are answered by a DNS server this test runs, or pinned with ``egress.hosts``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import ssl
from typing import Any, AsyncIterator

import anyio
import attrs
import pytest
from anyio.streams.tls import TLSStream

from egress_support import CA, DnsServer, exchange, start_origin
from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.egress import EgressVerdict
from risoluto.kernel import Kernel
from risoluto.plugins.egress._metrics import metrics_for
from risoluto.plugins.egress._hosts import Allowlist
from risoluto.plugins.egress._proxy import Client, EgressProxy
from risoluto.settings import build_settings

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(os.geteuid() != 0, reason="origins bind ports 80/443 on 127.0.77.1 (root)"),
]

ORIGIN = "127.0.77.1"


@pytest.fixture(autouse=True)
def only_this_machine(monkeypatch):
    """The private and metadata addresses below must be refused before any connection. Should
    the proxy ever dial one, the attempt fails here, and no packet leaves this machine."""
    import ipaddress

    from risoluto.plugins.egress import _proxy as proxy_module

    real, outside = proxy_module.connect_sync, []

    def loopback_only(host: str, port: int, timeout: float) -> Any:
        if not ipaddress.ip_address(host).is_loopback:
            outside.append(f"{host}:{port}")
            raise ConnectionRefusedError(f"test refused to dial {host}:{port}, off this machine")
        return real(host, port, timeout)

    monkeypatch.setattr(proxy_module, "connect_sync", loopback_only)
    yield
    assert outside == [], f"the proxy tried to connect off this machine: {outside}"
SECRET_A = "s3cret-a-" + "x" * 20
SECRET_B = "s3cret-b-" + "y" * 20
RECORDS = {
    "allowed.test": [ORIGIN], "a.wild.test": [ORIGIN], "wild.test": [ORIGIN], "other.test": [ORIGIN],
    "unlisted.test": [ORIGIN], "xn--bcher-kva.test": [ORIGIN], "private.test": ["10.1.2.3"],
    "meta.test": ["169.254.169.254"], "mixed.test": [ORIGIN, "192.168.1.1"],
}


class Rules:
    """A plugin rule through the decision hook: deny a path prefix, allow only GET to a host."""

    @hookimpl
    def risoluto_egress_decision(self, request, allowlist):
        if request.path.startswith("/private"):
            return EgressVerdict(False, "path /private is off limits")
        if request.host == "allowed.test" and request.method not in ("GET", "CONNECT"):
            return EgressVerdict(False, "only GET to allowed.test")
        return None


@attrs.define
class Env:
    proxy: EgressProxy
    port: int
    kernel: Kernel
    ca: CA
    origins: dict[str, Any]
    dns: DnsServer

    def metric(self, name: str, **labels: str) -> float:
        return self.kernel.metrics_registry.get_sample_value(name, labels) or 0.0

    async def settled(self, name: str, value: float) -> float:
        """The gauge once it reaches ``value`` (the proxy finishes a tunnel just after the client)."""
        with anyio.move_on_after(2):
            while self.metric(name) != value:
                await anyio.sleep(0.01)
        return self.metric(name)


@contextlib.asynccontextmanager
async def proxy_env(tmp_path, egress: dict[str, Any] | None = None) -> AsyncIterator[Env]:
    ca = CA(tmp_path)
    async with anyio.create_task_group() as tg:
        dns = DnsServer(RECORDS)
        dns_port = await dns.start(tg)
        http, _ = await start_origin(tg, ORIGIN, 80, "http")
        https, _ = await start_origin(tg, ORIGIN, 443, "https", ca.server_context())
        raw, raw_port = await start_origin(tg, ORIGIN, 0, "raw")
        config = {"egress": {
            "resolver": f"127.0.0.1:{dns_port}", "allowPrivateNetworks": ["127.0.0.0/8"],
            "hosts": {"pinned.test": ORIGIN, "pinned-private.test": "10.9.9.9", "mapped.test": "::ffff:10.0.0.1"},
            "idleTimeoutS": 2.0, "maxConnections": 8, **(egress or {}),
        }}
        kernel = Kernel(build_settings(config, None, {"DATA_DIR": str(tmp_path)}), (("rules", Rules()),))
        proxy = EgressProxy(lambda: kernel.settings.egress, kernel.hooks.egress_decision, metrics_for(kernel))
        proxy.register(Client(
            username="sbx-a", secret=SECRET_A.encode(), sandbox="sbx-a", addresses=frozenset({"127.0.0.1"}),
            allowlist=Allowlist(["allowed.test", "*.wild.test", "pinned.test", "bücher.test", "pinned-private.test",
                                 "private.test", "meta.test", "mixed.test", "mapped.test", ORIGIN + ":443",
                                 f"allowed.test:{raw_port}"]),
        ))
        proxy.register(Client(username="sbx-b", secret=SECRET_B.encode(), sandbox="sbx-b",
                              addresses=frozenset({"127.0.0.2"}), allowlist=Allowlist(["other.test"])))
        _, port = await tg.start(proxy.serve, "127.0.0.1")
        yield Env(proxy, port, kernel, ca, {"http": http, "https": https, "raw": raw, "raw_port": raw_port}, dns)
        tg.cancel_scope.cancel()


def auth(user: str = "sbx-a", secret: str = SECRET_A) -> str:
    return "Proxy-Authorization: Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode() + "\r\n"



def status_of(response: bytes) -> tuple[int, str]:
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    reason = next((line.split(": ", 1)[1] for line in head.split("\r\n") if line.startswith("X-Risoluto-Egress")), "")
    return int(head.split(" ", 2)[1]), reason


def body_json(response: bytes) -> dict[str, Any]:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


async def get(port: int, url: str, extra: str = "", **kw: Any) -> bytes:
    return await exchange(port, f"GET {url} HTTP/1.1\r\nHost: ignored\r\n{extra}\r\n".encode(), **kw)


async def connect_tls(port: int, host: str, sni: str | None, ctx: ssl.SSLContext, *, creds: str | None = None,
                      source: str = "127.0.0.1") -> tuple[int, str, bytes]:
    """CONNECT then TLS with ``sni`` then GET /; returns (status, reason, body or b'')."""
    stream = await anyio.connect_tcp("127.0.0.1", port, local_host=source)
    async with stream:
        await stream.send(f"CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n{creds or auth()}\r\n".encode())
        head = b""
        with anyio.fail_after(10):
            while b"\r\n\r\n" not in head:
                head += await stream.receive()
        status, reason = status_of(head)
        if status != 200:
            return status, reason, b""
        try:
            with anyio.fail_after(10):
                tls = await TLSStream.wrap(stream, server_side=False, hostname=sni, ssl_context=ctx,
                                           standard_compatible=False)
                await tls.send(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                out = b""
                with contextlib.suppress(anyio.EndOfStream):
                    while True:
                        out += await tls.receive()
                return 200, "", out
        except (ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream, OSError):
            return 200, "closed", b""


async def test_allowed_http_is_forwarded_clean(tmp_path):
    async with proxy_env(tmp_path) as env:
        extra = auth() + "Proxy-Connection: keep-alive\r\nX-Custom: 1\r\nConnection: X-Drop\r\nX-Drop: 1\r\n"
        response = await get(env.port, "http://allowed.test/hello?x=1", extra)
        assert status_of(response)[0] == 200
        seen = body_json(response)
        assert seen["line"] == "GET /hello?x=1 HTTP/1.1"  # origin-form to the origin
        assert seen["headers"]["Host"] == "allowed.test"  # our Host, not the client's
        assert seen["headers"]["X-Custom"] == "1"
        assert seen["headers"]["Connection"] == "close"
        for gone in ("Proxy-Authorization", "Proxy-Connection", "X-Drop"):
            assert gone not in seen["headers"]
        assert SECRET_A not in response.decode("latin-1")
        assert env.metric("risoluto_egress_decisions_total", verdict="allow", reason="allowlist") == 1
        assert env.metric("risoluto_egress_bytes_total", direction="download") >= len(response) - 200


async def test_allowed_https_connect_exact_and_wildcard(tmp_path):
    async with proxy_env(tmp_path) as env:
        ctx = env.ca.client_context()
        for host in ("allowed.test", "a.wild.test", "ALLOWED.Test.", "xn--bcher-kva.test"):
            sni = host.lower().rstrip(".")
            if sni.startswith("xn--"):
                ctx = ssl.create_default_context(cafile=str(env.ca.ca_path))
                ctx.check_hostname = False  # the test certificate does not carry that name
            status, _, out = await connect_tls(env.port, f"{host}:443", sni, ctx)
            assert status == 200 and b"200 OK" in out, host
            assert json.loads(out.split(b"\r\n\r\n", 1)[1])["origin"] == "https"
        assert await env.settled("risoluto_egress_open_tunnels", 0) == 0
        assert env.metric("risoluto_egress_bytes_total", direction="upload") > 0


@pytest.mark.parametrize("url, status, reason", [
    ("http://unlisted.test/", 403, "host_not_allowed"),
    ("http://wild.test/", 403, "host_not_allowed"),  # *.wild.test is subdomains only
    ("http://allowed.test:8080/", 403, "port_not_allowed"),
    ("http://127.0.77.1/", 403, "port_not_allowed"),  # listed only with :443
    ("http://127.0.77.2/", 403, "ip_literal_not_allowed"),
    ("http://[::1]/", 403, "ip_literal_not_allowed"),
    ("http://private.test/", 403, "private_address"),
    ("http://pinned-private.test/", 403, "private_address"),
    ("http://meta.test/", 403, "private_address"),
    ("http://mapped.test/", 403, "private_address"),
    ("http://mixed.test/", 403, "private_address"),
    ("http://user:pw@allowed.test/", 400, "userinfo_in_uri"),
    ("http://allowed.test@unlisted.test/", 400, "userinfo_in_uri"),
    ("https://allowed.test/", 400, "unsupported_scheme"),
    ("/relative", 400, "not_a_proxy_request"),
    ("http://127.1/", 400, "malformed_host"),
    ("http://allowed.test/private/x", 403, "plugin"),
])
async def test_refusals(tmp_path, url, status, reason):
    async with proxy_env(tmp_path) as env:
        response = await get(env.port, url, auth())
        assert status_of(response) == (status, reason)
        assert env.origins["http"].requests == []
        assert env.metric("risoluto_egress_decisions_total", verdict="deny", reason=reason) == 1


async def test_decision_hook_can_restrict_methods(tmp_path):
    async with proxy_env(tmp_path) as env:
        raw = f"POST http://allowed.test/ HTTP/1.1\r\nContent-Length: 2\r\n{auth()}\r\nhi".encode()
        assert status_of(await exchange(env.port, raw)) == (403, "plugin")
        raw = f"POST http://a.wild.test/up HTTP/1.1\r\nContent-Length: 2\r\n{auth()}\r\nhi".encode()
        assert body_json(await exchange(env.port, raw))["body"] == "hi"


async def test_credentials(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="risoluto.egress")
    async with proxy_env(tmp_path) as env:
        missing = await get(env.port, "http://allowed.test/")
        assert status_of(missing) == (407, "credential_missing")
        assert b'Proxy-Authenticate: Basic realm="risoluto-egress"' in missing
        assert status_of(await get(env.port, "http://allowed.test/", auth(secret="wrong")))[0] == 407
        assert status_of(await get(env.port, "http://allowed.test/", auth(user="sbx-zz")))[0] == 407
        assert status_of(await get(env.port, "http://allowed.test/", "Proxy-Authorization: Bearer x\r\n"))[0] == 407
        # sandbox b's valid credential, used from a's address: refused, and b's allowlist never applies
        stolen = await get(env.port, "http://other.test/", auth("sbx-b", SECRET_B), source="127.0.0.1")
        assert status_of(stolen) == (407, "credential_foreign")
        # a's credential from b's address: refused too
        assert status_of(await get(env.port, "http://allowed.test/", auth(), source="127.0.0.2")) == (
            407, "credential_foreign")
        # each sandbox gets only its own rules
        own = await get(env.port, "http://other.test/", auth("sbx-b", SECRET_B), source="127.0.0.2")
        assert status_of(own)[0] == 200
        assert status_of(await get(env.port, "http://allowed.test/", auth("sbx-b", SECRET_B), source="127.0.0.2")) == (
            403, "host_not_allowed")
        assert status_of(await get(env.port, "http://other.test/", auth()))[1] == "host_not_allowed"
        env.proxy.unregister("sbx-b")
        assert status_of(await get(env.port, "http://other.test/", auth("sbx-b", SECRET_B), source="127.0.0.2")) == (
            407, "credential_invalid")
    lines = [r.getMessage() for r in caplog.records if r.name == "risoluto.egress"]
    assert len(lines) == 10  # one line per decision
    assert all(SECRET_A not in line and SECRET_B not in line for line in lines)


async def test_tls_tunnel_checks(tmp_path):
    async with proxy_env(tmp_path) as env:
        ctx = env.ca.client_context()
        # SNI naming another host than the CONNECT host: the tunnel is closed
        assert (await connect_tls(env.port, "allowed.test:443", "other.test", ctx))[1] == "closed"
        no_check = ssl.create_default_context(cafile=str(env.ca.ca_path))
        no_check.check_hostname = False
        assert (await connect_tls(env.port, "allowed.test:443", None, no_check))[1] == "closed"
        # a listed IP literal may go without SNI (clients send none for addresses)
        status, _, out = await connect_tls(env.port, f"{ORIGIN}:443", None, no_check)
        assert status == 200 and b"200 OK" in out
        assert env.origins["https"].requests[-1]["line"] == "GET / HTTP/1.1"
        assert len(env.origins["https"].requests) == 1
        # plain text inside a tunnel to a default port: refused
        raw = f"CONNECT allowed.test:443 HTTP/1.1\r\n{auth()}\r\nGET / HTTP/1.1\r\n\r\n".encode()
        assert (await exchange(env.port, raw)).count(b"HTTP/1.1") == 1  # only our 200, then closed
        for reason in ("sni_mismatch", "sni_missing", "not_tls"):
            assert env.metric("risoluto_egress_decisions_total", verdict="deny", reason=reason) == 1
        # CONNECT to an unlisted host, an IPv6 literal, another port, without a port
        for target, reason in (("unlisted.test:443", "host_not_allowed"), ("[::1]:443", "ip_literal_not_allowed"),
                               ("allowed.test:22", "port_not_allowed"), ("allowed.test", "connect_needs_port")):
            raw = f"CONNECT {target} HTTP/1.1\r\n{auth()}\r\n".encode()
            assert status_of(await exchange(env.port, raw))[1] == reason


async def test_explicit_port_entry_allows_a_raw_tunnel(tmp_path):
    async with proxy_env(tmp_path) as env:
        port = env.origins["raw_port"]
        raw = f"CONNECT allowed.test:{port} HTTP/1.1\r\n{auth()}\r\nGET /raw HTTP/1.1\r\n\r\n".encode()
        out = await exchange(env.port, raw)
        assert out.startswith(b"HTTP/1.1 200 Connection established") and b'"origin": "raw"' in out


async def test_request_bodies_and_smuggling(tmp_path):
    async with proxy_env(tmp_path) as env:
        chunked = (f"POST http://a.wild.test/c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n{auth()}\r\n"
                   "5\r\nhello\r\n0\r\n\r\n").encode()
        assert body_json(await exchange(env.port, chunked))["body"] == "5\r\nhello\r\n0\r\n\r\n"
        # a second request pipelined behind the first never reaches the origin
        pipelined = (f"GET http://a.wild.test/one HTTP/1.1\r\n{auth()}\r\n"
                     "GET /private/two HTTP/1.1\r\nHost: a.wild.test\r\n\r\n").encode()
        await exchange(env.port, pipelined)
        lines = [r["line"] for r in env.origins["http"].requests]
        assert "GET /one HTTP/1.1" in lines and not any("two" in line for line in lines)
        both = f"POST http://a.wild.test/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n{auth()}\r\n"
        assert status_of(await exchange(env.port, both.encode())) == (400, "conflicting_framing")
        # a chunk-size line ending in a bare LF ("5\n" then CRLF) is not relayed, origins disagree on
        # it: the exchange is dropped (the `$` of the old pattern matched before that \n)
        bare_lf = (f"POST http://a.wild.test/c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n{auth()}\r\n"
                   "5\n\r\nhello\r\n0\r\n\r\n").encode()
        out = await exchange(env.port, bare_lf)
        assert not out.startswith(b"HTTP/1.1 200") and b"hello" not in out
        gzip = f"POST http://a.wild.test/ HTTP/1.1\r\nTransfer-Encoding: gzip\r\n{auth()}\r\n"
        assert status_of(await exchange(env.port, gzip.encode())) == (501, "unsupported_transfer_encoding")


@pytest.mark.parametrize("raw, status, reason", [
    (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", 400, "malformed_request_line"),
    (b"GET http://allowed.test/ HTTP/1.1\nHost: x\n\n\r\n\r\n", 400, "bare_newline"),
    (b"GET http://allowed.test/ HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400, "malformed_header"),
    (b"GET http://allowed.test/ HTTP/2.0\r\n\r\n", 400, "malformed_request_line"),
    (b"GET http://allowed.test/\xff HTTP/1.1\r\n\r\n", 400, "malformed_request_line"),
    (b"GET http://allowed.test/ HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431, "headers_too_large"),
])
async def test_malformed_requests(tmp_path, raw, status, reason):
    async with proxy_env(tmp_path) as env:
        assert status_of(await exchange(env.port, raw)) == (status, reason)


async def test_survives_slow_loris_garbage_and_floods(tmp_path):
    async with proxy_env(tmp_path, {"idleTimeoutS": 1.0, "maxConnections": 6}) as env:
        async with anyio.create_task_group() as tg:
            results: dict[str, Any] = {}

            async def slow() -> None:  # one header byte every 0.3 s: cut at the 1 s head deadline
                stream = await anyio.connect_tcp("127.0.0.1", env.port)
                async with stream, anyio.create_task_group() as inner:
                    async def drip() -> None:
                        with contextlib.suppress(anyio.BrokenResourceError, OSError):
                            for byte in b"GET http://allowed.test/ HTTP/1.1\r\n":
                                await stream.send(bytes([byte]))
                                await anyio.sleep(0.3)

                    inner.start_soon(drip)
                    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                        results["slow"] = await stream.receive()
                    inner.cancel_scope.cancel()

            tg.start_soon(slow)
            # idle connections from one peer: the per-peer cap (maxConnections/2 = 3) refuses the fourth
            idle = [await anyio.connect_tcp("127.0.0.1", env.port, local_host="127.0.0.3") for _ in range(4)]
            refused = await idle[3].receive()
            assert status_of(refused) == (503, "too_many_connections")
            # meanwhile a well-behaved client is served
            ok = await get(env.port, "http://allowed.test/", auth())
            assert status_of(ok)[0] == 200
            assert status_of(await exchange(env.port, os.urandom(4096)))[0] in (400, 408, 431)
        assert status_of(results["slow"]) == (408, "header_timeout")
        for stream in idle:
            await stream.aclose()
        assert status_of(await get(env.port, "http://allowed.test/", auth()))[0] == 200


async def test_idle_tunnel_is_closed(tmp_path):
    async with proxy_env(tmp_path, {"idleTimeoutS": 1.0}) as env:
        port = env.origins["raw_port"]
        stream = await anyio.connect_tcp("127.0.0.1", env.port)
        async with stream:
            await stream.send(f"CONNECT allowed.test:{port} HTTP/1.1\r\n{auth()}\r\n".encode())
            assert (await stream.receive()).startswith(b"HTTP/1.1 200")
            assert await env.settled("risoluto_egress_open_tunnels", 1) == 1
            with anyio.fail_after(5):
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    while True:
                        await stream.receive()
        assert await env.settled("risoluto_egress_open_tunnels", 0) == 0


async def test_pins_and_resolver(tmp_path):
    async with proxy_env(tmp_path) as env:
        assert status_of(await get(env.port, "http://pinned.test/", auth()))[0] == 200
        assert "pinned.test" not in env.dns.queries  # a pin is never looked up
        assert "allowed.test" not in env.dns.queries
        await get(env.port, "http://allowed.test/", auth())
        assert "allowed.test" in env.dns.queries  # egress.resolver is the one asked
    async with proxy_env(tmp_path, {"resolver": "127.0.0.1:9", "connectTimeoutS": 1.0}) as env:  # no DNS there
        assert status_of(await get(env.port, "http://allowed.test/", auth())) == (502, "resolve_failed")


async def test_never_binds_a_wildcard(tmp_path):
    kernel = Kernel(build_settings({}, None, {"DATA_DIR": str(tmp_path)}))
    proxy = EgressProxy(lambda: kernel.settings.egress, kernel.hooks.egress_decision, metrics_for(kernel))
    for host in ("0.0.0.0", "::"):
        with pytest.raises(ValueError):
            await proxy.serve(host)


def _hello(extensions: list[tuple[int, bytes]]) -> bytes:
    """A minimal TLS 1.2-framed ClientHello handshake message with the given extensions."""
    import struct

    exts = b"".join(struct.pack("!HH", t, len(d)) + d for t, d in extensions)
    suites, compression = b"\x00\x02\x13\x01", b"\x01\x00"
    body = b"\x03\x03" + b"\x00" * 32 + b"\x00" + suites + compression + struct.pack("!H", len(exts)) + exts
    return b"\x01" + len(body).to_bytes(3, "big") + body


def _sni(*names: str) -> bytes:
    import struct

    entries = b"".join(b"\x00" + struct.pack("!H", len(n)) + n.encode() for n in names)
    return struct.pack("!H", len(entries)) + entries


def _records(message: bytes, split: int | None = None) -> bytes:
    parts = [message] if split is None else [message[:split], message[split:]]
    return b"".join(b"\x16\x03\x01" + len(p).to_bytes(2, "big") + p for p in parts)


def test_client_hello_parser():
    from risoluto.plugins.egress import _tls

    # a real ClientHello from Python's own TLS stack
    outgoing = ssl.MemoryBIO()
    obj = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="Allowed.Test")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    real = outgoing.read()
    message, complete = _tls.handshake_bytes(real)
    assert complete and _tls.parse_client_hello(message).server_name == "allowed.test"
    # split over two records, and cut short: complete only once everything is there
    hello = _hello([(0, _sni("a.test"))])
    two = _records(hello, split=10)
    assert _tls.handshake_bytes(two[:-3])[1] is False
    message, complete = _tls.handshake_bytes(two)
    assert complete and _tls.parse_client_hello(message) == _tls.Hello(server_name="a.test", ech=False)
    assert _tls.parse_client_hello(_hello([(0xFE0D, b"\x00" * 8), (0, _sni("a.test"))])).ech is True
    assert _tls.parse_client_hello(_hello([])).server_name is None
    for bad in (_hello([(0, _sni("a.test", "b.test"))]), _hello([(0, _sni("a.test")), (0, _sni("a.test"))]),
                _hello([(0, b"\x00\x09\x00")]), b"\x02" + hello[1:], hello[:20]):
        with pytest.raises(_tls.HelloError):
            _tls.parse_client_hello(bad)
    with pytest.raises(_tls.HelloError):
        _tls.handshake_bytes(b"GET / HTTP/1.1\r\n")


async def test_encrypted_client_hello_is_refused(tmp_path):
    async with proxy_env(tmp_path) as env:
        raw = f"CONNECT allowed.test:443 HTTP/1.1\r\n{auth()}\r\n".encode()
        raw += _records(_hello([(0, _sni("allowed.test")), (0xFE0D, b"\x00" * 16)]))
        out = await exchange(env.port, raw)
        assert out.count(b"HTTP/1.1") == 1 and env.origins["https"].requests == []
        assert env.metric("risoluto_egress_decisions_total", verdict="deny", reason="ech_not_allowed") == 1


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_proxy_is_plain_anyio_and_runs_under_trio(tmp_path, anyio_backend):
    async with proxy_env(tmp_path) as env:
        assert status_of(await get(env.port, "http://allowed.test/", auth()))[0] == 200
        assert status_of(await get(env.port, "http://unlisted.test/", auth())) == (403, "host_not_allowed")
        status, _, out = await connect_tls(env.port, "allowed.test:443", "allowed.test", env.ca.client_context())
        assert status == 200 and b"200 OK" in out
