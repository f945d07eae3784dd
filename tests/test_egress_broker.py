"""The credential broker in the egress proxy on loopback, no Docker: every misuse is tried.

An HTTPS origin with its own CA (given as ``egress.upstreamCaFile``) listens on 127.0.78.1;
the proxy gets a test-only ``allowPrivateNetworks: [127.0.0.0/8]`` and pins the names there.
Two sandboxes (sbx-a from 127.0.0.1, sbx-b from 127.0.0.2) each hold a placeholder for
``API_TOKEN``; the client side speaks TLS trusting only the sandbox's own CA.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import ssl
import time
from typing import Any, AsyncIterator

import anyio
import attrs
import h11
import pytest
from anyio.streams.tls import TLSStream

from backend_support import lock_store, use_store
from broker_support import Upstream, start_upstream
from egress_support import CA
from risoluto.errors import ConfigError
from risoluto.kernel import Kernel
from risoluto.plugins.egress import _credentials
from risoluto.plugins.egress._audit import EgressAudit, audit_for
from risoluto.plugins.egress._broker import Broker, SandboxState
from risoluto.plugins.egress._broker_launch import make_broker
from risoluto.plugins.egress._metrics import metrics_for
from risoluto.plugins.egress._hosts import Allowlist
from risoluto.plugins.egress._proxy import Client, EgressProxy
from risoluto.settings import build_settings

pytestmark = pytest.mark.anyio

HOST = "127.0.78.1"
REAL = "real-token-" + "r" * 24
ROTATED = "rotated-token-" + "s" * 24


class Store:
    """A stand-in secret store: get() is what the broker calls per request."""

    def __init__(self, values: dict[str, str]):
        self.values = values

    async def get(self, name: str) -> str | None:
        return self.values.get(name)

    async def list(self) -> list[str]:
        return sorted(self.values)


@attrs.define
class Env:
    proxy: EgressProxy
    port: int
    kernel: Kernel
    broker: Broker
    upstream: Upstream
    uport: int
    states: dict[str, SandboxState]
    ca: CA

    def metric(self, name: str, **labels: str) -> float:
        return self.kernel.metrics_registry.get_sample_value(name, labels) or 0.0

    def audit_bytes(self) -> bytes:
        """The decision audit file as written (the writer flushed first)."""
        self.proxy.audit.close()
        path = self.proxy.audit.path
        return path.read_bytes() if path is not None and path.exists() else b""

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_bytes().splitlines()]

    def leaks(self) -> list[str]:
        """Secret values, placeholders or proxy credentials found in the audit file's bytes."""
        raw = self.audit_bytes()
        texts = [REAL, ROTATED, "risoluto-placeholder", "key-" + "k" * 20, *SECRETS.values()]
        texts += [p for state in self.states.values() for p in state.placeholders.values()]
        return [t for t in texts if t.encode() in raw]


SECRETS = {"sbx-a": "secret-a-" + "a" * 20, "sbx-b": "secret-b-" + "b" * 20}
SOURCES = {"sbx-a": "127.0.0.1", "sbx-b": "127.0.0.2"}


def egress_config(tmp_path: Any, ca: CA, uport: int, **egress: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "codex": {"sandbox": {"egressAllowlist": [f"api.test:{uport}", f"plain.test:{uport}",
                                                  f"other-api.test:{uport}"]}},
        "egress": {
            "allowPrivateNetworks": ["127.0.0.0/8"], "idleTimeoutS": 5.0,
            "hosts": {"api.test": HOST, "plain.test": HOST, "other-api.test": HOST},
            "upstreamCaFile": str(ca.ca_path),
            "credentials": [
                {"secret": "API_TOKEN", "hosts": [f"api.test:{uport}"], "paths": ["/v1/*", "/sse", "/big/*"],
                 "methods": ["GET", "POST"]},
                {"secret": "KEY_HEADER", "hosts": [f"api.test:{uport}"], "header": "X-Api-Key", "format": "{value}"},
            ],
        },
    }
    config["egress"].update(egress)
    return config


@contextlib.asynccontextmanager
async def broker_env(tmp_path: Any, egress: Any = None, audit: EgressAudit | None = None) -> AsyncIterator[Env]:
    """``egress`` (a function of the origin's port) adds egress settings; ``audit``: the decision
    audit the proxy writes to (default: the kernel's, ``<tmp_path>/egress-audit.log``)."""
    ca = CA(tmp_path, ["api.test", "plain.test", "other-api.test"])
    async with anyio.create_task_group() as tg:
        upstream, uport = await start_upstream(tg, HOST, 0, ca.server_context())
        extra = egress(uport) if egress else {}
        settings = build_settings(egress_config(tmp_path, ca, uport, **extra), None, {"DATA_DIR": str(tmp_path)})
        kernel = Kernel(settings)
        use_store(kernel, Store({"API_TOKEN": REAL, "KEY_HEADER": "key-" + "k" * 20}))
        proxy = EgressProxy(lambda: kernel.settings.egress, kernel.hooks.egress_decision, metrics_for(kernel),
                            audit=audit or audit_for(kernel))
        broker = make_broker(kernel)
        assert broker is not None
        proxy.broker = broker
        states = {}
        for name, source in SOURCES.items():
            proxy.register(Client(username=name, secret=SECRETS[name].encode(), sandbox=name,
                                  addresses=frozenset({source}),
                                  allowlist=Allowlist(settings.codex.sandbox.egress_allowlist)))
            states[name] = broker.prepare(name, {"API_TOKEN", "KEY_HEADER"}, 600)
            broker.register(states[name])
        _, port = await tg.start(proxy.serve, "127.0.0.1")
        yield Env(proxy, port, kernel, broker, upstream, uport, states, ca)
        tg.cancel_scope.cancel()


class Session:
    """One CONNECT tunnel from a sandbox, TLS trusting ``cadata`` only, HTTP/1.1 keep-alive."""

    def __init__(self, stream: Any, tls: Any):
        self.stream, self.tls = stream, tls
        self.conn = h11.Connection(h11.CLIENT)

    async def request(self, method: str, target: str, headers: list[tuple[str, str]] | None = None,
                      body: bytes = b"", host: str = "api.test", chunks: tuple[bytes, ...] = ()
                      ) -> tuple[int, dict[str, str], bytes, list[float]]:
        """(status, headers, body, arrival time of each body piece)."""
        hdrs = [("Host", host)] + (headers or [])
        if body and not chunks:
            hdrs.append(("Content-Length", str(len(body))))
        if chunks:
            hdrs.append(("Transfer-Encoding", "chunked"))
        await self.tls.send(self.conn.send(h11.Request(method=method, target=target, headers=hdrs)))
        if body and not chunks:
            await self.tls.send(self.conn.send(h11.Data(data=body)))
        for piece in chunks:
            await self.tls.send(self.conn.send(h11.Data(data=piece)))
            await anyio.sleep(0.05)
        await self.tls.send(self.conn.send(h11.EndOfMessage()))
        status, got, out, times = 0, {}, b"", []
        with anyio.fail_after(10):
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    try:
                        self.conn.receive_data(await self.tls.receive())
                    except (anyio.EndOfStream, ssl.SSLError):
                        self.conn.receive_data(b"")
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                    got = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    out += event.data
                    times.append(time.monotonic())
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return status, got, out, times


@contextlib.asynccontextmanager
async def session(env: Env, sandbox: str = "sbx-a", host: str = "api.test",
                  cadata: str | None = None) -> AsyncIterator[Session]:
    stream = await anyio.connect_tcp("127.0.0.1", env.port, local_host=SOURCES[sandbox])
    async with stream:
        cred = base64.b64encode(f"{sandbox}:{SECRETS[sandbox]}".encode()).decode()
        await stream.send(f"CONNECT {host}:{env.uport} HTTP/1.1\r\nHost: {host}\r\n"
                          f"Proxy-Authorization: Basic {cred}\r\n\r\n".encode())
        head = b""
        with anyio.fail_after(10):
            while b"\r\n\r\n" not in head:
                head += await stream.receive()
        assert head.startswith(b"HTTP/1.1 200"), head
        ctx = ssl.create_default_context(cadata=cadata or env.states[sandbox].ca.pem.decode())
        with anyio.fail_after(10):
            tls = await TLSStream.wrap(stream, server_side=False, hostname=host, ssl_context=ctx,
                                       standard_compatible=False)
        yield Session(stream, tls)


def placeholder(env: Env, sandbox: str = "sbx-a", name: str = "API_TOKEN") -> str:
    return env.states[sandbox].placeholders[name]


async def test_injection_keep_alive_and_chunked(tmp_path):
    async with broker_env(tmp_path) as env:
        ph = placeholder(env)
        assert ph.startswith("risoluto-placeholder-API_TOKEN-") and len(ph.rsplit("-", 1)[1]) == 32
        async with session(env) as s:
            status, _, body, _ = await s.request("GET", "/v1/models", [("Authorization", f"Bearer {ph}")])
            assert status == 200
            seen = json.loads(body)
            assert seen["headers"]["authorization"] == f"Bearer {REAL}"
            # the same connection again (keep-alive), a POST with a body, and a chunked answer
            status, _, body, _ = await s.request("POST", "/v1/chat", [("Authorization", f"Bearer {ph}")], b"hello")
            assert status == 200 and json.loads(body)["body"] == "hello"
            # a chunked request body, sent in pieces, arrives whole
            status, _, body, _ = await s.request("POST", "/v1/up", [("Authorization", f"Bearer {ph}")],
                                                 chunks=(b"one,", b"two,", b"three"))
            assert status == 200 and json.loads(body)["body"] == "one,two,three"
            assert json.loads(body)["headers"]["transfer-encoding"] == "chunked"
            status, _, body, times = await s.request("GET", "/chunked", [("X-Other", "1")])
            assert status == 200 and json.loads(body)["headers"]["x-other"] == "1" and len(times) >= 1
            # a request without a placeholder passes untouched
            assert "authorization" not in json.loads(body)["headers"]
            # another entry: its own header and format
            status, _, body, _ = await s.request("GET", "/anything", [("X-Api-Key", placeholder(env, name="KEY_HEADER"))])
            assert status == 200 and json.loads(body)["headers"]["x-api-key"] == "key-" + "k" * 20
        assert env.upstream.connections == 1  # one upstream connection carried every request
        assert env.metric("risoluto_egress_brokered_requests_total", outcome="injected") == 4
        assert env.metric("risoluto_egress_decisions_total", verdict="allow", reason="credential_host") == 1


@pytest.mark.parametrize("method, target, headers, why", [
    ("GET", "/admin", "Authorization: Bearer {ph}", "path"),
    ("DELETE", "/v1/models", "Authorization: Bearer {ph}", "method"),
    ("GET", "/v1/models?key={ph}", "", "query"),
    ("GET", "/v1/{ph}", "", "url"),
    ("GET", "/v1/models", "X-Forward: Bearer {ph}", "other header"),
    ("GET", "/v1/models", "Authorization: Bearer {other}", "other sandbox"),
    ("GET", "/v1/models", "Authorization: Bearer risoluto-placeholder-API_TOKEN-" + "0" * 32, "invented"),
    ("GET", "/v1/../admin", "Authorization: Bearer {ph}", "dot segment"),
    ("GET", "/v1/%2e%2e/admin", "Authorization: Bearer {ph}", "encoded dot segment"),
    ("GET", "/v1/models", "Authorization: Bearer {ph}\r\nHost2: x", "host header"),
])
async def test_misuse_is_refused_and_nothing_goes_upstream(tmp_path, caplog, method, target, headers, why):
    caplog.set_level(logging.INFO, logger="risoluto.egress")
    async with broker_env(tmp_path) as env:
        ph, other = placeholder(env), placeholder(env, "sbx-b")
        target = target.format(ph=ph)
        extra = []
        host = "api.test"
        for line in headers.format(ph=ph, other=other).split("\r\n"):
            if line.startswith("Host2"):
                host = "plain.test"  # the Host header names another vhost than the CONNECT
            elif line:
                extra.append(tuple(line.split(": ", 1)))
        async with session(env) as s:
            status, got, _, _ = await s.request(method, target, extra, host=host)
        assert (status, got.get("x-risoluto-egress")) == (403, "credential_not_allowed"), why
        assert env.upstream.requests == []
        assert env.metric("risoluto_egress_brokered_requests_total", outcome="credential_not_allowed") == 1
        lines = [r.getMessage() for r in caplog.records if "credential_not_allowed" in r.getMessage()]
        assert len(lines) == 1 and ph not in lines[0] and REAL not in lines[0]
        # the audit: the connection admitted, then exactly one refusal, names only
        records = env.lines()
        assert [(r["verdict"], r["reason"]) for r in records] == [("allow", "credential_host"),
                                                                  ("deny", "credential_not_allowed")], why
        refused = records[1]
        assert (refused["sandbox"], refused["host"], refused["port"]) == ("sbx-a", "api.test", env.uport)
        assert refused["bytes_up"] == refused["bytes_down"] == 0 and refused["rule"] is None
        assert refused["credential"] == "API_TOKEN", why  # the name the placeholder carries
        assert refused["path"] in (None, target.split("?")[0]) and "?" not in (refused["path"] or "")
        assert env.leaks() == [], why


async def test_ended_sandbox_placeholder_and_wrong_host(tmp_path):
    async with broker_env(tmp_path) as env:
        ph_b = placeholder(env, "sbx-b")
        env.broker.unregister("sbx-b")  # sandbox B ended
        async with session(env) as s:
            status, got, _, _ = await s.request("GET", "/v1/models", [("Authorization", f"Bearer {ph_b}")])
        assert (status, got.get("x-risoluto-egress")) == (403, "credential_not_allowed")
        # a credentialed connection to a host the credential is not bound to: other-api.test is not in the
        # entry, so it is an end-to-end tunnel and the worker sees the origin's real certificate
        with pytest.raises(ssl.SSLCertVerificationError):
            async with session(env, host="other-api.test"):
                pass
        async with session(env, host="other-api.test", cadata=env.ca.ca_path.read_text()) as s:
            status, _, body, _ = await s.request("GET", "/", [], host="other-api.test")
            assert status == 200 and json.loads(body)["headers"].get("authorization") is None
        assert [r["target"] for r in env.upstream.requests] == ["/"]


async def test_placeholder_over_plain_http_is_refused(tmp_path):
    async with broker_env(tmp_path) as env:
        cred = base64.b64encode(f"sbx-a:{SECRETS['sbx-a']}".encode()).decode()
        stream = await anyio.connect_tcp("127.0.0.1", env.port)
        async with stream:
            await stream.send(f"GET http://plain.test:{env.uport}/ HTTP/1.1\r\nHost: plain.test\r\n"
                              f"Authorization: Bearer {placeholder(env)}\r\n"
                              f"Proxy-Authorization: Basic {cred}\r\n\r\n".encode())
            out = b""
            with contextlib.suppress(anyio.EndOfStream):
                with anyio.fail_after(5):
                    while True:
                        out += await stream.receive()
        assert out.startswith(b"HTTP/1.1 403") and b"X-Risoluto-Egress: credential_not_allowed" in out
        assert env.upstream.requests == []


async def test_rotation_locked_store_and_sse(tmp_path):
    async with broker_env(tmp_path) as env:
        ph = placeholder(env)
        auth = [("Authorization", f"Bearer {ph}")]
        async with session(env) as s:
            assert (await s.request("GET", "/v1/a", auth))[0] == 200
            env.kernel.backends.secrets.store.values["API_TOKEN"] = ROTATED  # rotated: the next request uses it
            status, _, body, _ = await s.request("GET", "/v1/b", auth)
            assert status == 200 and json.loads(body)["headers"]["authorization"] == f"Bearer {ROTATED}"
            # server-sent events arrive one by one, not at the end
            status, got, body, times = await s.request("GET", "/sse", auth)
            assert status == 200 and body.count(b"data: event") == 3
            assert len(times) >= 3 and times[-1] - times[0] >= 0.6, times
        locked_store = env.kernel.backends.secrets.store
        lock_store(env.kernel)
        async with session(env) as s:
            status, got, _, _ = await s.request("GET", "/v1/c", auth)
        assert (status, got.get("x-risoluto-egress")) == (503, "secrets_locked")
        assert [r["target"] for r in env.upstream.requests] == ["/v1/a", "/v1/b", "/sse"]
        assert locked_store is not None


async def test_upstream_certificate_is_verified(tmp_path):
    """Without egress.upstreamCaFile the origin's private CA is not trusted: nothing is sent."""
    async with broker_env(tmp_path) as env:
        env.broker.upstream = ssl.create_default_context()
        async with session(env) as s:
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, ssl.SSLError, h11.ProtocolError)):
                status, *_ = await s.request("GET", "/v1/models", [("Authorization", f"Bearer {placeholder(env)}")])
                if status == 0:
                    raise anyio.EndOfStream
        assert env.upstream.requests == []
        # one line for the connection: refused by the origin's handshake, never admitted
        assert [(r["verdict"], r["reason"], r["sni"]) for r in env.lines()] == [
            ("deny", "origin_tls_failed", "api.test")]



async def test_a_worker_refusing_the_sandbox_ca_is_one_deny_line(tmp_path):
    """A client that does not trust its sandbox's CA (here: it trusts only the origin's) ends the
    handshake; the connection is audited as refused by the worker's side, nothing goes upstream."""
    async with broker_env(tmp_path) as env:
        with pytest.raises(ssl.SSLCertVerificationError):
            async with session(env, cadata=env.ca.ca_path.read_text()):
                pass
        with anyio.fail_after(5):
            while not env.proxy.audit.recent(lambda d: True, 1):  # the proxy notices the close
                await anyio.sleep(0.02)
        assert [(r["verdict"], r["reason"]) for r in env.lines()] == [("deny", "worker_tls_failed")]
        assert env.upstream.requests == []


def test_config_errors_name_the_key(tmp_path):
    base = {"codex": {"sandbox": {"egressAllowlist": ["api.test"]}}}

    def settings(creds: list[Any], allow: list[str] | None = None) -> Any:
        cfg = {"codex": {"sandbox": {"egressAllowlist": base["codex"]["sandbox"]["egressAllowlist"]
                                     if allow is None else allow}},
               "egress": {"credentials": creds}}
        return build_settings(cfg, None, {"DATA_DIR": str(tmp_path)})

    cases = [
        ([{"secret": "A", "hosts": ["other.test"]}], None, "egress.credentials[0].hosts[0]"),
        ([{"secret": "A", "hosts": ["api.test:8443"]}], None, "egress.credentials[0].hosts[0]"),
        ([{"secret": "A", "hosts": ["api.test"], "header": "Host"}], None, "egress.credentials[0].header"),
        ([{"secret": "A", "hosts": ["api.test"], "format": "Bearer"}], None, "egress.credentials[0].format"),
        ([{"secret": "A", "hosts": ["api.test"], "paths": ["v1"]}], None, "egress.credentials[0].paths[0]"),
        ([{"secret": "A", "hosts": ["api.test"], "methods": ["CONNECT"]}], None, "egress.credentials[0].methods[0]"),
        ([{"secret": "A b", "hosts": ["api.test"]}], None, "egress.credentials[0].secret"),
        ([{"secret": "A", "hosts": ["api.test"]}], [], "non-empty codex.sandbox.egressAllowlist"),
    ]
    for creds, allow, expected in cases:
        with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            _credentials.validate(settings(creds, allow))
    with pytest.raises(ConfigError, match=r"egress.credentials\[0\].secret"):
        settings([{"hosts": ["api.test"]}])
    with pytest.raises(ConfigError, match=r"egress.credentials\[0\].hosts"):
        settings([{"secret": "A"}])
    ok = _credentials.validate(settings([{"secret": "A", "hosts": ["api.test"]}]))
    assert ok[0].header == "authorization" and ok[0].paths == ("/*",) and ok[0].methods == frozenset()
    # deploy-time: the overlay (writable through the API) may not name them (risoluto/posture.py)
    with pytest.raises(ConfigError, match="egress.credentials: a deploy-time key"):
        build_settings({}, {"egress": {"credentials": []}}, {"DATA_DIR": str(tmp_path)})
    with pytest.raises(ConfigError, match="egress.upstreamCaFile: a deploy-time key"):
        build_settings({}, {"egress": {"upstreamCaFile": "/x"}}, {"DATA_DIR": str(tmp_path)})
    assert os.path.exists(tmp_path)


CLIENTS = {
    "requests": "import os, requests; r = requests.get(os.environ['URL'], headers={'Authorization': 'Bearer ' + "
                "os.environ['TOKEN']}, timeout=10); print(r.status_code, r.json()['headers']['authorization'])",
    "httpx": "import os, httpx; r = httpx.get(os.environ['URL'], headers={'Authorization': 'Bearer ' + "
             "os.environ['TOKEN']}, timeout=10); print(r.status_code, r.json()['headers']['authorization'])",
    "urllib": "import json, os, urllib.request as u; r = u.urlopen(u.Request(os.environ['URL'], headers={"
              "'Authorization': 'Bearer ' + os.environ['TOKEN']}), timeout=10); "
              "print(r.status, json.load(r)['headers']['authorization'])",
}
NODE = r"""
const http = require('http'), tls = require('tls');
const proxy = new URL(process.env.HTTPS_PROXY), url = new URL(process.env.URL);
const auth = Buffer.from(decodeURIComponent(proxy.username) + ':' + decodeURIComponent(proxy.password))
  .toString('base64');
http.request({host: proxy.hostname, port: proxy.port, method: 'CONNECT', path: url.host,
              headers: {'Proxy-Authorization': 'Basic ' + auth}}).on('connect', (res, socket) => {
  const t = tls.connect({socket, servername: url.hostname}, () => {
    t.write(`GET ${url.pathname} HTTP/1.1\r\nHost: ${url.host}\r\n` +
            `Authorization: Bearer ${process.env.TOKEN}\r\nConnection: close\r\n\r\n`);
  });
  let out = '';
  t.on('data', d => out += d);
  t.on('end', () => {
    const body = JSON.parse(out.split('\r\n\r\n')[1]);
    console.log(out.split(' ')[1], body.headers.authorization);
  });
  t.on('error', e => { console.log('error', e.code); });
}).end();
"""


async def test_common_clients_trust_the_sandbox_ca_through_the_environment(tmp_path):
    """The variables a launch sets (a bundle = system roots + sandbox CA) are what requests, httpx,
    urllib, curl and Node read: each verifies the broker's leaf and the origin gets the real value."""
    import shutil
    import sys

    async with broker_env(tmp_path) as env:
        system = next(p for p in ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")
                      if os.path.exists(p))
        bundle = tmp_path / "bundle.pem"
        bundle.write_bytes(open(system, "rb").read() + env.states["sbx-a"].ca.pem)
        ca_only = tmp_path / "sandbox-ca.pem"
        ca_only.write_bytes(env.states["sbx-a"].ca.pem)
        proxy = f"http://sbx-a:{SECRETS['sbx-a']}@127.0.0.1:{env.port}"
        base = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and "CA_" not in k
                and not k.startswith("SSL_")}
        run_env = {**base, "HTTPS_PROXY": proxy, "https_proxy": proxy, "URL": f"https://api.test:{env.uport}/v1/x",
                   "TOKEN": placeholder(env), "SSL_CERT_FILE": str(bundle), "CURL_CA_BUNDLE": str(bundle),
                   "REQUESTS_CA_BUNDLE": str(bundle), "NODE_EXTRA_CA_CERTS": str(ca_only)}
        outputs = {}
        for name, code in CLIENTS.items():
            done = await anyio.run_process([sys.executable, "-c", code], env=run_env, check=False)
            outputs[name] = (done.stdout + done.stderr).decode().strip()
        curl = await anyio.run_process(["curl", "-sS", "-H", f"Authorization: Bearer {placeholder(env)}",
                                        run_env["URL"]], env=run_env, check=False)
        outputs["curl"] = (curl.stdout + curl.stderr).decode().strip()
        if shutil.which("node"):
            node = await anyio.run_process(["node", "-e", NODE], env=run_env, check=False)
            outputs["node"] = (node.stdout + node.stderr).decode().strip()
    for name in CLIENTS:
        assert outputs[name] == f"200 Bearer {REAL}", (name, outputs[name])
    assert json.loads(outputs["curl"])["headers"]["authorization"] == f"Bearer {REAL}", outputs["curl"]

    if "node" in outputs:
        assert outputs["node"] == f"200 Bearer {REAL}", outputs["node"]


async def test_doctor_lists_brokered_and_names_raw_secrets(tmp_path):
    from risoluto.plugins.egress import credentials

    auth_dir = tmp_path / "codex-auth"
    auth_dir.mkdir()
    (auth_dir / "auth.json").write_text(json.dumps({"OPENAI_API_KEY": "sk-raw-" + "q" * 20}))
    ca = CA(tmp_path, ["api.test"])
    config = egress_config(tmp_path, ca, 8443)
    config["codex"]["authDir"] = str(auth_dir)
    kernel = Kernel(build_settings(config, None, {"DATA_DIR": str(tmp_path)}))
    use_store(kernel, Store({"API_TOKEN": REAL, "KEY_HEADER": "k" * 20, "DEPLOY_KEY": "d" * 20}))
    rows = await anyio.to_thread.run_sync(credentials.risoluto_doctor_checks, kernel)
    by_item = {r.item: r for r in rows}
    listed = by_item["egress credentials"]
    assert listed.status == "PASS" and "API_TOKEN -> api.test:8443" in listed.reason and "KEY_HEADER" in listed.reason
    assert by_item["raw secret DEPLOY_KEY"].status == "WARN"
    assert by_item["raw secret OPENAI_API_KEY"].status == "WARN" and "auth.json" in by_item["raw secret OPENAI_API_KEY"].reason
    assert "raw secret API_TOKEN" not in by_item and "raw secret KEY_HEADER" not in by_item
    assert not any(REAL in r.reason for r in rows)


def test_probe_judge_fails_on_a_raw_value_or_an_answered_placeholder():
    from risoluto.plugins.egress.broker_probes import judge_for

    judge = judge_for(["API_TOKEN"], {"API_TOKEN": "api.test:443"}, {"API_TOKEN": REAL})
    good = "env:API_TOKEN=placeholder\nrefuse:API_TOKEN=403 credential_not_allowed\n"
    assert judge(good, 0).status == "PASS"
    leaked = judge(good + f"SOMEVAR={REAL}\n", 0)
    assert leaked.status == "FAIL" and "readable inside the worker" in leaked.reason and REAL not in leaked.reason
    raw = judge("env:API_TOKEN=other\nrefuse:API_TOKEN=403 credential_not_allowed\n", 0)
    assert raw.status == "FAIL" and "not a placeholder" in raw.reason
    answered = judge("env:API_TOKEN=placeholder\nrefuse:API_TOKEN=200 none\n", 0)
    assert answered.status == "FAIL" and "200 none" in answered.reason
    locked = judge_for(["API_TOKEN"], {"API_TOKEN": "api.test:443"}, {"API_TOKEN": None})(good, 0)
    assert locked.status == "WARN"


async def test_origin_closing_keep_alive_is_reopened_to_the_same_address(tmp_path):
    """The worker keeps its connection when the origin says close or drops an idle connection: the
    next request goes over a new connection to the address the proxy checked."""
    async with broker_env(tmp_path) as env:
        auth = [("Authorization", f"Bearer {placeholder(env)}")]
        async with session(env) as s:
            assert (await s.request("GET", "/close"))[0] == 200
            status, _, body, _ = await s.request("GET", "/v1/after-close", auth)
            assert status == 200 and json.loads(body)["headers"]["authorization"] == f"Bearer {REAL}"
            assert (await s.request("GET", "/idle-close"))[0] == 200
            await anyio.sleep(0.6)  # the origin has dropped it meanwhile
            status, _, body, _ = await s.request("GET", "/v1/after-idle", auth)
            assert status == 200 and json.loads(body)["headers"]["authorization"] == f"Bearer {REAL}"
        assert env.upstream.connections == 3
        assert [r["target"] for r in env.upstream.requests] == ["/close", "/v1/after-close", "/idle-close",
                                                                 "/v1/after-idle"]


async def test_large_body_passes_whole_and_the_connections_stay_usable(tmp_path):
    """A large Content-Length body takes the pass-through path: every byte arrives, then both
    connections carry the next request (the origin connection is reused, not reopened)."""
    async with broker_env(tmp_path) as env:
        auth = [("Authorization", f"Bearer {placeholder(env)}")]
        async with session(env) as s:
            for size in (8 * 1024 * 1024 + 7, 3 * 1024 * 1024):
                status, got, body, _ = await s.request("GET", f"/big/{size}", auth)
                assert status == 200 and len(body) == size and body == b"x" * size
                assert got["content-length"] == str(size)
            status, _, body, _ = await s.request("GET", "/v1/after", auth)
            assert status == 200 and json.loads(body)["headers"]["authorization"] == f"Bearer {REAL}"
        assert env.upstream.connections == 1
        assert [r["target"] for r in env.upstream.requests][-1] == "/v1/after"


def test_a_spec_carrying_a_brokered_value_is_refused():
    from risoluto.errors import ApiError
    from risoluto.hookspecs.sandbox import ContainerSpec
    from risoluto.plugins.sandbox._launcher import _no_brokered_value

    clean = ContainerSpec(name="n", image="i", env={"API_TOKEN": "risoluto-placeholder-API_TOKEN-" + "0" * 32})
    _no_brokered_value(clean, {"API_TOKEN": REAL})
    for spec in (ContainerSpec(name="n", image="i", env={"OTHER": f"x{REAL}x"}),
                 ContainerSpec(name="n", image="i", files={"/home/agent/.codex-runtime/auth.json": REAL.encode()})):
        with pytest.raises(ApiError) as err:
            _no_brokered_value(spec, {"API_TOKEN": REAL})
        assert err.value.status == 400 and err.value.code == "secret_exposed" and REAL not in str(err.value.message)


# -- the decision audit and egress.rules inside terminated connections ---------------------------


async def test_each_terminated_request_is_one_audit_line_with_names_bytes_and_no_values(tmp_path):
    async with broker_env(tmp_path) as env:
        ph = placeholder(env)
        async with session(env) as s:
            status, _, body, _ = await s.request("GET", "/v1/models?page=2&q=x", [("Authorization", f"Bearer {ph}")])
            assert status == 200 and json.loads(body)["headers"]["authorization"] == f"Bearer {REAL}"
            down_first = len(body)
            assert (await s.request("POST", "/v1/chat", [("Authorization", f"Bearer {ph}")], b"hello"))[0] == 200
            assert (await s.request("GET", "/chunked", [("X-Other", "1")]))[0] == 200
            status, _, body, _ = await s.request("GET", "/anything", [
                ("Authorization", f"Bearer {ph}"), ("X-Api-Key", placeholder(env, name="KEY_HEADER"))])
            assert status == 403  # /anything is not a path of API_TOKEN's entry: refused whole
        async with session(env, "sbx-b") as s:  # sandbox A's placeholder from sandbox B
            assert (await s.request("GET", "/v1/models", [("Authorization", f"Bearer {ph}")]))[0] == 403
        # a placeholder over plain HTTP, in the query string: the proxy's own line, no query, no placeholder
        cred = base64.b64encode(f"sbx-a:{SECRETS['sbx-a']}".encode()).decode()
        with anyio.fail_after(5):
            stream = await anyio.connect_tcp("127.0.0.1", env.port)
            async with stream:
                await stream.send(f"GET http://plain.test:{env.uport}/q?token={ph} HTTP/1.1\r\nHost: plain.test\r\n"
                                  f"Proxy-Authorization: Basic {cred}\r\n\r\n".encode())
                assert (await stream.receive()).startswith(b"HTTP/1.1 403")
        records = env.lines()
        assert env.leaks() == []
        assert [(r["sandbox"], r["verdict"], r["reason"], r["method"], r["path"], r["credential"]) for r in records] == [
            ("sbx-a", "allow", "credential_host", None, None, None),
            ("sbx-a", "allow", "credential_injected", "GET", "/v1/models", "API_TOKEN"),
            ("sbx-a", "allow", "credential_injected", "POST", "/v1/chat", "API_TOKEN"),
            ("sbx-a", "allow", "forwarded", "GET", "/chunked", None),
            ("sbx-a", "deny", "credential_not_allowed", "GET", "/anything", "API_TOKEN"),
            ("sbx-b", "allow", "credential_host", None, None, None),
            ("sbx-b", "deny", "credential_not_allowed", "GET", "/v1/models", "API_TOKEN"),
            ("sbx-a", "deny", "credential_not_allowed", "GET", "/q", "API_TOKEN"),
        ]
        first, post, chunked = records[1], records[2], records[3]
        assert (first["host"], first["port"], first["sni"]) == ("api.test", env.uport, "api.test")
        assert first["bytes_up"] == 0 and first["bytes_down"] == down_first and first["duration_ms"] >= 0
        assert post["bytes_up"] == len(b"hello") and post["bytes_down"] > 0 and chunked["bytes_down"] > 0
        assert first["rule"] == f"api.test:{env.uport}"  # what admitted the connection
        assert all(r["bytes_up"] == r["bytes_down"] == 0 for r in records if r["verdict"] == "deny")
        assert [r["target"] for r in env.upstream.requests] == ["/v1/models?page=2&q=x", "/v1/chat", "/chunked"]
        # the decisions counter agrees with the lines
        assert env.metric("risoluto_egress_decisions_total", verdict="allow", reason="credential_injected") == 2
        assert env.metric("risoluto_egress_decisions_total", verdict="deny", reason="credential_not_allowed") == 3


def deny_admin(uport: int) -> dict[str, Any]:
    return {"rules": [
        {"hosts": [f"api.test:{uport}"], "methods": ["GET", "POST"], "paths": ["/v1/admin", "/v1/admin/*"],
         "verdict": "deny"},
        {"hosts": [f"api.test:{uport}"], "paths": ["/admin"], "verdict": "allow"},
    ]}


async def test_a_deny_rule_refuses_that_path_inside_a_terminated_connection_and_not_another(tmp_path):
    async with broker_env(tmp_path, deny_admin) as env:
        auth = [("Authorization", f"Bearer {placeholder(env)}")]
        refused = {}
        for target in ("/v1/admin", "/v1/admin/users?x=1", "/v1/%61dmin"):  # percent-encoding does not slip by
            async with session(env) as s:
                status, got, body, _ = await s.request("GET", target, auth)
            refused[target] = (status, got.get("x-risoluto-egress"), got.get("content-type"), body.decode())
        for target, (status, reason, ctype, text) in refused.items():
            assert (status, reason, ctype) == (403, "rule_deny", "text/plain; charset=utf-8"), target
            assert text.startswith(f"Network access to GET {target.split('?')[0]} on api.test") and "rules[" not in text
            assert REAL not in text and "operator" in text
        async with session(env) as s:  # a dot segment cannot walk around the rule either
            status, got, body, _ = await s.request("GET", "/v1/x/%2e%2e/admin", auth)
        assert (status, got.get("x-risoluto-egress")) == (403, "path_not_plain")
        async with session(env) as s:  # another path on the same host and connection kind: served
            status, _, body, _ = await s.request("GET", "/v1/models", auth)
            assert status == 200 and json.loads(body)["headers"]["authorization"] == f"Bearer {REAL}"
            # an allow rule grants nothing beyond the credential's entry (/admin is not one of its paths)
            status, got, _, _ = await s.request("GET", "/admin", auth)
            assert (status, got.get("x-risoluto-egress")) == (403, "credential_not_allowed")
        assert [r["target"] for r in env.upstream.requests] == ["/v1/models"]  # nothing else went upstream
        records = [r for r in env.lines() if r["reason"] != "credential_host"]
        assert [(r["verdict"], r["reason"], r["path"], r["rule"]) for r in records] == [
            ("deny", "rule_deny", "/v1/admin", "rules[0]"),
            ("deny", "rule_deny", "/v1/admin/users", "rules[0]"),
            ("deny", "rule_deny", "/v1/%61dmin", "rules[0]"),
            ("deny", "path_not_plain", "/v1/x/%2e%2e/admin", None),
            ("allow", "credential_injected", "/v1/models", f"api.test:{env.uport}"),
            ("deny", "credential_not_allowed", "/admin", None),
        ]
        assert env.leaks() == []
        assert env.metric("risoluto_egress_brokered_requests_total", outcome="rule_deny") == 3


async def test_the_decisions_api_shows_the_brokers_records(tmp_path):
    """The broker writes through the proxy's audit, which in a server is the kernel's: the API
    lists its per-request lines (a refusal by a rule and an injection) like any other."""
    from risoluto.app import kernel_of
    from risoluto.testing import running_app

    app_dir = tmp_path / "app"
    settings = build_settings({}, None, {"DATA_DIR": str(app_dir)})
    async with running_app(settings, environ={"DATA_DIR": str(app_dir)}) as app:
        audit = audit_for(kernel_of(app.app))
        async with broker_env(tmp_path, deny_admin, audit=audit) as env:
            auth = [("Authorization", f"Bearer {placeholder(env)}")]
            async with session(env) as s:
                assert (await s.request("GET", "/v1/models", auth))[0] == 200
                assert (await s.request("POST", "/v1/admin", auth, b"x"))[0] == 403
        client = app.test_client()
        response = await client.get("/api/v1/egress/decisions?sandbox=sbx-a&verdict=deny")
        assert response.status_code == 200
        body = await response.get_data()
        denied = json.loads(body)["decisions"]
        assert [(d["reason"], d["method"], d["path"], d["rule"]) for d in denied] == [
            ("rule_deny", "POST", "/v1/admin", "rules[0]")]
        response = await client.get("/api/v1/egress/decisions?sandbox=sbx-a&verdict=allow")
        allowed = json.loads(await response.get_data())["decisions"]
        assert [(d["reason"], d["credential"]) for d in allowed] == [("credential_injected", "API_TOKEN"),
                                                                     ("credential_host", None)]
        assert REAL.encode() not in body and placeholder(env).encode() not in body
