"""The egress forward proxy (anyio): CONNECT tunnels and absolute-URI plain HTTP.

One connection = one request. For each it: bounds the head (size, slow-loris deadline),
checks the sandbox credential (Basic, in ``Proxy-Authorization``; only from that sandbox's
own address), normalises the host, asks the decision hook then the sandbox's allowlist,
resolves the name itself, refuses non-public addresses (unless in
``egress.allowPrivateNetworks``), connects to exactly the address it checked, and for a
CONNECT tunnel reads the TLS ClientHello and requires its SNI to name the CONNECT host.
Every decision is one log line on ``risoluto.egress`` and one metric increment.
"""

from __future__ import annotations

import binascii
import hmac
import ipaddress
import logging
import socket
from typing import Any, Awaitable, Callable

import anyio
import attrs
from anyio.abc import TaskStatus

from risoluto.hookspecs.egress import EgressRequest, EgressVerdict
from risoluto.settings import EgressConfig

from . import _tls
from ._broker import Broker
from ._dns import Resolver, ResolveError
from ._http import MAX_HEAD, BadRequest, RequestHead, Target, answer, body_framing, parse_head, parse_target
from ._http import upstream_head
from ._metrics import EgressMetrics
from ._relay import Activity, Conn, IdleTimeout, Reader, open_connection, pump, relay_body
from .allowlist import Allowlist, HostError, IPAddress, Match, normalise_host

log = logging.getLogger("risoluto.egress")

METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
HEADER_TIMEOUT_S = 10.0  # whole request head / ClientHello; capped by egress.idleTimeoutS
SERVER_FIRST_WAIT_S = 0.5  # raw (non-TLS) tunnels: how long to wait for a client-first byte
Decide = Callable[[EgressRequest, tuple[str, ...]], "EgressVerdict | None"]


@attrs.define(kw_only=True)
class Client:
    """One sandbox's credential and allowlist. ``addresses`` limits where it may be used from;
    when None, ``locate`` is awaited once to learn them (the container's address)."""

    username: str
    secret: bytes = attrs.field(repr=False)
    allowlist: Allowlist
    sandbox: str
    addresses: frozenset[str] | None = None
    locate: Callable[[], Awaitable[set[str]]] | None = None


def _basic(values: list[str]) -> tuple[str, bytes]:
    """(user, secret) of one ``Basic`` Proxy-Authorization value; ("", b"") when malformed."""
    scheme, _, token = values[0].partition(" ")
    if len(values) != 1 or scheme.lower() != "basic":
        return "", b""
    try:
        user, sep, secret = binascii.a2b_base64(token.strip(), strict_mode=True).partition(b":")
        return (user.decode("ascii"), secret) if sep else ("", b"")
    except (binascii.Error, UnicodeDecodeError):
        return "", b""


class Refusal(Exception):
    def __init__(self, status: int, reason: str, message: str, detail: str = ""):
        super().__init__(reason)
        self.status, self.reason, self.message, self.detail = status, reason, message, detail


def address_refusal(addr: IPAddress, allowed: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str:
    """Why ``addr`` may not be dialled, or "" if it may."""
    check = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped else addr
    if any(check in net for net in allowed if net.version == check.version):
        return ""
    if check in METADATA:
        return "metadata address"
    if check.is_loopback or check.is_link_local or check.is_multicast or check.is_unspecified:
        return "loopback, link-local, multicast or unspecified address"
    if check.is_private or check.is_reserved or not check.is_global:
        return "private or non-public address"
    return ""


class _Policy:
    """What egress.* settings mean, rebuilt only when the settings object changes."""

    def __init__(self, cfg: EgressConfig):
        self.cfg = cfg
        self.resolver = Resolver(cfg.resolver, cfg.hosts, cfg.connect_timeout_s)
        self.allowed_nets = [ipaddress.ip_network(n, strict=False) for n in cfg.allow_private_networks]
        self.head_timeout = min(HEADER_TIMEOUT_S, cfg.idle_timeout_s)


class EgressProxy:
    def __init__(self, settings: Callable[[], EgressConfig], decide: Decide, metrics: EgressMetrics):
        self._settings = settings
        self._decide = decide
        self.metrics = metrics
        self._clients: dict[str, Client] = {}
        self._policy: _Policy | None = None
        self._open = 0
        self._per_peer: dict[str, int] = {}
        self.address: tuple[str, int] | None = None
        self.broker: Broker | None = None  # credential brokering (set by the enforcer when configured)

    # -- credentials --------------------------------------------------------------------
    def register(self, client: Client) -> None:
        self._clients[client.username] = client

    def unregister(self, username: str) -> None:
        self._clients.pop(username, None)

    def policy(self) -> _Policy:
        cfg = self._settings()
        if self._policy is None or self._policy.cfg is not cfg:
            self._policy = _Policy(cfg)
        return self._policy

    # -- serving ------------------------------------------------------------------------
    async def serve(
        self, host: str, port: int = 0, *, task_status: TaskStatus[Any] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``host:port`` (never a wildcard address) until cancelled."""
        addr = ipaddress.ip_address(host)
        if addr.is_unspecified:
            raise ValueError("the egress proxy never binds a wildcard address")
        self.policy()  # a configuration error surfaces before we listen
        listener = socket.socket(socket.AF_INET6 if addr.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
        with listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(1024)
            listener.setblocking(False)
            self.address = listener.getsockname()[:2]
            task_status.started(self.address)
            async with anyio.create_task_group() as tg:
                while True:
                    await anyio.wait_readable(listener)
                    while True:  # accept everything queued, then wait again
                        try:
                            sock, peer = listener.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError as exc:  # EMFILE and friends: back off, keep serving
                            log.error("egress proxy: accept failed: %s", exc.strerror)
                            await anyio.sleep(0.1)
                            break
                        tg.start_soon(self._handle, Conn(sock), str(peer[0]))

    async def _handle(self, conn: Conn, peer: str) -> None:
        cfg = self.policy().cfg
        per_peer_max = max(1, cfg.max_connections // 2)
        try:
            if self._open >= cfg.max_connections or self._per_peer.get(peer, 0) >= per_peer_max:
                ctx = {"peer": peer}
                await self._refuse(conn, ctx, Refusal(503, "too_many_connections", "Too many connections."))
                return
            self._open += 1
            self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
            self.metrics.connections.inc()
            try:
                await self._serve_one(conn, peer)
            except (anyio.EndOfStream, IdleTimeout, OSError):
                pass  # the client or origin went away or went quiet; nothing to answer
            except Exception:  # never let one connection take the listener down
                log.exception("egress proxy: unexpected error (peer=%s)", peer)
            finally:
                self._open -= 1
                self.metrics.connections.dec()
                left = self._per_peer.pop(peer) - 1
                if left:
                    self._per_peer[peer] = left
        finally:
            conn.close()

    async def _serve_one(self, conn: Conn, peer: str) -> None:
        policy = self.policy()
        ctx: dict[str, Any] = {"peer": peer}
        try:
            reader = Reader(conn)
            head = await self._read_head(reader, policy)
            ctx["method"] = head.method
            client = await self._authenticate(head, peer)
            ctx["sandbox"] = client.sandbox
            target = parse_target(head)
            try:
                host = normalise_host(target.host)
            except HostError:
                raise Refusal(400, "malformed_host", "The host is not a valid name or IP literal.") from None
            ctx.update(host=str(host), port=target.port)
            framing = body_framing(head) if head.method != "CONNECT" else ("none", 0)
            match = self._decide_one(client, head, target, host)
            upstream = await self._connect(policy, host, target.port, ctx)
        except BadRequest as exc:
            await self._refuse(conn, ctx, Refusal(exc.status, str(exc), "Malformed proxy request."))
            return
        except Refusal as refusal:
            await self._refuse(conn, ctx, refusal)
            return
        try:
            # credentialed hosts (and any plain request carrying a placeholder) go to the broker
            if self.broker is not None and await self.broker.takes(
                    self, conn, reader, upstream, head, host, target.port, client, ctx):
                return
            if head.method == "CONNECT":
                await self._tunnel(conn, reader, upstream, policy, host, match, ctx)
            else:
                await self._forward(conn, reader, upstream, head, target, framing, policy, match, ctx)
        finally:
            upstream.close()

    async def _read_head(self, reader: Reader, policy: _Policy) -> RequestHead:
        with anyio.move_on_after(policy.head_timeout) as scope:
            raw = await reader.read_until(b"\r\n\r\n", MAX_HEAD)
        if scope.cancelled_caught:
            raise Refusal(408, "header_timeout", "The request head did not arrive in time.")
        if raw is None:
            raise Refusal(431, "headers_too_large", f"The request head is larger than {MAX_HEAD} bytes.")
        return parse_head(raw)

    async def _authenticate(self, head: RequestHead, peer: str) -> Client:
        values = head.get("proxy-authorization")
        if not values:
            raise Refusal(407, "credential_missing", "This proxy needs the sandbox's credential.")
        user, secret = _basic(values)
        client = self._clients.get(user) if user else None
        # compare even for an unknown user, so timing does not tell which usernames exist
        valid = hmac.compare_digest(client.secret if client else b"\x00" * 32, secret)
        if client is None or not valid:
            raise Refusal(407, "credential_invalid", "The credential is not valid.")
        if client.addresses is None and client.locate is not None:
            try:
                client.addresses = frozenset(await client.locate())
            except Exception:
                raise Refusal(503, "sandbox_lookup_failed", "The sandbox's address could not be checked.") from None
        if client.addresses is None or peer not in client.addresses:
            raise Refusal(407, "credential_foreign", "The credential is not valid from this address.")
        return client

    def _decide_one(self, client: Client, head: RequestHead, target: Target, host: str | IPAddress) -> Match:
        request = EgressRequest(sandbox=client.sandbox, method=head.method, host=str(host), port=target.port,
                                path=target.path)
        try:
            verdict = self._decide(request, client.allowlist.entries)
        except Exception as exc:  # a broken rule refuses (fail closed)
            log.error("egress decision hook raised %s", type(exc).__name__)
            raise Refusal(403, "decision_error", "A decision rule failed; the request is refused.") from None
        if verdict is not None:
            if not verdict.allowed:
                raise Refusal(403, "plugin", f"Refused by policy: {verdict.reason}", verdict.reason)
            return Match(True, "plugin")
        match = client.allowlist.match(host, target.port)
        if not match.allowed:
            messages = {
                "host_not_allowed": f"{host} is not in this sandbox's egress allowlist.",
                "port_not_allowed": f"Port {target.port} of {host} is not in this sandbox's egress allowlist.",
                "ip_literal_not_allowed": f"The IP address {host} is not in this sandbox's egress allowlist.",
            }
            raise Refusal(403, match.reason, messages[match.reason])
        return match

    async def _connect(self, policy: _Policy, host: str | IPAddress, port: int, ctx: dict[str, Any]) -> Any:
        if isinstance(host, str):
            try:
                addresses = await policy.resolver.resolve(host, port)
            except ResolveError as exc:
                raise Refusal(502, "resolve_failed", f"{host} does not resolve.", str(exc)) from None
        else:
            addresses = [host]
        for addr in addresses:  # one refused address refuses the name: no mixed answers
            why = address_refusal(addr, policy.allowed_nets)
            if why:
                ctx["address"] = str(addr)
                raise Refusal(403, "private_address", f"{host} resolves to a {why}; refused.")
        last = "connect_failed"
        for addr in addresses:
            ctx["address"] = str(addr)
            with anyio.move_on_after(policy.cfg.connect_timeout_s):
                try:
                    return await open_connection(str(addr), port)  # the address we checked, no new lookup
                except OSError:
                    continue
            last = "connect_timeout"
        raise Refusal(502 if last == "connect_failed" else 504, last, f"Could not connect to {host}:{port}.")

    async def _tunnel(self, conn: Conn, reader: Reader, upstream: Conn, policy: _Policy,
                      host: str | IPAddress, match: Match, ctx: dict[str, Any]) -> None:
        await conn.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
        raw_ok = match.rule is not None and match.rule.port is not None and match.rule.port != 443
        first, why = await self._client_hello(reader, policy, host, raw_ok)
        if why:
            self._log(ctx, "deny", why)
            return  # already said 200: closing the tunnel is the refusal
        self._log(ctx, "allow", match.reason)
        self.metrics.tunnels.inc()
        try:
            activity = Activity(policy.cfg.idle_timeout_s)
            if first:
                await upstream.send(first, activity)
                self.metrics.upload.inc(len(first))
            async with anyio.create_task_group() as tg:
                async def both_ways(src: Conn, dst: Conn, counter: Any) -> None:
                    try:
                        await pump(src, dst, activity, counter)
                    except (IdleTimeout, OSError):
                        tg.cancel_scope.cancel()  # idle or reset: the whole tunnel ends

                tg.start_soon(both_ways, conn, upstream, self.metrics.upload)
                await both_ways(upstream, conn, self.metrics.download)
        finally:
            self.metrics.tunnels.dec()

    async def _client_hello(self, reader: Reader, policy: _Policy, host: str | IPAddress,
                            raw_ok: bool) -> tuple[bytes, str]:
        """(bytes read, refusal reason or ""). Reads the first flight and checks its SNI."""
        if raw_ok and not reader.buffer:
            with anyio.move_on_after(SERVER_FIRST_WAIT_S):
                await reader.fill()
            if not reader.buffer:
                return b"", ""  # a server-speaks-first protocol on an explicitly listed port
        with anyio.move_on_after(policy.head_timeout) as scope:
            while True:
                try:
                    message, complete = _tls.handshake_bytes(reader.buffer)
                except _tls.HelloError:
                    return (reader.take_all(), "") if raw_ok else (b"", "not_tls")
                if complete:
                    break
                if len(reader.buffer) > _tls.MAX_HELLO:
                    return b"", "malformed_hello"
                await reader.fill()
        if scope.cancelled_caught:
            return b"", "hello_timeout"
        try:
            hello = _tls.parse_client_hello(message)
        except _tls.HelloError as exc:
            return b"", str(exc)
        if hello.ech:
            return b"", "ech_not_allowed"
        if hello.server_name is None:
            return (reader.take_all(), "") if not isinstance(host, str) else (b"", "sni_missing")
        if hello.server_name != str(host):
            return b"", "sni_mismatch"
        return reader.take_all(), ""

    async def _forward(self, conn: Conn, reader: Reader, upstream: Conn, head: RequestHead, target: Target,
                       framing: tuple[str, int], policy: _Policy, match: Match, ctx: dict[str, Any]) -> None:
        host = ctx["host"]
        authority = f"[{host}]" if ":" in host else host
        if target.port != 80:
            authority += f":{target.port}"
        self._log(ctx, "allow", match.reason)
        activity = Activity(policy.cfg.idle_timeout_s)
        await upstream.send(upstream_head(head, target, authority), activity)
        if framing[0] == "none":
            await pump(upstream, conn, activity, self.metrics.download, eof=False)
            return
        async with anyio.create_task_group() as tg:
            async def upload() -> None:
                try:
                    await relay_body(reader, upstream, framing, activity, self.metrics.upload)
                except (BadRequest, IdleTimeout, anyio.EndOfStream, OSError):
                    tg.cancel_scope.cancel()  # a broken body: drop the exchange, never guess

            tg.start_soon(upload)
            await pump(upstream, conn, activity, self.metrics.download, eof=False)
            tg.cancel_scope.cancel()

    # -- answers and the decision log ----------------------------------------------------
    async def _refuse(self, conn: Conn, ctx: dict[str, Any], refusal: Refusal) -> None:
        self._log(ctx, "deny", refusal.reason, refusal.detail)
        with anyio.move_on_after(1):
            try:
                await conn.send(answer(refusal.status, refusal.reason, refusal.message))
            except OSError:
                pass

    def _log(self, ctx: dict[str, Any], verdict: str, reason: str, detail: str = "") -> None:
        self.metrics.decisions.labels(verdict=verdict, reason=reason).inc()
        log.info(
            "egress %s reason=%s sandbox=%s peer=%s method=%s host=%s port=%s address=%s%s",
            verdict, reason, ctx.get("sandbox", "-"), ctx.get("peer", "-"), ctx.get("method", "-"),
            ctx.get("host", "-"), ctx.get("port", "-"), ctx.get("address", "-"),
            f" detail={detail!r}" if detail else "",
        )


__all__ = ["Client", "EgressProxy", "address_refusal"]
