"""The credential broker inside the egress proxy: terminated HTTP/1.1 for credentialed hosts.

A CONNECT to a host some ``egress.credentials`` entry names is not tunnelled: after the
proxy's usual checks (credential, allowlist, address, SNI) the broker answers the worker's
TLS with a leaf of that sandbox's own CA, opens verified TLS to the address the proxy
checked (ALPN ``http/1.1``), and relays HTTP/1.1 exchanges parsed by h11 (keep-alive,
chunked bodies, streamed responses: each piece is sent on as it arrives). In each request a
placeholder is replaced by the formatted real secret, read from the secret store per
request, only when sandbox, host, port, method, path and header all match an entry; any
other placeholder use is refused with 403 ``credential_not_allowed`` and nothing of that
request goes upstream. A plain-HTTP request carrying a placeholder is refused the same way.

``egress.rules`` apply to each request here (method and path are visible): a matching ``deny``
rule refuses it (403 ``rule_deny``); an ``allow`` rule grants nothing beyond what admitted the
connection and what the credential entries allow. Every decision is one line of the proxy's
decision audit (``_audit``): the connection once its handshakes are done, then each request
(forwarded: when its response has ended, with body bytes and duration; refused: at once).
Records carry the credential's name, never a value or a placeholder, and the path without its
query string.
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import TYPE_CHECKING, Any, Awaitable, Callable
from urllib.parse import unquote

import anyio
import attrs
import h11
from prometheus_client import Counter

from ._audit import Decision
from ._credentials import PLACEHOLDER, Credential, host_of, mentions_placeholder, new_placeholder
from ._http import MAX_HEAD
from ._refusals import refusal_text
from ._relay import Activity, Conn, IdleTimeout, Reader, open_connection
from ._rules import rule_path
from ._sandbox_ca import SandboxCA

if TYPE_CHECKING:
    from risoluto.kernel import Kernel

    from ._hosts import IPAddress

log = logging.getLogger("risoluto.egress")

# Never relayed in either direction: they describe one hop, or would switch protocols.
_HOP = {b"connection", b"keep-alive", b"proxy-authorization", b"proxy-authenticate", b"proxy-connection",
        b"te", b"trailer", b"upgrade", b"expect"}


TLS_READ = 256 * 1024  # ciphertext read per call: fewer trips through the event loop on big bodies
RECORD = 17 * 1024  # more than one TLS record's plaintext (16 KiB)
PASS_MIN = 1024 * 1024  # response bodies of known length from this size on bypass h11 (see _pass_body)


class SecretsLocked(Exception):
    """The secret store is locked (no master key): brokered requests answer 503."""


ReadSecret = Callable[[str], Awaitable["str | None"]]


class Refused(Exception):
    def __init__(self, status: int, reason: str, message: str, why: str = "", secret: str = "", rule: str = ""):
        super().__init__(reason)
        self.status, self.reason, self.message, self.why, self.secret = status, reason, message, why, secret
        self.rule = rule  # the egress.rules entry that refused (rules[<n>])


@attrs.define
class _Exchange:
    """One request inside a terminated connection, as its audit record will tell it."""

    method: str  # "" when it mentions a placeholder
    path: str  # no query string or fragment; "" when not origin-form or when it mentions a placeholder
    started: float
    rule: str = ""
    credential: str = ""  # names injected (comma-separated when several)
    up: Any = None  # Tally of request body bytes
    down: Any = None  # Tally of response body bytes

    @classmethod
    def of(cls, method: str, target: str, started: float) -> _Exchange:
        path = target.split("?", 1)[0].split("#", 1)[0]
        return cls(method="" if mentions_placeholder(method) else method[:32],
                   path=path if path.startswith("/") and not mentions_placeholder(path) else "", started=started)


@attrs.define
class SandboxState:
    """What the broker holds for one sandbox: its CA and its placeholders (secret name -> text)."""

    sandbox: str
    ca: SandboxCA
    placeholders: dict[str, str]


class BrokerMetrics:
    def __init__(self, registry: Any):
        self.requests = Counter("risoluto_egress_brokered_requests",
                                "Requests in terminated (credentialed) connections, by outcome",
                                ["outcome"], registry=registry)


def broker_metrics(kernel: Kernel) -> BrokerMetrics:
    metrics = kernel.state.get("egress.broker_metrics")
    if metrics is None:
        metrics = kernel.state["egress.broker_metrics"] = BrokerMetrics(kernel.metrics_registry)
    return metrics


def upstream_context(ca_file: str) -> ssl.SSLContext:
    """The host's trust store, plus ``egress.upstreamCaFile`` when set; HTTP/1.1 only."""
    ctx = ssl.create_default_context()
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class TLSConn:
    """TLS over a proxy :class:`Conn` through memory BIOs (bytes already read can be fed in)."""

    def __init__(self, conn: Conn, ctx: ssl.SSLContext, activity: Activity, *, server_side: bool,
                 hostname: str | None = None, first: bytes = b"", session: ssl.SSLSession | None = None):
        self.conn, self.activity = conn, activity
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        if first:
            self.incoming.write(first)
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=server_side, server_hostname=hostname,
                                session=session)
        self._buf = bytearray(TLS_READ)  # ciphertext lands here: no new buffer per read
        self._view = memoryview(self._buf)

    async def _flush(self) -> None:
        if self.outgoing.pending:
            await self.conn.send(self.outgoing.read(), self.activity)

    async def _feed(self) -> None:
        sock = self.conn.sock
        while True:
            try:
                n = sock.recv_into(self._buf)
                break
            except BlockingIOError:
                await self.conn.wait(True, self.activity)
        self.activity.touch()
        if n:
            self.incoming.write(self._view[:n])
        else:
            self.incoming.write_eof()

    async def handshake(self) -> None:
        """The handshake; its last flight (the client's Finished, the server's session tickets) stays
        buffered and leaves with the first request or response: one write fewer per connection."""
        while True:
            try:
                self.obj.do_handshake()
                return
            except ssl.SSLWantReadError:
                await self._flush()
                await self._feed()

    async def recv(self) -> list[bytes]:
        """Plaintext as soon as some is there (records, up to TLS_READ); [] at the end of the stream.
        Handed on as the records came (h11 copies them into its buffer anyway: no join here)."""
        parts: list[bytes] = []
        size = 0
        while size < TLS_READ:
            try:
                chunk = self.obj.read(RECORD)  # one TLS record at most; a larger size only costs allocation
            except ssl.SSLWantReadError:
                if parts:
                    break
                await self._feed()  # what TLS itself has to say (tickets, key updates) leaves with our next send
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
        return parts

    async def send(self, data: bytes) -> None:
        if data:
            self.obj.write(data)
            self.activity.touch()
        await self._flush()

    async def send_parts(self, parts: list[bytes]) -> None:
        """Several pieces in one flight, without joining them first."""
        for part in parts:
            self.obj.write(part)
        self.activity.touch()
        await self._flush()

    async def close(self) -> None:
        """Best effort close_notify; the socket itself is closed by the proxy."""
        with anyio.move_on_after(0.5):
            try:
                self.obj.unwrap()
            except (ssl.SSLError, ValueError):
                pass
            try:
                await self._flush()
            except OSError:
                pass


class Broker:
    def __init__(self, credentials: tuple[Credential, ...], read_secret: ReadSecret, upstream_ca_file: str,
                 metrics: BrokerMetrics):
        self.credentials = credentials
        self.read_secret = read_secret
        self.upstream = upstream_context(upstream_ca_file)
        self.metrics = metrics
        self._sandboxes: dict[str, SandboxState] = {}
        self._owners: dict[str, tuple[str, str]] = {}  # placeholder -> (sandbox, secret name)
        self._sessions: dict[tuple[str, int, str], ssl.SSLSession] = {}  # (host, port, address) -> origin session

    # -- sandboxes ------------------------------------------------------------------------
    def prepare(self, sandbox: str, names: set[str], life_s: float) -> SandboxState:
        """A CA and placeholders for a launch (registered only once its container exists)."""
        return SandboxState(sandbox=sandbox, ca=SandboxCA(sandbox, life_s),
                            placeholders={name: new_placeholder(name) for name in sorted(names)})

    def register(self, state: SandboxState) -> None:
        self._sandboxes[state.sandbox] = state
        for name, text in state.placeholders.items():
            self._owners[text] = (state.sandbox, name)

    def unregister(self, sandbox: str) -> None:
        state = self._sandboxes.pop(sandbox, None)
        if state is not None:
            for text in state.placeholders.values():
                self._owners.pop(text, None)

    def brokered(self) -> frozenset[str]:
        return frozenset(c.secret for c in self.credentials)

    def credentialed(self, host: str | IPAddress, port: int) -> bool:
        return any(c.covers_host(host, port) for c in self.credentials)

    # -- the proxy's hand-off -------------------------------------------------------------
    def plain_refusal(self, head: Any, ctx: dict[str, Any]) -> Any:
        """The refusal of a plain-HTTP request that carries a credential placeholder, else None
        (placeholders are replaced only inside TLS the proxy terminates)."""
        if not (any(mentions_placeholder(v) for _, v in head.headers) or mentions_placeholder(head.target)):
            return None
        refusal = Refused(403, "credential_not_allowed",
                          "A credential placeholder may be used only over HTTPS to the host it is bound to.",
                          "plain_http")
        self.metrics.requests.labels(outcome=refusal.reason).inc()
        # the proxy's audit line: no query string, no placeholder, the names it carried
        path = str(ctx.get("path", "")).split("?", 1)[0]
        ctx["path"] = "" if mentions_placeholder(path) else path
        ctx["credential"] = self._names([v for _, v in head.headers] + [head.target])
        return _proxy_refusal(refusal)

    async def takes(self, proxy: Any, conn: Conn, reader: Reader, upstream: Conn,
                    host: str | IPAddress, port: int, client: Any, ctx: dict[str, Any]) -> None:
        """Serve a CONNECT to a credentialed host: terminate its TLS and inject credentials."""
        state = self._sandboxes.get(client.username)
        if state is None:  # cannot happen for a sandbox launched by this kernel: fail closed
            from ._proxy import Refusal

            await proxy._refuse(conn, ctx, Refusal(503, "broker_unavailable", "This sandbox has no broker state."))
            return
        await self._terminate(proxy, conn, reader, upstream, host, port, state, ctx)

    async def _terminate(self, proxy: Any, conn: Conn, reader: Reader, upstream: Conn, host: str | IPAddress,
                         port: int, state: SandboxState, ctx: dict[str, Any]) -> None:
        policy = proxy.policy()
        await conn.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
        first, why = await proxy._client_hello(reader, policy, host, False, ctx)
        if why:
            proxy._log(ctx, "deny", why)
            return
        proxy.metrics.tunnels.inc()
        activity = Activity(policy.cfg.idle_timeout_s)
        for sock in (conn.sock, upstream.sock):  # writes are whole flights: never wait for an ACK (Nagle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        down = TLSConn(conn, state.ca.context(str(host)), activity, server_side=True, first=first)
        key = (str(host), port, upstream.sock.getpeername()[0])
        up = TLSConn(upstream, self.upstream, activity, server_side=False, hostname=str(host),
                     session=self._sessions.get(key))
        origin = _Origin(tls=up, http=h11.Connection(h11.CLIENT), key=key)
        try:
            failed = await _handshakes(down, up, state.sandbox, str(host))
            if not failed and not _http11(up, host):
                failed = "origin"
            if failed:  # the connection's own line: refused by a handshake (the log line says why)
                proxy._log(ctx, "deny", f"{failed}_tls_failed")
                return
            proxy._log(ctx, "allow", "credential_host")  # admitted; each request gets its own line
            await self._exchanges(proxy, down, origin, host, port, state, ctx)
            await down.close()
        except (h11.ProtocolError, ssl.SSLError, IdleTimeout, anyio.EndOfStream, OSError):
            pass  # one side broke the protocol or went away: the connection ends
        finally:
            proxy.metrics.tunnels.dec()
            self._keep_session(key, origin.tls)
            for extra in origin.opened:
                extra.close()

    async def _reopen(self, origin: _Origin, host: str | IPAddress, port: int, timeout: float) -> None:
        """A new connection to the origin when the previous one cannot carry another request (it
        said close, closed while idle, or sent something unasked): to the same checked address,
        no new lookup; TLS resumed when the origin allows it."""
        self._keep_session(origin.key, origin.tls)
        with anyio.fail_after(timeout):
            conn = await open_connection(origin.key[2], port)
        origin.opened.append(conn)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = TLSConn(conn, self.upstream, origin.tls.activity, server_side=False, hostname=str(host),
                      session=self._sessions.get(origin.key))
        await tls.handshake()
        if not _http11(tls, host):
            raise ssl.SSLError("the origin does not speak http/1.1")
        origin.tls, origin.http, origin.stale = tls, h11.Connection(h11.CLIENT), False

    def _keep_session(self, key: tuple[str, int, str], up: TLSConn) -> None:
        """Resume TLS with the origin next time (its ticket arrives after the handshake): a new
        terminated connection then costs one full handshake (the worker's), not two."""
        try:
            session = up.obj.session
        except (ValueError, ssl.SSLError):
            return
        if session is not None and session.has_ticket:
            if len(self._sessions) >= 1024 and key not in self._sessions:
                self._sessions.pop(next(iter(self._sessions)))
            self._sessions[key] = session

    async def _exchanges(self, proxy: Any, down: TLSConn, origin: _Origin, host: str | IPAddress, port: int,
                         state: SandboxState, ctx: dict[str, Any]) -> None:
        from ._proxy import Tally

        server = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        while True:
            try:
                request = await _next(server, down)
            except h11.RemoteProtocolError:
                self._record(proxy, ctx, _Exchange("", "", anyio.current_time()), "deny", "malformed_request", rule="")
                await _answer(server, down, 400, "malformed_request", "Malformed HTTP/1.1 request.")
                return
            if not isinstance(request, h11.Request):
                return  # the worker closed the connection
            ex = _Exchange.of(request.method.decode("ascii", "replace"), request.target.decode("latin-1"),
                              anyio.current_time())
            try:
                ex.rule = self._rule(proxy.policy().rules, request, host, port)
                headers, ex.credential = await self._outgoing(request, host, port, state)
            except Refused as refusal:
                self._refused(proxy, ctx, refusal, ex)
                await _answer(server, down, refusal.status, refusal.reason, refusal.message)
                return
            if not _reusable(origin):
                try:
                    await self._reopen(origin, host, port, proxy.policy().cfg.connect_timeout_s)
                except (ssl.SSLError, IdleTimeout, anyio.EndOfStream, OSError):
                    self._record(proxy, ctx, ex, "deny", "upstream_unavailable", rule="")
                    await _answer(server, down, 502, "upstream_unavailable", "The origin could not be reached again.")
                    return
            ex.up, ex.down = Tally(proxy.metrics.upload), Tally(proxy.metrics.download)
            try:
                after = await self._exchange(server, down, origin, request, headers, ex)
            finally:  # forwarded: one line when its response ended (or broke off), with its bytes
                self._record(proxy, ctx, ex, "allow", "credential_injected" if ex.credential else "forwarded")
            if after is None:
                return
            server = after

    async def _exchange(self, server: h11.Connection, down: TLSConn, origin: _Origin, request: h11.Request,
                        headers: list[tuple[bytes, bytes]], ex: _Exchange) -> h11.Connection | None:
        """Relay one admitted request and its response. Returns the parser for the worker's next
        request, or None when the connection ends after this one."""
        if server.they_are_waiting_for_100_continue:
            await down.send(server.send(h11.InformationalResponse(status_code=100, headers=[])))
        client, up = origin.http, origin.tls
        head = client.send(h11.Request(method=request.method, target=request.target, headers=headers))
        if not await _relay_body(server, down, client, up, head, ex.up):
            return None
        outcome = await self._relay_response(client, up, server, down, request.method, ex.down)
        if outcome == "closed":
            return None
        if outcome == "passed":  # h11 did not see the body: carry on with fresh parsers, same rules
            if _closes(request.http_version, request.headers):
                return None
            origin.http = h11.Connection(h11.CLIENT)
            return _fresh_server(server)
        if server.our_state is not h11.DONE:
            return None  # the worker asked to close (Connection: close, HTTP/1.0)
        server.start_next_cycle()
        if client.our_state is h11.DONE and client.their_state is h11.DONE:
            client.start_next_cycle()
        else:
            origin.stale = True  # the origin closes this one: the next request opens another
        return server

    async def _outgoing(self, request: h11.Request, host: str | IPAddress, port: int,
                        state: SandboxState) -> tuple[list[tuple[bytes, bytes]], str]:
        """The request's headers as sent upstream (hop-by-hop ones gone, a matching placeholder
        replaced by the real value) and the names injected. Refused: every other use of a placeholder."""
        method = request.method.decode("ascii")
        target = request.target.decode("latin-1")
        if mentions_placeholder(target):
            raise Refused(403, "credential_not_allowed", "A credential placeholder may not be used in the URL.",
                          "in_url", self._names([target]))
        if mentions_placeholder(method):
            raise Refused(403, "credential_not_allowed", "A credential placeholder may not be used as the method.",
                          "in_method", self._names([method]))
        if method == "CONNECT":
            raise Refused(405, "method_not_allowed", "CONNECT inside a terminated connection is not supported.")
        path = target.split("?", 1)[0] if target.startswith("/") else ""
        marked = any(mentions_placeholder(v.decode("latin-1")) for _, v in request.headers)
        if marked:
            hosts = [host_of(v.decode("latin-1")) for k, v in request.headers if k == b"host"]
            # the name must be the CONNECT host (no other virtual host); a port, when written, its port
            if len(hosts) != 1 or hosts[0] is None or hosts[0][0] != host or hosts[0][1] not in (None, port):
                raise Refused(403, "credential_not_allowed", "The Host header does not name the host the "
                              "credential is bound to.", "host_header",
                              self._names([v.decode("latin-1") for _, v in request.headers]))
        out: list[tuple[bytes, bytes]] = []
        injected: list[str] = []
        for name, value in request.headers:
            if marked and mentions_placeholder(value.decode("latin-1")):
                secret, value = await self._inject(name.decode("ascii"), value.decode("latin-1"), host, port, method,
                                                   path, state)
                injected.append(secret)
            if name not in _HOP:
                out.append((name, value))
        self.metrics.requests.labels(outcome="injected" if marked else "passed").inc()
        return out, ",".join(dict.fromkeys(injected))

    async def _inject(self, header: str, text: str, host: str | IPAddress, port: int, method: str, path: str,
                      state: SandboxState) -> tuple[str, bytes]:
        """(the secret's name, the header value with the real secret); Refused otherwise."""
        found = list(PLACEHOLDER.finditer(text))
        if len(found) != 1:
            raise Refused(403, "credential_not_allowed", "Unknown credential placeholder.", "unknown")
        placeholder, name = found[0].group(0), found[0].group(1)
        owner = self._owners.get(placeholder)
        if owner is None:
            raise Refused(403, "credential_not_allowed", "This placeholder belongs to no running sandbox.",
                          "unknown_or_ended", name)
        if owner[0] != state.sandbox:
            raise Refused(403, "credential_not_allowed", "This placeholder belongs to another sandbox.",
                          "other_sandbox", name)
        entries = [c for c in self.credentials if c.secret == name]
        if not any(c.header == header for c in entries):
            raise Refused(403, "credential_not_allowed", f"The placeholder for {name} may not be sent in {header}.",
                          "header", name)
        entry = next((c for c in entries if c.header == header and c.allows(host, port, method, path)), None)
        if entry is None:
            raise Refused(403, "credential_not_allowed",
                          f"The credential {name} is not allowed for {method} to this host and path.",
                          "host_method_or_path", name)
        try:
            value = await self.read_secret(name)
        except SecretsLocked:
            raise Refused(503, "secrets_locked", "The secret store is locked; brokered credentials are "
                          "unavailable.", "locked", name) from None
        except Exception as exc:  # noqa: BLE001 - a store failure (integrity, I/O): fail closed, say which
            log.error("egress broker: reading secret %s failed: %s", name, type(exc).__name__)
            raise Refused(503, "credential_unavailable", f"The secret {name} could not be read.", "store_error",
                          name) from None
        if value is None or any(c in value for c in "\r\n\x00"):
            raise Refused(503, "credential_unavailable", f"The secret {name} is missing or not a header value.",
                          "missing", name)
        return name, entry.render(value).encode("latin-1", "replace")

    async def _relay_response(self, client: h11.Connection, up: TLSConn, server: h11.Connection, down: TLSConn,
                              method: bytes, counter: Any) -> str:
        """Everything the origin sent so far goes on in one write (a head and a short body in one
        TLS flight); then wait for more. Nothing waits for a whole body: an event stream flows.

        Returns "done", "closed" (the exchange broke off) or "passed": a large body of known length
        was moved without h11 (see :meth:`_pass_body`); both h11 objects are then out of step.
        """
        out: list[bytes] = []
        while True:
            try:
                event = client.next_event()
            except h11.RemoteProtocolError:
                self.metrics.requests.labels(outcome="bad_gateway").inc()
                await down.send(b"".join(out))
                if server.our_state is h11.SEND_RESPONSE:
                    await _answer(server, down, 502, "upstream_protocol_error", "The origin broke HTTP/1.1.")
                return "closed"
            if event is h11.NEED_DATA:
                await down.send(b"".join(out))
                out.clear()
                await _pull(client, up)
            elif isinstance(event, h11.InformationalResponse):
                if event.status_code != 101:
                    out.append(server.send(h11.InformationalResponse(
                        status_code=event.status_code, headers=_strip(event.headers), reason=event.reason)))
            elif isinstance(event, h11.Response):
                out.append(server.send(h11.Response(status_code=event.status_code, headers=_strip(event.headers),
                                                    reason=event.reason)))
                length = _fixed_length(event, method)
                if length is not None and length >= PASS_MIN:
                    return await self._pass_body(client, up, server, down, length, out, counter)
            elif isinstance(event, h11.Data):
                counter.inc(len(event.data))
                out.append(server.send(h11.Data(data=event.data)))
            elif isinstance(event, h11.EndOfMessage):
                out.append(server.send(h11.EndOfMessage(headers=_strip(event.headers))))
                await down.send(b"".join(out))
                return "done"
            else:
                await down.send(b"".join(out))
                return "closed"

    async def _pass_body(self, client: h11.Connection, up: TLSConn, server: h11.Connection, down: TLSConn,
                         length: int, out: list[bytes], counter: Any) -> str:
        """A body of ``length`` bytes (Content-Length, identity) goes on as it arrives, without h11:
        re-parsing megabytes only to count them costs more than the two TLS layers. What h11 holds
        already goes first; then exactly ``length`` bytes. Anything after them is a broken origin."""
        left = length
        while left:
            event = client.next_event()
            if not isinstance(event, h11.Data):
                break  # NEED_DATA: h11 holds nothing more of the body
            counter.inc(len(event.data))
            out.append(server.send(h11.Data(data=event.data)))
            left -= len(event.data)
        await down.send(b"".join(out))
        if not left and (not isinstance(client.next_event(), h11.EndOfMessage) or client.trailing_data[0]):
            return "closed"  # bytes after the announced body: a broken origin
        while left:
            parts = await up.recv()
            if not parts:
                return "closed"  # the origin ended mid-body: the worker sees the connection end
            size = sum(len(p) for p in parts)
            if size > left:
                return "closed"  # more than announced: never relay it, and never reuse this connection
            counter.inc(size)
            await down.send_parts(parts)
            left -= size
        return "passed"

    # -- rules and the decision audit -----------------------------------------------------
    def _rule(self, rules: Any, request: h11.Request, host: str | IPAddress, port: int) -> str:
        """``egress.rules`` for one request: the name of the allow rule that matched (it grants nothing
        more than the connection and the credential entries already allow), "" when none did;
        Refused by a deny rule. When a rule names this host, the path must mean what it says: it is
        compared percent-decoded, and one with dot segments or backslashes is refused (an origin
        could resolve it to a path the rules did not see)."""
        if not rules.covers(host, port):
            return ""
        method = request.method.decode("ascii", "replace")
        raw = request.target.decode("latin-1").split("?", 1)[0].split("#", 1)[0]
        path = rule_path(raw)
        shown = raw[:200] if raw.startswith("/") and not mentions_placeholder(raw) else "this path"
        if path is None:
            raise Refused(403, "path_not_plain", refusal_text("path_not_plain", str(host), port, method, shown))
        rule = rules.http_rule(host, port, method, path)
        if rule is None:
            return ""
        if rule.verdict == "deny":
            raise Refused(403, "rule_deny", refusal_text("rule_deny", str(host), port, method, shown), rule=rule.name)
        return rule.name

    def _names(self, texts: list[str]) -> str:
        """The brokered secrets whose placeholders ``texts`` carry (names only; an invented name,
        one no entry brokers, is left out)."""
        brokered = self.brokered()
        found = (m.group(1) for t in texts for m in PLACEHOLDER.finditer(unquote(t)))
        return ",".join(dict.fromkeys(n for n in found if n in brokered))

    def _record(self, proxy: Any, ctx: dict[str, Any], ex: _Exchange, verdict: str, reason: str,
                credential: str = "", rule: str | None = None) -> None:
        """One line of the proxy's decision audit for one request of a terminated connection.
        ``rule`` None: what admitted it (an allow rule, else the connection's allowlist entry)."""
        if rule is None:
            rule = ex.rule or ctx.get("rule", "")
        proxy.audit.record(Decision(
            verdict=verdict, reason=reason, sandbox=ctx.get("sandbox", ""), issue=ctx.get("issue", ""),
            host=ctx.get("host", ""), port=ctx.get("port", 0), sni=ctx.get("sni", ""), method=ex.method,
            path=ex.path, rule=rule, credential=credential or ex.credential,
            bytes_up=ex.up.n if ex.up else 0, bytes_down=ex.down.n if ex.down else 0,
            duration_ms=int((anyio.current_time() - ex.started) * 1000)))

    def _refused(self, proxy: Any, ctx: dict[str, Any], refusal: Refused, ex: _Exchange) -> None:
        """A refused request: its audit line (the source of truth), a metric and a log line (with
        ``why``, which the audit schema has no field for). Names only, never values or placeholders."""
        secret = refusal.secret if refusal.secret in self.brokered() else ""
        self._record(proxy, ctx, ex, "deny", refusal.reason, credential=secret, rule=refusal.rule)
        self.metrics.requests.labels(outcome=refusal.reason).inc()
        log.info("egress broker deny reason=%s why=%s sandbox=%s method=%s host=%s port=%s secret=%s",
                 refusal.reason, refusal.why or "-", ctx.get("sandbox", "-"), ex.method or "-", ctx.get("host", "-"),
                 ctx.get("port", "-"), secret or "-")


def _closes(version: bytes, headers: Any) -> bool:
    """Whether a message ends its connection (HTTP/1.0, or ``Connection: close``)."""
    tokens = {t.strip().lower() for k, v in headers if k == b"connection" for t in v.split(b",")}
    return version == b"1.0" or b"close" in tokens


def _fixed_length(response: h11.Response, method: bytes) -> int | None:
    """The body length of a keep-alive response framed by Content-Length alone, else None."""
    if method == b"HEAD" or response.status_code in (204, 304) or _closes(response.http_version, response.headers):
        return None
    if any(k == b"transfer-encoding" for k, _ in response.headers):
        return None
    lengths = [v for k, v in response.headers if k == b"content-length"]
    return int(lengths[0]) if len(lengths) == 1 else None  # h11 has checked it is a number


def _fresh_server(old: h11.Connection) -> h11.Connection:
    """A new parser for the worker's side, fed what the old one had received but not parsed."""
    data, closed = old.trailing_data
    new = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    if data:
        new.receive_data(data)
    if closed:
        new.receive_data(b"")
    return new


@attrs.define
class _Origin:
    """The origin side of one terminated connection (replaced when the origin closes it)."""

    tls: TLSConn
    http: h11.Connection
    key: tuple[str, int, str]  # (host, port, the address the proxy checked)
    stale: bool = False
    opened: list[Conn] = attrs.field(factory=list)  # connections made here, closed here


def _http11(tls: TLSConn, host: Any) -> bool:
    alpn = tls.obj.selected_alpn_protocol()
    if alpn not in (None, "http/1.1"):
        log.info("egress broker: %s chose ALPN %s, not http/1.1", host, alpn)
        return False
    return True


def _reusable(origin: _Origin) -> bool:
    """Whether the origin connection can take another request: it did not say close, and nothing
    arrived while it was idle except TLS housekeeping (a session ticket); a close_notify, stray data
    or the end of the stream mean it is going away."""
    if origin.stale:
        return False
    tls = origin.tls
    while True:
        try:
            data = tls.conn.sock.recv(TLS_READ, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        except OSError:
            return False
        if not data:
            return False
        tls.incoming.write(data)
    if not tls.incoming.pending:
        return True
    try:
        return not tls.obj.read(RECORD)  # plaintext nobody asked for: not reusable
    except ssl.SSLWantReadError:
        return True  # only housekeeping records
    except ssl.SSLError:
        return False


async def _handshakes(down: TLSConn, up: TLSConn, sandbox: str, host: str) -> str:
    """Both TLS handshakes at once (the origin's is under way while the worker's completes);
    "" when both succeeded, else the side that failed first ("worker" or "origin")."""
    failed: list[str] = []

    async def shake(tls: TLSConn, side: str, scope: anyio.CancelScope) -> None:
        try:
            await tls.handshake()
        except (ssl.SSLError, IdleTimeout, anyio.EndOfStream, OSError) as exc:
            failed.append(f"{side}: {getattr(exc, 'reason', None) or type(exc).__name__}")
            scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(shake, up, "origin", tg.cancel_scope)
        await shake(down, "worker", tg.cancel_scope)
    if failed:
        log.info("egress broker: TLS handshake failed sandbox=%s host=%s %s", sandbox, host, failed[0])
        return failed[0].split(":", 1)[0]
    return ""


def _proxy_refusal(refusal: Refused) -> Any:
    from ._proxy import Refusal

    return Refusal(refusal.status, refusal.reason, refusal.message)


def _strip(headers: Any) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if k not in _HOP]


async def _pull(conn: h11.Connection, tls: TLSConn) -> None:
    """What ``tls`` has now into ``conn``; the end of the stream when it ended."""
    parts = await tls.recv()
    for part in parts:
        conn.receive_data(part)
    if not parts:
        conn.receive_data(b"")


async def _next(conn: h11.Connection, tls: TLSConn) -> Any:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            await _pull(conn, tls)
            continue
        return event


async def _relay_body(server: h11.Connection, down: TLSConn, client: h11.Connection, up: TLSConn, head: bytes,
                      counter: Any) -> bool:
    """The request head, then its body as it arrives, each flight in one write; request trailers are
    dropped (they could carry a placeholder)."""
    out = [head]
    while True:
        try:
            event = server.next_event()
        except h11.RemoteProtocolError:
            return False
        if event is h11.NEED_DATA:
            await up.send(b"".join(out))
            out.clear()
            await _pull(server, down)
        elif isinstance(event, h11.Data):
            counter.inc(len(event.data))
            out.append(client.send(h11.Data(data=event.data)))
        elif isinstance(event, h11.EndOfMessage):
            out.append(client.send(h11.EndOfMessage()))
            await up.send(b"".join(out))
            return True
        else:
            return False


async def _answer(server: h11.Connection, down: TLSConn, status: int, reason: str, message: str) -> None:
    """The broker's own answer inside a terminated connection; the connection closes after it."""
    if server.our_state is not h11.SEND_RESPONSE:
        return
    body = f"{message}\n".encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
               (b"x-risoluto-egress", reason.encode()), (b"connection", b"close")]
    try:
        await down.send(server.send(h11.Response(status_code=status, headers=headers)))
        await down.send(server.send(h11.Data(data=body)))
        await down.send(server.send(h11.EndOfMessage()))
    except (h11.LocalProtocolError, OSError):
        pass
