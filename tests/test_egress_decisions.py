"""Egress decisions on loopback, no Docker: the audit file, the decisions API and its stream,
the deny list and HTTP rules, refusal bodies, and held approvals.

A real app (its routes, guards and services) and the egress proxy share one kernel; the
proxy listens on 127.0.0.1 and dials origins this test runs on 127.0.77.1 (names pinned with
``egress.hosts``, ``allowPrivateNetworks: [127.0.0.0/8]`` for the test only). Every request
that must be refused is actually sent.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import stat
import time
from typing import Any, AsyncIterator

import anyio
import attrs
import pytest

from egress_support import CA, exchange, start_origin
from risoluto.app import kernel_of
from risoluto.hookspecs import hookimpl
from risoluto.kernel import Kernel
from risoluto.plugins.egress._approvals import approvals_for, issue_hosts_for
from risoluto.plugins.egress._audit import LOG_NAME, Decision, EgressAudit, audit_for
from risoluto.plugins.egress._metrics import metrics_for
from risoluto.plugins.egress._hosts import Allowlist
from risoluto.plugins.egress._proxy import Client, EgressProxy
from risoluto.settings import EgressAuditConfig
from risoluto.testing import running_app

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(os.geteuid() != 0, reason="origins bind port 80 on 127.0.77.1 (root)"),
]

ORIGIN = "127.0.77.1"
SECRET = "s3cret-dec-" + "z" * 20
NAMES = ("allowed.test", "denied.test", "api.test", "unlisted.test", "second.test", "third.test")
FIELDS = {"at", "sandbox", "issue", "host", "port", "sni", "method", "path", "verdict", "reason", "rule",
          "credential", "bytes_up", "bytes_down", "duration_ms", "approval", "principal"}


class Decider:
    """A ``risoluto_egress_decide`` plugin whose answers the test sets per host."""

    def __init__(self) -> None:
        self.answers: dict[str, Any] = {}

    @hookimpl
    def risoluto_egress_decide(self, approval):
        answer = self.answers.get(approval.host)
        if isinstance(answer, Exception):
            raise answer
        if answer == "slow":
            time.sleep(3)
            return "allow-once"
        return answer


@attrs.define
class Env:
    client: Any
    kernel: Kernel
    proxy: EgressProxy
    port: int
    decider: Decider
    tmp: Any

    def lines(self) -> list[dict[str, Any]]:
        audit_for(self.kernel).close()
        path = self.tmp / LOG_NAME
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def register(self, sandbox: str, issue: str, allowlist: list[str], source: str = "127.0.0.1") -> str:
        self.proxy.register(Client(username=sandbox, secret=SECRET.encode(), sandbox=sandbox, issue=issue,
                                   addresses=frozenset({source}), allowlist=Allowlist(allowlist)))
        return sandbox

    async def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        response = await self.client.open(path, method=method, json=body)
        return response.status_code, json.loads(await response.get_data())


@contextlib.asynccontextmanager
async def env_for(tmp_path, egress: dict[str, Any] | None = None) -> AsyncIterator[Env]:
    from risoluto.settings import build_settings

    ca = CA(tmp_path)
    config = {"egress": {"allowPrivateNetworks": ["127.0.0.0/8"], "hosts": {n: ORIGIN for n in NAMES},
                         "idleTimeoutS": 5.0, "maxConnections": 64, **(egress or {})}}
    settings = build_settings(config, None, {"DATA_DIR": str(tmp_path)})
    decider = Decider()
    async with running_app(settings, plugins=(("decider", decider),), environ={"DATA_DIR": str(tmp_path)}) as app, \
            anyio.create_task_group() as tg:
        kernel = kernel_of(app.app)
        await start_origin(tg, ORIGIN, 80, "http")
        await start_origin(tg, ORIGIN, 443, "https", ca.server_context())
        proxy = EgressProxy(lambda: kernel.settings.egress, kernel.hooks.egress_decision, metrics_for(kernel),
                            audit=audit_for(kernel), approvals=approvals_for(kernel),
                            issue_hosts=issue_hosts_for(kernel), approve=kernel.hooks.egress_decide)
        _, port = await tg.start(proxy.serve, "127.0.0.1")
        env = Env(app.test_client(), kernel, proxy, port, decider, tmp_path)
        env.register("sbx-a", "ISS-1", ["allowed.test", "denied.test", "api.test"])
        yield env
        tg.cancel_scope.cancel()


def auth(user: str = "sbx-a") -> str:
    return "Proxy-Authorization: Basic " + base64.b64encode(f"{user}:{SECRET}".encode()).decode() + "\r\n"



async def get(env: Env, url: str, user: str = "sbx-a", method: str = "GET", **kw: Any) -> bytes:
    return await exchange(env.port, f"{method} {url} HTTP/1.1\r\nHost: x\r\n{auth(user)}\r\n".encode(), **kw)


async def connect(env: Env, target: str, user: str = "sbx-a", **kw: Any) -> bytes:
    """CONNECT and, once answered, close: enough for the decision (the ClientHello never comes)."""
    return await exchange(env.port, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth(user)}\r\n".encode(), **kw)


def status_of(response: bytes) -> tuple[int, str]:
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    reason = next((line.split(": ", 1)[1] for line in head.split("\r\n") if line.startswith("X-Risoluto-Egress")), "")
    return int(head.split(" ", 2)[1]), reason


def body_of(response: bytes) -> str:
    return response.split(b"\r\n\r\n", 1)[1].decode()


def well_formed(line: dict[str, Any]) -> None:
    assert set(line) == FIELDS, line
    assert line["verdict"] in ("allow", "deny", "ask") and line["reason"].replace("_", "").isalnum()
    assert line["at"].endswith("Z") and isinstance(line["bytes_up"], int) and isinstance(line["duration_ms"], int)


async def pending_for(env: Env, host: str) -> dict[str, Any]:
    with anyio.fail_after(5):
        while True:
            status, body = await env.api("GET", "/api/v1/egress/approvals")
            assert status == 200
            found = [a for a in body["approvals"] if a["host"] == host]
            if found:
                return found[0]
            await anyio.sleep(0.02)


# -- the audit file ---------------------------------------------------------------------------


async def test_each_decision_is_one_well_formed_line_in_a_private_file(tmp_path):
    async with env_for(tmp_path, {"deny": ["denied.test"],
                                  "rules": [{"hosts": ["api.test"], "methods": ["POST"], "verdict": "deny"}]}) as env:
        assert status_of(await get(env, "http://allowed.test/a?b=1")) [0] == 200
        assert status_of(await get(env, "http://unlisted.test/"))[1] == "host_not_allowed"
        assert status_of(await get(env, f"http://{ORIGIN}/"))[1] == "ip_literal_not_allowed"
        assert status_of(await get(env, "http://denied.test/"))[1] == "deny_listed"
        assert status_of(await get(env, "http://api.test/v1", method="POST"))[1] == "rule_deny"
        lines = env.lines()
    assert [(x["verdict"], x["reason"]) for x in lines] == [
        ("allow", "allowlist"), ("deny", "host_not_allowed"), ("deny", "ip_literal_not_allowed"),
        ("deny", "deny_listed"), ("deny", "rule_deny")]
    for line in lines:
        well_formed(line)
        assert (line["sandbox"], line["issue"]) == ("sbx-a", "ISS-1")
    allowed = lines[0]
    assert (allowed["host"], allowed["port"], allowed["method"], allowed["path"], allowed["rule"]) == (
        "allowed.test", 80, "GET", "/a?b=1", "allowed.test")
    assert allowed["bytes_down"] > 100 and allowed["bytes_up"] == 0  # a GET has no body
    assert lines[3]["rule"] == "deny:denied.test" and lines[4]["rule"] == "rules[0]"
    assert stat.S_IMODE(os.stat(tmp_path / LOG_NAME).st_mode) == 0o600
    assert SECRET not in (tmp_path / LOG_NAME).read_text()


async def test_a_tunnel_line_carries_its_sni_and_byte_counts(tmp_path):
    import ssl

    from anyio.streams.tls import TLSStream

    async with env_for(tmp_path) as env:
        stream = await anyio.connect_tcp("127.0.0.1", env.port)
        async with stream:
            await stream.send(f"CONNECT allowed.test:443 HTTP/1.1\r\n{auth()}\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive()
            ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
            tls = await TLSStream.wrap(stream, hostname="allowed.test", ssl_context=ctx, standard_compatible=False)
            await tls.send(b"GET /big/300000 HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
            got = b""
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, ssl.SSLError):
                while len(got) < 300000:
                    got += await tls.receive()
        with anyio.fail_after(5):
            while not audit_for(env.kernel).recent(lambda d: d.verdict == "allow", 1):
                await anyio.sleep(0.01)
        lines = env.lines()
    (line,) = lines
    well_formed(line)
    assert (line["verdict"], line["reason"], line["host"], line["port"], line["sni"]) == (
        "allow", "allowlist", "allowed.test", 443, "allowed.test")
    assert line["method"] is None and line["path"] is None  # inside TLS: not visible
    assert line["bytes_down"] > 300000 and line["bytes_up"] > 200  # ClientHello + request, encrypted


def test_rotation_keeps_the_newest_files(tmp_path):
    config = EgressAuditConfig(max_bytes=2000, keep=3)
    audit = EgressAudit(tmp_path / LOG_NAME, lambda: config)
    for i in range(200):
        audit.record(Decision(verdict="deny", reason="host_not_allowed", host=f"h{i:03}.test", port=443))
        if i % 20 == 19:
            audit.close()  # each close writes a batch: many rotations
    audit.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [LOG_NAME, f"{LOG_NAME}.1", f"{LOG_NAME}.2", f"{LOG_NAME}.3"]
    hosts = []
    for name in (f"{LOG_NAME}.3", f"{LOG_NAME}.2", f"{LOG_NAME}.1", LOG_NAME):
        path = tmp_path / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_size <= 2000
        hosts += [json.loads(line)["host"] for line in path.read_text().splitlines()]
    assert hosts[-1] == "h199.test"  # the newest survived
    assert hosts == sorted(hosts) and len(hosts) < 200  # in order, the oldest rotated away


def test_a_writer_that_falls_behind_drops_and_counts_never_blocks(tmp_path):
    from prometheus_client import CollectorRegistry

    from risoluto.plugins.egress._metrics import EgressMetrics

    metrics = EgressMetrics(CollectorRegistry())
    audit = EgressAudit(tmp_path / LOG_NAME, lambda: EgressAuditConfig(), metrics, queue_size=10)
    gate = __import__("threading").Event()
    real = audit._write
    audit._write = lambda lines: (gate.wait(10), real(lines))  # a stuck disk
    started = time.monotonic()
    for i in range(500):
        audit.record(Decision(verdict="allow", reason="allowlist", host=f"h{i}.test"))
    assert time.monotonic() - started < 1.0  # the hot path never waited for the disk
    assert audit.dropped >= 480
    assert metrics.audit_dropped._value.get() == audit.dropped
    gate.set()
    audit.close()
    written = (tmp_path / LOG_NAME).read_text().splitlines()
    assert len(written) + audit.dropped == 500  # every decision is either written or counted


async def test_the_doctor_says_when_lines_were_dropped(tmp_path):
    async with env_for(tmp_path) as env:
        audit = audit_for(env.kernel)
        status, body = await env.api("GET", "/api/v1/hardening")
        item = next(c for c in body["items"] if c["item"] == "egress audit")
        assert item["status"] == "PASS"
        audit._drop(3)
        status, body = await env.api("GET", "/api/v1/hardening")
        item = next(c for c in body["items"] if c["item"] == "egress audit")
        assert item["status"] == "WARN" and "3 decision line(s) were dropped" in item["reason"]
        audit.write_error = f"{tmp_path}: Permission denied"
        status, body = await env.api("GET", "/api/v1/hardening")
        item = next(c for c in body["items"] if c["item"] == "egress audit")
        assert item["status"] == "FAIL" and "cannot be written" in item["reason"]


# -- the decisions API --------------------------------------------------------------------------


async def test_decisions_api_filters_newest_first_and_refuses_bad_filters(tmp_path):
    async with env_for(tmp_path) as env:
        env.register("sbx-b", "ISS-2", ["allowed.test"], source="127.0.0.2")
        await get(env, "http://allowed.test/1")
        await get(env, "http://unlisted.test/2")
        await get(env, "http://allowed.test/3", user="sbx-b", source="127.0.0.2")
        status, body = await env.api("GET", "/api/v1/egress/decisions")
        assert status == 200 and [d["path"] for d in body["decisions"]] == ["/3", "/2", "/1"]
        status, body = await env.api("GET", "/api/v1/egress/decisions?sandbox=sbx-a&verdict=allow")
        assert [d["path"] for d in body["decisions"]] == ["/1"]
        status, body = await env.api("GET", "/api/v1/egress/decisions?issue=ISS-2")
        assert [d["sandbox"] for d in body["decisions"]] == ["sbx-b"]
        status, body = await env.api("GET", "/api/v1/egress/decisions?limit=2")
        assert len(body["decisions"]) == 2
        status, body = await env.api("GET", "/api/v1/egress/decisions?since=2999-01-01T00:00:00Z")
        assert body["decisions"] == []
        status, body = await env.api("GET", "/api/v1/egress/decisions?since=2000-01-01T00:00:00Z")
        assert len(body["decisions"]) == 3
        for query in ("verdict=maybe", "limit=0", "limit=1001", "limit=x", "since=yesterday", "colour=red",
                      "sandbox=a&sandbox=b"):
            status, body = await env.api("GET", f"/api/v1/egress/decisions?{query}")
            assert (status, body["error"]["code"]) == (400, "invalid_filter"), query
        # the API is read-guarded like every /api route: a remote reader without a token is refused
        response = await env.client.open("/api/v1/egress/decisions", scope_base={"client": ("198.51.100.7", 1)})
        assert response.status_code in (401, 403)


async def test_the_stream_delivers_a_decision_within_a_second(tmp_path):
    async with env_for(tmp_path) as env:
        stream = env.client.request("/api/v1/egress/decisions/stream", scope_base={"client": ("127.0.0.1", 5)})
        async with stream as conn:
            await conn.send_complete()
            first = await conn.receive()  # the stream is open (a comment line)
            assert first.startswith(b":")
            sent = time.monotonic()
            await get(env, "http://unlisted.test/streamed")
            data = b""
            with anyio.fail_after(1.0):
                while b"\n\n" not in data:
                    data += await conn.receive()
            assert time.monotonic() - sent < 1.0
            await conn.disconnect()
        event = dict(line.split(": ", 1) for line in data.decode().strip().splitlines())
        assert event["event"] == "decision"
        decision = json.loads(event["data"])
        assert (decision["verdict"], decision["reason"], decision["path"]) == ("deny", "host_not_allowed", "/streamed")


# -- deny list, rules, refusal bodies ------------------------------------------------------------


async def test_deny_beats_every_allow(tmp_path):
    egress = {"deny": ["denied.test", "*.denied.test"],
              "rules": [{"hosts": ["denied.test"], "verdict": "allow"}]}
    async with env_for(tmp_path, egress) as env:  # denied.test is also on the sandbox's allowlist
        assert status_of(await get(env, "http://denied.test/"))[:2] == (403, "deny_listed")
        assert status_of(await connect(env, "denied.test:443")) == (403, "deny_listed")
        assert status_of(await connect(env, "denied.test:8443")) == (403, "deny_listed")  # every port
        assert status_of(await get(env, "http://allowed.test/"))[0] == 200


async def test_http_rules_first_match_wins_and_no_match_falls_back_to_the_allowlist(tmp_path):
    egress = {"rules": [
        {"hosts": ["api.test"], "methods": ["GET"], "paths": ["/public/*"], "verdict": "allow"},
        {"hosts": ["api.test"], "verdict": "deny"},
        {"hosts": ["second.test"], "methods": ["get"], "paths": ["/only"], "verdict": "allow"},
    ]}
    async with env_for(tmp_path, egress) as env:
        assert status_of(await get(env, "http://api.test/public/x?y=1"))[0] == 200
        assert status_of(await get(env, "http://api.test/private")) == (403, "rule_deny")
        assert status_of(await get(env, "http://api.test/public/x", method="DELETE")) == (403, "rule_deny")
        # an allow rule grants that method and path of an unlisted host, nothing else of it
        assert status_of(await get(env, "http://second.test/only"))[0] == 200
        assert status_of(await get(env, "http://second.test/other")) == (403, "host_not_allowed")
        # no rule matches: the allowlist decides
        assert status_of(await get(env, "http://allowed.test/any"))[0] == 200
        lines = env.lines()
    assert [x["rule"] for x in lines] == ["rules[0]", "rules[1]", "rules[1]", "rules[2]", None, "allowed.test"]



async def test_rules_compare_the_decoded_path_and_refuse_one_that_could_walk_around_them(tmp_path):
    egress = {"rules": [{"hosts": ["api.test"], "paths": ["/admin", "/admin/*"], "verdict": "deny"}]}
    async with env_for(tmp_path, egress) as env:
        assert status_of(await get(env, "http://api.test/%61dmin/x")) == (403, "rule_deny")
        for path in ("/public/../admin", "/public/%2e%2e/admin", "/public/..%5cadmin"):
            response = await get(env, f"http://api.test{path}")
            assert status_of(response) == (403, "path_not_plain"), path
            assert "rules for that host cannot be checked" in body_of(response) and "rules[" not in body_of(response)
        assert status_of(await get(env, "http://api.test/public/x"))[0] == 200
        # a host no rule names: its paths are not inspected (the allowlist decides, as before)
        assert status_of(await get(env, "http://allowed.test/a/../b"))[0] == 200
        lines = env.lines()
    assert [(x["reason"], x["rule"]) for x in lines] == [
        ("rule_deny", "rules[0]"), ("path_not_plain", None), ("path_not_plain", None), ("path_not_plain", None),
        ("allowlist", "api.test"), ("allowlist", "allowed.test")]


async def test_refusal_bodies_are_one_plain_paragraph_for_a_person(tmp_path):
    async with env_for(tmp_path, {"deny": ["denied.test"],
                                  "rules": [{"hosts": ["api.test"], "paths": ["/admin"], "verdict": "deny"}]}) as env:
        cases = {
            "unlisted.test": await get(env, "http://unlisted.test/"),
            "denied.test": await connect(env, "denied.test:443"),
            "GET /admin on api.test": await get(env, "http://api.test/admin"),
        }
        for what, response in cases.items():
            head = response.split(b"\r\n\r\n", 1)[0].decode()
            assert "Content-Type: text/plain; charset=utf-8" in head
            body = body_of(response)
            assert body.count("\n") == 1 and body.endswith("\n") and len(body) < 600, body
            assert f"access to {what} was refused" in body
            assert "will not help" in body and "ask the operator" in body
            for internal in (ORIGIN, "127.", "rules[", "egress.", "allowPrivateNetworks", "Traceback"):
                assert internal not in body, (internal, body)


# -- approvals -----------------------------------------------------------------------------------


async def test_approvals_allow_once_allow_issue_deny_and_timeout(tmp_path):
    async with env_for(tmp_path, {"onUnlisted": "ask", "askTimeoutSeconds": 1.5}) as env:
        async with anyio.create_task_group() as tg:
            results: dict[str, bytes] = {}

            async def ask(host: str) -> None:
                results[host] = await get(env, f"http://{host}/x")

            tg.start_soon(ask, "unlisted.test")
            pending = await pending_for(env, "unlisted.test")
            assert (pending["sandbox"], pending["issue"], pending["port"]) == ("sbx-a", "ISS-1", 80)
            assert set(pending) == {"id", "sandbox", "issue", "host", "port", "asked_at", "expires_at"}
            status, body = await env.api("POST", f"/api/v1/egress/approvals/{pending['id']}", {"decision": "maybe"})
            assert (status, body["error"]["code"]) == (400, "invalid_decision")
            status, _ = await env.api("POST", f"/api/v1/egress/approvals/{pending['id']}", {"decision": "allow-once"})
            assert status == 200
        assert status_of(results["unlisted.test"])[0] == 200
        # allow-once granted nothing lasting: the next request asks again, and times out (deny)
        assert status_of(await get(env, "http://unlisted.test/again")) == (403, "approval_timeout")
        status, body = await env.api("POST", f"/api/v1/egress/approvals/{pending['id']}", {"decision": "allow-once"})
        assert (status, body["error"]["code"]) == (404, "approval_not_found")  # answered: unknown now

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, "second.test")
            pending = await pending_for(env, "second.test")
            await env.api("POST", f"/api/v1/egress/approvals/{pending['id']}", {"decision": "allow-issue"})
        assert status_of(results["second.test"])[0] == 200
        status, body = await env.api("GET", "/api/v1/egress/issues/ISS-1/hosts")
        assert body["hosts"] == ["second.test"]
        assert status_of(await get(env, "http://second.test/next"))[0] == 200  # no ask this time
        file = tmp_path / "egress-issue-hosts.json"
        assert stat.S_IMODE(file.stat().st_mode) == 0o600 and json.loads(file.read_text()) == {
            "issues": {"ISS-1": ["second.test"]}}

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, "third.test")
            pending = await pending_for(env, "third.test")
            await env.api("POST", f"/api/v1/egress/approvals/{pending['id']}", {"decision": "deny"})
        assert status_of(results["third.test"]) == (403, "approval_denied")
        assert "operator declined" in body_of(results["third.test"])

        status, body = await env.api("DELETE", "/api/v1/egress/issues/ISS-1/hosts/second.test")
        assert (status, body["hosts"]) == (200, [])
        status, body = await env.api("DELETE", "/api/v1/egress/issues/ISS-1/hosts/second.test")
        assert (status, body["error"]["code"]) == (404, "host_not_found")
        status, body = await env.api("POST", "/api/v1/egress/approvals/apr-0000", {"decision": "deny"})
        assert (status, body["error"]["code"]) == (404, "approval_not_found")
        lines = env.lines()
    kinds = [(x["verdict"], x["reason"], x["host"]) for x in lines]
    assert kinds == [
        ("ask", "approval_pending", "unlisted.test"), ("allow", "approved_once", "unlisted.test"),
        ("ask", "approval_pending", "unlisted.test"), ("deny", "approval_timeout", "unlisted.test"),
        ("ask", "approval_pending", "second.test"), ("allow", "approved_for_issue", "second.test"),
        ("allow", "issue_allowlist", "second.test"),
        ("ask", "approval_pending", "third.test"), ("deny", "approval_denied", "third.test"),
    ]
    for line in lines:
        well_formed(line)
    answered = [x for x in lines if x["reason"] in ("approved_once", "approved_for_issue", "approval_denied")]
    assert {x["principal"] for x in answered} == {"loopback"}  # who answered, from the write guard
    assert all(x["approval"] for x in lines if x["reason"] != "issue_allowlist")


async def test_allow_issue_applies_to_that_issue_only(tmp_path):
    async with env_for(tmp_path, {"onUnlisted": "ask", "askTimeoutSeconds": 0.5}) as env:
        await anyio.to_thread.run_sync(issue_hosts_for(env.kernel).add, "ISS-1", "second.test")
        env.register("sbx-other", "ISS-2", ["allowed.test"], source="127.0.0.3")
        env.register("sbx-next", "ISS-1", ["allowed.test"], source="127.0.0.4")
        assert status_of(await get(env, "http://second.test/", user="sbx-next", source="127.0.0.4"))[0] == 200
        assert status_of(await get(env, "http://second.test/", user="sbx-other", source="127.0.0.3")) == (
            403, "approval_timeout")


async def test_a_held_request_never_delays_others(tmp_path):
    async with env_for(tmp_path, {"onUnlisted": "ask", "askTimeoutSeconds": 10}) as env:
        env.register("sbx-b", "ISS-2", ["allowed.test"], source="127.0.0.2")
        async with anyio.create_task_group() as tg:
            tg.start_soon(get, env, "http://unlisted.test/")
            pending = await pending_for(env, "unlisted.test")
            started = time.monotonic()
            for _ in range(5):
                assert status_of(await get(env, "http://allowed.test/", user="sbx-b", source="127.0.0.2"))[0] == 200
                assert status_of(await get(env, "http://allowed.test/"))[0] == 200  # same sandbox too
            assert time.monotonic() - started < 3
            await env.api("POST", f"/api/v1/egress/approvals/{pending['id']}", {"decision": "deny"})


async def test_a_restart_while_held_denies(tmp_path):
    async with env_for(tmp_path, {"onUnlisted": "ask", "askTimeoutSeconds": 30}) as env:
        async with anyio.create_task_group() as tg:
            out: list[bytes] = []

            async def ask() -> None:
                out.append(await get(env, "http://unlisted.test/"))

            tg.start_soon(ask)
            pending = await pending_for(env, "unlisted.test")
            started = time.monotonic()
            await env.proxy.release_held()  # what the enforcer does at stop, before the proxy goes
        assert time.monotonic() - started < 2
        assert status_of(out[0]) == (403, "approval_cancelled")
        # the id is gone with the held request: a late answer finds nothing to allow
        status, body = await env.api("POST", f"/api/v1/egress/approvals/{pending['id']}", {"decision": "allow-once"})
        assert (status, body["error"]["code"]) == (404, "approval_not_found")


async def test_a_decider_plugin_answers_and_a_broken_one_denies(tmp_path):
    async with env_for(tmp_path, {"onUnlisted": "ask", "askTimeoutSeconds": 1.0}) as env:
        env.decider.answers = {"unlisted.test": "allow-once", "second.test": RuntimeError("boom"),
                               "third.test": "slow", "api.test": "yes please"}
        env.register("sbx-c", "ISS-3", [], source="127.0.0.3")
        assert status_of(await get(env, "http://unlisted.test/", user="sbx-c", source="127.0.0.3"))[0] == 200
        assert status_of(await get(env, "http://second.test/", user="sbx-c", source="127.0.0.3")) == (
            403, "decider_error")
        assert status_of(await get(env, "http://third.test/", user="sbx-c", source="127.0.0.3")) == (
            403, "approval_timeout")
        assert status_of(await get(env, "http://api.test/", user="sbx-c", source="127.0.0.3")) == (
            403, "decider_error")
        lines = [x for x in env.lines() if x["verdict"] != "ask"]
    assert lines[0]["principal"] == "plugin"


async def test_a_flood_of_unlisted_hosts_keeps_pending_bounded(tmp_path):
    names = [f"h{i}.flood.test" for i in range(1000)]
    egress = {"onUnlisted": "ask", "askTimeoutSeconds": 5, "maxConnections": 4096,
              "hosts": {**{n: ORIGIN for n in NAMES}, **{n: ORIGIN for n in names}}}
    async with env_for(tmp_path, egress) as env:
        peak = 0
        counts: dict[int, int] = {}

        async def one(host: str) -> None:
            response = await connect(env, f"{host}:443", timeout=30)
            counts[status_of(response)[0]] = counts.get(status_of(response)[0], 0) + 1

        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(one, name)
            with anyio.fail_after(20):
                while sum(counts.values()) < 1000 - 16:
                    peak = max(peak, len(approvals_for(env.kernel).list()))
                    await anyio.sleep(0.05)
            peak = max(peak, len(approvals_for(env.kernel).list()))
            assert peak <= 16
            status, body = await env.api("GET", "/api/v1/egress/approvals")
            assert len(body["approvals"]) <= 16
            env.proxy.approvals.cancel_all()
        assert counts == {403: 1000}
        assert env.kernel.metrics_registry.get_sample_value(
            "risoluto_egress_decisions_total", {"verdict": "deny", "reason": "approval_queue_full"}) >= 1000 - 16
        assert env.kernel.metrics_registry.get_sample_value("risoluto_egress_pending_approvals", {}) == 0


async def test_a_client_that_gives_up_withdraws_its_approval(tmp_path):
    async with env_for(tmp_path, {"onUnlisted": "ask", "askTimeoutSeconds": 30}) as env:
        stream = await anyio.connect_tcp("127.0.0.1", env.port)
        await stream.send(f"CONNECT unlisted.test:443 HTTP/1.1\r\n{auth()}\r\n".encode())
        await pending_for(env, "unlisted.test")
        await stream.aclose()
        with anyio.fail_after(2):  # the slot is freed at once, not at the timeout
            while approvals_for(env.kernel).list():
                await anyio.sleep(0.02)
        lines = env.lines()
    assert [(x["verdict"], x["reason"]) for x in lines] == [("ask", "approval_pending"), ("deny", "client_gone")]


async def test_bad_deny_and_rules_are_refused_at_startup_and_by_the_overlay(tmp_path):
    from risoluto.errors import ConfigError
    from risoluto.settings import build_settings

    for egress, where in (({"deny": ["ok.test", "*.com"]}, "egress.deny[1]"),
                          ({"rules": [{"hosts": ["a.test"], "paths": ["v1"]}]}, "egress.rules[0].paths[0]"),
                          ({"rules": [{"hosts": []}]}, "egress.rules[0].hosts"),
                          ({"rules": [{"hosts": ["a.test"], "verdict": "maybe"}]}, "egress.rules[0].verdict")):
        with pytest.raises(ConfigError, match=rf"^{re.escape(where)}"):
            Kernel(build_settings({"egress": egress}, None, {"DATA_DIR": str(tmp_path)}))
    async with env_for(tmp_path) as env:
        before = env.kernel.settings
        status, body = await env.api("PUT", "/api/v1/config/overlay",
                                     {"egress": {"rules": [{"hosts": ["*"], "verdict": "deny"}]}})
        assert (status, body["error"]["code"]) == (400, "invalid_config")
        assert "egress.rules[0].hosts[0]" in body["error"]["message"]
        assert env.kernel.settings is before  # nothing changed


async def test_answers_and_removals_are_write_guarded(tmp_path):
    async with env_for(tmp_path, {"onUnlisted": "ask", "askTimeoutSeconds": 5}) as env:
        await anyio.to_thread.run_sync(issue_hosts_for(env.kernel).add, "ISS-1", "second.test")
        async with anyio.create_task_group() as tg:
            out: list[bytes] = []

            async def ask() -> None:
                out.append(await get(env, "http://unlisted.test/"))

            tg.start_soon(ask)
            pending = await pending_for(env, "unlisted.test")
            remote = {"client": ("198.51.100.7", 4000)}
            response = await env.client.open(f"/api/v1/egress/approvals/{pending['id']}", method="POST",
                                             json={"decision": "allow-once"}, scope_base=remote)
            assert response.status_code in (401, 403)
            response = await env.client.open("/api/v1/egress/issues/ISS-1/hosts/second.test", method="DELETE",
                                             scope_base=remote)
            assert response.status_code in (401, 403)
            assert issue_hosts_for(env.kernel).entries("ISS-1") == ("second.test",)  # nothing changed
            await env.api("POST", f"/api/v1/egress/approvals/{pending['id']}", {"decision": "deny"})
        assert status_of(out[0]) == (403, "approval_denied")


def test_the_stream_through_a_real_server_is_unbuffered_and_never_holds_up_shutdown(tmp_path):
    import httpx

    from http_support import free_port
    from serve_util import RISOLUTO, operator_env, spawn, stop, wait_answering

    port = free_port()
    env = operator_env(DATA_DIR=str(tmp_path / "data"), RISOLUTO_PORT=str(port))
    proc = spawn([*RISOLUTO, "serve"], env)
    try:
        assert wait_answering(proc, f"http://127.0.0.1:{port}/api/v1/runtime") is not None
        with httpx.stream("GET", f"http://127.0.0.1:{port}/api/v1/egress/decisions/stream", timeout=5) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            first = next(response.iter_raw())  # sent at once, not held in a buffer
            assert first.startswith(b": risoluto egress decisions")
            started = time.monotonic()
            assert stop(proc) == 0  # with the stream still open
            assert time.monotonic() - started < 15
    finally:
        stop(proc)
