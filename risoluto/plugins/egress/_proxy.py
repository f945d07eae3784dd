"""The egress forward proxy (anyio): CONNECT tunnels and absolute-URI plain HTTP.

One connection = one request. For each it: bounds the head (size, slow-loris deadline),
checks the sandbox credential (Basic, in ``Proxy-Authorization``; only from that sandbox's
own address), normalises the host, asks the decision hook then the sandbox's allowlist,
resolves the name itself, refuses non-public addresses (unless in
``egress.allowPrivateNetworks``), connects to exactly the address it checked, and for a
CONNECT tunnel reads the TLS ClientHello and requires its SNI to name the CONNECT host.
Every decision is one log line on ``risoluto.egress``, one metric increment and one line of
the decision audit (``_audit``); an allowed exchange is audited when it ends, with its byte
counts. The deny list and HTTP rules (``_rules``) come first; an unlisted host under
``egress.onUnlisted: ask`` is held while an approval waits (``_approvals``).
"""

from __future__ import annotations

import binascii
import hmac
import ipaddress
import logging
import socket
import threading
import time
from typing import Any, Awaitable, Callable

import anyio
import attrs
from anyio.abc import TaskStatus

from risoluto.hookspecs.egress import EgressRequest, EgressVerdict
from risoluto.settings import EgressConfig

from . import _tls
from ._approvals import Approvals, IssueHosts, issue_entry
from ._audit import Decision, EgressAudit
from ._broker import Broker
from ._dns import Resolver, ResolveError
from ._http import MAX_HEAD, BadRequest, RequestHead, Target, answer, body_framing, parse_head, parse_target
from ._http import upstream_head
from ._metrics import EgressMetrics
from ._refusals import refusal_text
from ._relay import Activity, Conn, IdleTimeout, Reader, connect_sync, relay_body_sync, relay_sync, tunnel_sync
from ._hosts import Allowlist, HostError, IPAddress, Match, normalise_host, parse_entry
from ._judged import Judged, JudgedHeads
from ._rules import EgressRules, rule_path
from ._threads import ConnectionThreads

log = logging.getLogger("risoluto.egress")

METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
HEADER_TIMEOUT_S = 10.0  # whole request head / ClientHello; capped by egress.idleTimeoutS
SERVER_FIRST_WAIT_S = 0.5  # raw (non-TLS) tunnels: how long to wait for a client-first byte
SPARE_THREADS = 8  # connection threads kept waiting in accept(2) (see _threads)
Decide = Callable[[EgressRequest, tuple[str, ...]], "EgressVerdict | None"]
ASKABLE = frozenset({"host_not_allowed", "port_not_allowed", "ip_literal_not_allowed"})


@attrs.define(kw_only=True)
class Client:
    """One sandbox's credential and allowlist. ``addresses`` limits where it may be used from;
    when None, ``locate`` is awaited once to learn them (the container's address)."""

    username: str
    secret: bytes = attrs.field(repr=False)
    allowlist: Allowlist
    sandbox: str
    issue: str = ""
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


class Tally:
    """Bytes of one exchange in one direction, also added to the proxy-wide counter."""

    def __init__(self, counter: Any):
        self.counter = counter
        self.n = 0

    def inc(self, n: int) -> None:
        self.n += n
        self.counter.inc(n)


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


async def _client_left(conn: Conn) -> None:
    """Return once the client closed its side (a held request nobody waits for any more)."""
    while True:
        await conn.wait(True)
        try:
            data = conn.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            continue
        except OSError:
            return
        if not data:
            return
        await anyio.sleep_forever()  # it sent more bytes: still there; the answer or timeout decides


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass  # already closed by the peer


def _upload(reader: Reader, upstream: Conn, framing: tuple[str, int], activity: Activity, counter: Tally) -> None:
    """A plain request's body, on its own thread while the answer comes down."""
    try:
        relay_body_sync(reader, upstream, framing, activity, counter)
    except (BadRequest, IdleTimeout, anyio.EndOfStream, OSError):
        _shutdown(upstream.sock, socket.SHUT_RDWR)  # a broken body: drop the exchange, never guess


def _judge_hello(reader: Reader, host: str | IPAddress, raw_ok: bool,
                 ctx: dict[str, Any]) -> tuple[bytes, str] | None:
    """The tunnel's first flight so far: None when more is needed, else (bytes to pass on,
    refusal reason or "")."""
    try:
        message, complete = _tls.handshake_bytes(reader.buffer)
    except _tls.HelloError:
        return (reader.take_all(), "") if raw_ok else (b"", "not_tls")
    if not complete:
        return (b"", "malformed_hello") if len(reader.buffer) > _tls.MAX_HELLO else None
    try:
        hello = _tls.parse_client_hello(message)
    except _tls.HelloError as exc:
        return b"", str(exc)
    ctx["sni"] = hello.server_name or ""
    if hello.ech:
        return b"", "ech_not_allowed"
    if hello.server_name is None:
        return (reader.take_all(), "") if not isinstance(host, str) else (b"", "sni_missing")
    if hello.server_name != str(host):
        return b"", "sni_mismatch"
    return reader.take_all(), ""


class _Policy:
    """What egress.* settings mean, rebuilt only when the settings object changes."""

    def __init__(self, cfg: EgressConfig):
        self.cfg = cfg
        self.resolver = Resolver(cfg.resolver, cfg.hosts, cfg.connect_timeout_s)
        self.allowed_nets = [ipaddress.ip_network(n, strict=False) for n in cfg.allow_private_networks]
        self.head_timeout = min(HEADER_TIMEOUT_S, cfg.idle_timeout_s)
        self.rules = EgressRules(cfg)


class EgressProxy:
    def __init__(self, settings: Callable[[], EgressConfig], decide: Decide, metrics: EgressMetrics, *,
                 audit: EgressAudit | None = None, approvals: Approvals | None = None,
                 issue_hosts: IssueHosts | None = None, approve: Callable[[Any], Any] | None = None):
        self._settings = settings
        self._decide = decide
        self.metrics = metrics
        self.audit = audit or EgressAudit(None, lambda: settings().audit, metrics)  # in memory: counts only
        self.approvals = approvals or Approvals(metrics)
        self.issue_hosts = issue_hosts
        self._approve = approve  # the risoluto_egress_decide hook
        self._held = 0
        self._clients: dict[str, Client] = {}
        self._judged = JudgedHeads()  # repeated request heads (see _judged)
        self._policy: _Policy | None = None
        self._open = 0
        self._per_peer: dict[str, int] = {}
        self._count_lock = threading.Lock()  # _open and _per_peer: connection threads update them
        self._portal: anyio.from_thread.BlockingPortal | None = None  # the event loop, for the threads
        self._threads: ConnectionThreads | None = None
        self.address: tuple[str, int] | None = None
        self.broker: Broker | None = None  # credential brokering (set by the enforcer when configured)

    # -- credentials --------------------------------------------------------------------
    def register(self, client: Client) -> None:
        self._clients[client.username] = client

    def unregister(self, username: str) -> None:
        self._clients.pop(username, None)
        self._judged.drop_client(username)

    def policy(self) -> _Policy:
        cfg = self._settings()
        if self._policy is None or self._policy.cfg is not cfg:
            self._policy = _Policy(cfg)
        return self._policy

    # -- serving ------------------------------------------------------------------------
    async def serve(
        self, host: str, port: int = 0, *, task_status: TaskStatus[Any] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``host:port`` (never a wildcard address) until cancelled. Connections are
        served on connection threads (``_threads``); the event loop serves their async steps."""
        addr = ipaddress.ip_address(host)
        if addr.is_unspecified:
            raise ValueError("the egress proxy never binds a wildcard address")
        self.policy()  # a configuration error surfaces before we listen
        listener = socket.socket(socket.AF_INET6 if addr.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
        with listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(1024)
            self.address = listener.getsockname()[:2]
            async with anyio.from_thread.BlockingPortal() as portal:
                threads = ConnectionThreads(listener, self._accepted, spare=SPARE_THREADS,
                                            limit=lambda: self.policy().cfg.max_connections + SPARE_THREADS)
                self._portal, self._threads = portal, threads
                threads.start()
                task_status.started(self.address)
                try:
                    await anyio.sleep_forever()
                finally:
                    threads.stop()
                    with anyio.CancelScope(shield=True):
                        await portal.stop(cancel_remaining=True)  # held approvals, forwards, broker exchanges
                        await anyio.to_thread.run_sync(threads.join, 10.0)

    def _call(self, func: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run ``func(*args)`` on the event loop from a connection thread and wait for it."""
        assert self._portal is not None
        return self._portal.call(func, *args)

    # -- one connection, on its connection thread -----------------------------------------
    def _accepted(self, sock: socket.socket, peer: str) -> None:
        # the proxy writes whole messages and relays what it read at once: never hold a segment back
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Conn(sock)
        try:
            if not self._admit(peer):
                self._refuse_sync(conn, {"peer": peer}, Refusal(503, "too_many_connections", "Too many connections."))
                return
            self.metrics.connections.inc()
            try:
                self._serve_one(conn, peer)
            except (anyio.EndOfStream, IdleTimeout, OSError):
                pass  # the client or origin went away or went quiet; nothing to answer
            except Exception:  # never let one connection take the proxy down
                if not (self._threads and self._threads.stopping):  # the loop side was cancelled: stopping
                    log.exception("egress proxy: unexpected error (peer=%s)", peer)
            finally:
                self._release(peer)
                self.metrics.connections.dec()
        finally:
            conn.close()

    def _admit(self, peer: str) -> bool:
        cfg = self.policy().cfg
        with self._count_lock:
            if self._open >= cfg.max_connections or self._per_peer.get(peer, 0) >= max(1, cfg.max_connections // 2):
                return False
            self._open += 1
            self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
            return True

    def _release(self, peer: str) -> None:
        with self._count_lock:
            self._open -= 1
            left = self._per_peer.pop(peer) - 1
            if left:
                self._per_peer[peer] = left

    def _serve_one(self, conn: Conn, peer: str) -> None:
        policy = self.policy()
        ctx: dict[str, Any] = {"peer": peer, "started": time.monotonic()}
        try:
            reader = Reader(conn)
            judged, match, addresses = self._judge(self._read_head(reader, policy), peer, policy, ctx)
            head, client, target, host = judged.head, judged.client, judged.target, judged.host
            framing = body_framing(head) if head.method != "CONNECT" else ("none", 0)
            if not match.allowed:  # unlisted under onUnlisted: ask, and its addresses passed
                match = self._call(self._ask, conn, policy, client, head.method, host, target.port, ctx)
            upstream = self._dial(policy, addresses, host, target.port, ctx)
        except BadRequest as exc:
            self._refuse_sync(conn, ctx, Refusal(exc.status, str(exc), "Malformed proxy request."))
            return
        except Refusal as refusal:
            self._refuse_sync(conn, ctx, refusal)
            return
        threads = self._threads
        assert threads is not None  # serve() sets it before any connection thread runs
        try:
            threads.track(upstream.sock)
            if head.method != "CONNECT":
                placeholder = self.broker.plain_refusal(head, ctx) if self.broker is not None else None
                if placeholder is not None:  # a credential placeholder in plain HTTP: never sent on
                    self._refuse_sync(conn, ctx, placeholder)
                else:
                    self._forward(conn, reader, upstream, head, target, framing, policy, match, ctx)
            elif self.broker is not None and self.broker.credentialed(host, target.port):
                self._call(self.broker.takes, self, conn, reader, upstream, host, target.port, client, ctx)
            else:
                self._tunnel(conn, reader, upstream, policy, host, match, ctx)
        finally:
            threads.untrack(upstream.sock)
            upstream.close()

    def _read_head(self, reader: Reader, policy: _Policy) -> bytes:
        try:
            raw = reader.read_until_sync(b"\r\n\r\n", MAX_HEAD, Activity(policy.head_timeout))
        except IdleTimeout:
            raise Refusal(408, "header_timeout", "The request head did not arrive in time.") from None
        if raw is None:
            raise Refusal(431, "headers_too_large", f"The request head is larger than {MAX_HEAD} bytes.")
        return raw

    def _judge(self, raw: bytes, peer: str, policy: _Policy,
               ctx: dict[str, Any]) -> tuple[Judged, Match, list[IPAddress]]:
        """Parse, authenticate, decide and resolve a request head: (what it is, the decision, the
        checked addresses). A head this peer sent before, byte for byte, reuses its judgement while
        nothing it depended on changed (``_judged``)."""
        kept = self._judged.get(raw, peer)
        if kept is not None:
            if self._still_holds(kept, policy):
                request = kept.request  # the audit fields it set, as a fresh judgement sets them
                ctx.update(method=request.method, sandbox=request.sandbox, issue=kept.client.issue,
                           host=request.host, port=request.port, path=request.path)
                match = self._decide_again(kept, ctx)
                addresses = list(kept.addresses) if kept.addresses is not None else \
                    self._resolve(policy, kept.host, kept.target.port, ctx)
                return kept, match, addresses
            self._judged.drop(raw, peer)
        judged, addresses = self._judge_afresh(raw, peer, policy, ctx)
        self._judged.keep(raw, peer, judged)
        return judged, judged.match, addresses

    def _judge_afresh(self, raw: bytes, peer: str, policy: _Policy,
                      ctx: dict[str, Any]) -> tuple[Judged, list[IPAddress]]:
        grants = self._grants()  # read before deciding: a grant changed meanwhile misses next time
        head = parse_head(raw)
        ctx["method"] = head.method
        client = self._authenticate(head, peer)
        ctx.update(sandbox=client.sandbox, issue=client.issue)
        target = parse_target(head)
        try:
            host = normalise_host(target.host)
        except HostError:
            raise Refusal(400, "malformed_host", "The host is not a valid name or IP literal.") from None
        ctx.update(host=str(host), port=target.port, path=target.path)
        request = EgressRequest(sandbox=client.sandbox, method=head.method, host=str(host), port=target.port,
                                path=target.path)
        match = self._decide_one(policy, client, request, target, host, ctx)
        addresses = self._resolve(policy, host, target.port, ctx)
        literal = None if isinstance(host, str) else tuple(addresses)  # a name is resolved every time
        return Judged(head=head, client=client, target=target, host=host, match=match, request=request,
                      addresses=literal, policy=policy, allowlist=client.allowlist,
                      grants=grants), addresses

    def _still_holds(self, kept: Judged, policy: _Policy) -> bool:
        """Whether nothing a kept judgement depended on has changed (see ``_judged``)."""
        client = kept.client
        return (kept.policy is policy and kept.allowlist is client.allowlist and kept.grants == self._grants()
                and self._clients.get(client.username) is client)

    def _grants(self) -> int:
        return self.issue_hosts.generation if self.issue_hosts is not None else 0

    def _decide_again(self, kept: Judged, ctx: dict[str, Any]) -> Match:
        """A kept judgement: the decision hook is still asked, and its verdict wins."""
        verdict = self._plugin_verdict(kept.request, kept.client)
        if verdict is not None:
            return verdict
        ctx["rule"] = kept.match.rule.entry if kept.match.rule else ""
        return kept.match

    def _authenticate(self, head: RequestHead, peer: str) -> Client:
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
                client.addresses = frozenset(self._call(client.locate))
            except Exception:
                raise Refusal(503, "sandbox_lookup_failed", "The sandbox's address could not be checked.") from None
        if client.addresses is None or peer not in client.addresses:
            raise Refusal(407, "credential_foreign", "The credential is not valid from this address.")
        return client

    def _decide_one(self, policy: _Policy, client: Client, request: EgressRequest, target: Target,
                    host: str | IPAddress, ctx: dict[str, Any]) -> Match:
        """Deny list, decision hook, HTTP rules, allowlists; a Match that is not allowed means "ask"."""
        denied = policy.rules.denied(host, target.port)
        if denied is not None:  # wins over every allow
            ctx["rule"] = f"deny:{denied.entry}"
            raise Refusal(403, "deny_listed", f"{host} is on the egress deny list.")
        verdict = self._plugin_verdict(request, client)
        if verdict is not None:
            return verdict
        method = request.method
        if method != "CONNECT" and policy.rules.covers(host, target.port):  # method and path visible
            path = rule_path(target.path)  # percent-decoded; None: it could reach a path the rules never saw
            if path is None:
                raise Refusal(403, "path_not_plain", f"{method} {target.path} on {host} cannot be checked.")
            rule = policy.rules.http_rule(host, target.port, method, path)
            if rule is not None:
                ctx["rule"] = rule.name
                if rule.verdict == "deny":
                    raise Refusal(403, "rule_deny", f"{method} {target.path} on {host} is refused by a rule.")
                return Match(True, "rule_allow")
        match = client.allowlist.match(host, target.port)
        granted = self.issue_hosts.allowlist(client.issue) if self.issue_hosts and client.issue else None
        if not match.allowed and granted is not None:  # hosts granted to this issue by allow-issue
            found = granted.match(host, target.port)
            if found.allowed:
                match = Match(True, "issue_allowlist", found.rule)
        if match.allowed:
            ctx["rule"] = match.rule.entry if match.rule else ""
            return match
        if policy.cfg.on_unlisted == "ask" and match.reason in ASKABLE:
            return match  # held for approval once the address checks pass
        messages = {
            "host_not_allowed": f"{host} is not in this sandbox's egress allowlist.",
            "port_not_allowed": f"Port {target.port} of {host} is not in this sandbox's egress allowlist.",
            "ip_literal_not_allowed": f"The IP address {host} is not in this sandbox's egress allowlist.",
        }
        raise Refusal(403, match.reason, messages[match.reason])

    def _plugin_verdict(self, request: EgressRequest, client: Client) -> Match | None:
        """The decision hook's allow as a Match, None when no plugin decided; Refusal on a deny."""
        try:
            verdict = self._decide(request, client.allowlist.entries)
        except Exception as exc:  # a broken rule refuses (fail closed)
            log.error("egress decision hook raised %s", type(exc).__name__)
            raise Refusal(403, "decision_error", "A decision rule failed; the request is refused.") from None
        if verdict is None:
            return None
        if not verdict.allowed:
            raise Refusal(403, "plugin", f"Refused by policy: {verdict.reason}", verdict.reason)
        return Match(True, "plugin")

    async def _ask(self, conn: Conn, policy: _Policy, client: Client, method: str, host: str | IPAddress,
                   port: int, ctx: dict[str, Any]) -> Match:
        """Hold the request until an approval answers; other connections go on meanwhile."""
        timeout = policy.cfg.ask_timeout_seconds
        pending = self.approvals.open(client.sandbox, client.issue, str(host), port, method, timeout)
        if pending is None:
            raise Refusal(403, "approval_queue_full", "Too many requests of this sandbox await approval.")
        ctx["approval"] = pending.id
        self._log(ctx, "ask", "approval_pending")
        self._held += 1
        try:
            await self.approvals.wait(pending, timeout, self._approve, lambda: _client_left(conn))
        finally:
            self._held -= 1
        ctx["principal"] = pending.principal
        if pending.answer == "deny":
            raise Refusal(403, pending.reason, f"{host} was not approved.")
        entry = issue_entry(host, port)
        if pending.answer == "allow-issue":
            await self._grant(client.issue, entry)
        ctx["rule"] = entry
        return Match(True, pending.reason, parse_entry(entry))

    async def _grant(self, issue: str, entry: str) -> None:
        if self.issue_hosts is None or not issue:
            return  # nowhere to keep it: this request only
        try:
            await anyio.to_thread.run_sync(self.issue_hosts.add, issue, entry)
        except (OSError, ValueError) as exc:
            log.error("egress: could not keep %s for issue %s: %s", entry, issue, exc)

    async def release_held(self, timeout: float = 2.0) -> None:
        """Deny every held request (the server is stopping) and let them answer their clients."""
        self.approvals.cancel_all()
        with anyio.move_on_after(timeout):
            while self._held:
                await anyio.sleep(0.01)

    def _resolve(self, policy: _Policy, host: str | IPAddress, port: int,
                 ctx: dict[str, Any]) -> list[IPAddress]:
        if isinstance(host, str):
            try:
                addresses = self._call(policy.resolver.resolve, host, port)
            except ResolveError as exc:
                raise Refusal(502, "resolve_failed", f"{host} does not resolve.", str(exc)) from None
        else:
            addresses = [host]
        for addr in addresses:  # one refused address refuses the name: no mixed answers
            why = address_refusal(addr, policy.allowed_nets)
            if why:
                ctx["address"] = str(addr)
                raise Refusal(403, "private_address", f"{host} resolves to a {why}; refused.")
        return addresses

    def _dial(self, policy: _Policy, addresses: list[IPAddress], host: str | IPAddress, port: int,
              ctx: dict[str, Any]) -> Conn:
        last = "connect_failed"
        for addr in addresses:
            ctx["address"] = str(addr)
            try:
                return connect_sync(str(addr), port, policy.cfg.connect_timeout_s)  # the address we checked
            except IdleTimeout:
                last = "connect_timeout"
            except OSError:
                continue
        raise Refusal(502 if last == "connect_failed" else 504, last, f"Could not connect to {host}:{port}.")

    def _tunnel(self, conn: Conn, reader: Reader, upstream: Conn, policy: _Policy,
                host: str | IPAddress, match: Match, ctx: dict[str, Any]) -> None:
        conn.send_sync(b"HTTP/1.1 200 Connection established\r\n\r\n", Activity(policy.head_timeout))
        raw_ok = match.rule is not None and match.rule.port is not None and match.rule.port != 443
        first, why = self._client_hello_sync(reader, policy, host, raw_ok, ctx)
        if why:
            self._log(ctx, "deny", why)
            return  # already said 200: closing the tunnel is the refusal
        self.metrics.tunnels.inc()
        up, down = Tally(self.metrics.upload), Tally(self.metrics.download)
        ctx["tallies"] = (up, down)
        try:
            activity = Activity(policy.cfg.idle_timeout_s)
            if first:
                upstream.send_sync(first, activity)
                up.inc(len(first))
            tunnel_sync(conn, upstream, activity, up, down)
        except (IdleTimeout, OSError):
            pass  # idle or reset: the whole tunnel ends
        finally:
            self.metrics.tunnels.dec()
            self._log(ctx, "allow", match.reason)  # audited once it ends: with its byte counts

    def _client_hello_sync(self, reader: Reader, policy: _Policy, host: str | IPAddress,
                           raw_ok: bool, ctx: dict[str, Any]) -> tuple[bytes, str]:
        """``_client_hello`` on a connection thread."""
        if raw_ok and not reader.buffer:
            try:
                reader.fill_sync(Activity(SERVER_FIRST_WAIT_S))
            except IdleTimeout:
                return b"", ""  # a server-speaks-first protocol on an explicitly listed port
        deadline = Activity(policy.head_timeout)
        while True:
            verdict = _judge_hello(reader, host, raw_ok, ctx)
            if verdict is not None:
                return verdict
            try:
                reader.fill_sync(deadline)
            except IdleTimeout:
                return b"", "hello_timeout"

    async def _client_hello(self, reader: Reader, policy: _Policy, host: str | IPAddress,
                            raw_ok: bool, ctx: dict[str, Any]) -> tuple[bytes, str]:
        """(bytes read, refusal reason or ""). Reads the first flight and checks its SNI."""
        if raw_ok and not reader.buffer:
            with anyio.move_on_after(SERVER_FIRST_WAIT_S):
                await reader.fill()
            if not reader.buffer:
                return b"", ""  # a server-speaks-first protocol on an explicitly listed port
        with anyio.move_on_after(policy.head_timeout):
            while True:
                verdict = _judge_hello(reader, host, raw_ok, ctx)
                if verdict is not None:
                    return verdict
                await reader.fill()
        return b"", "hello_timeout"

    def _forward(self, conn: Conn, reader: Reader, upstream: Conn, head: RequestHead, target: Target,
                 framing: tuple[str, int], policy: _Policy, match: Match, ctx: dict[str, Any]) -> None:
        """One plain-HTTP exchange: our head up, the body (if any) on a thread of its own, the
        answer down on this one."""
        host = ctx["host"]
        authority = f"[{host}]" if ":" in host else host
        if target.port != 80:
            authority += f":{target.port}"
        up, down = Tally(self.metrics.upload), Tally(self.metrics.download)
        ctx["tallies"] = (up, down)
        try:
            activity = Activity(policy.cfg.idle_timeout_s)
            upstream.send_sync(upstream_head(head, target, authority), activity)
            if framing[0] == "none":
                relay_sync(upstream, conn, activity, down)
                return
            body = threading.Thread(target=_upload, args=(reader, upstream, framing, activity, up),
                                    name="risoluto-egress-body", daemon=True)
            body.start()
            try:
                relay_sync(upstream, conn, activity, down)
            finally:  # the answer ended: wake the body's thread, and let it end before the sockets close
                _shutdown(conn.sock, socket.SHUT_RD)
                _shutdown(upstream.sock, socket.SHUT_RDWR)
                body.join()
        finally:
            self._log(ctx, "allow", match.reason)  # audited once it ends: with its byte counts

    # -- answers and the decision log ----------------------------------------------------
    async def _refuse(self, conn: Conn, ctx: dict[str, Any], refusal: Refusal) -> None:
        data = self._refusal_answer(ctx, refusal)
        with anyio.move_on_after(1):
            try:
                await conn.send(data)
            except OSError:
                pass

    def _refuse_sync(self, conn: Conn, ctx: dict[str, Any], refusal: Refusal) -> None:
        data = self._refusal_answer(ctx, refusal)
        try:
            conn.send_sync(data, Activity(1.0))
        except (IdleTimeout, OSError):
            pass

    def _refusal_answer(self, ctx: dict[str, Any], refusal: Refusal) -> bytes:
        """Log and audit the refusal; the answer's bytes."""
        self._log(ctx, "deny", refusal.reason, refusal.detail)
        message = refusal.message
        if refusal.status == 403:  # written for the agent: what, not another route, how to ask
            plain = ctx.get("method") != "CONNECT"
            message = refusal_text(refusal.reason, ctx.get("host", ""), ctx.get("port", 0),
                                   ctx.get("method", "") if plain else "", ctx.get("path", "") if plain else "",
                                   refusal.detail)
        return answer(refusal.status, refusal.reason, message)

    def _log(self, ctx: dict[str, Any], verdict: str, reason: str, detail: str = "") -> None:
        plain = ctx.get("method") != "CONNECT"
        up, down = (t.n for t in ctx["tallies"]) if "tallies" in ctx else (0, 0)
        self.audit.record(Decision(
            verdict=verdict, reason=reason, sandbox=ctx.get("sandbox", ""), issue=ctx.get("issue", ""),
            host=ctx.get("host", ""), port=ctx.get("port", 0), sni=ctx.get("sni", ""),
            method=ctx.get("method", "") if plain else "", path=ctx.get("path", "") if plain else "",
            rule=ctx.get("rule", ""), credential=ctx.get("credential", ""), bytes_up=up, bytes_down=down,
            approval=ctx.get("approval", ""),
            principal=ctx.get("principal", ""),
            duration_ms=int((time.monotonic() - ctx["started"]) * 1000) if "started" in ctx else 0,
        ))
        log.info(
            "egress %s reason=%s sandbox=%s peer=%s method=%s host=%s port=%s address=%s%s",
            verdict, reason, ctx.get("sandbox", "-"), ctx.get("peer", "-"), ctx.get("method", "-"),
            ctx.get("host", "-"), ctx.get("port", "-"), ctx.get("address", "-"),
            f" detail={detail!r}" if detail else "",
        )


__all__ = ["Client", "EgressProxy", "address_refusal"]
