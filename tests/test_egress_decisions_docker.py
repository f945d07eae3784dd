"""Egress decisions from real workers on a real Docker engine (runc and runsc).

The targets (HTTP, TLS with a throwaway CA, DNS) are the servers of ``test_egress_docker``,
in a network namespace this test creates. Workers run curl and python3; the test reads the
audit file, the decisions API and its event stream, and answers approvals through the API.
"""

from __future__ import annotations

import collections

import hashlib
import json
import os
import time
from datetime import datetime
from typing import Any

import anyio
import pytest

from docker_util import docker_engine, logs, sandbox_world  # noqa: F401
from risoluto.plugins.egress._approvals import approvals_for
from test_egress_docker import ALLOW, CURL, Env, egress_env, results

pytestmark = [pytest.mark.anyio, pytest.mark.docker]

FIELDS = {"at", "sandbox", "issue", "host", "port", "sni", "method", "path", "verdict", "reason", "rule",
          "credential", "bytes_up", "bytes_down", "duration_ms", "approval", "principal"}
BIG = 48 * 1024 * 1024


def audit_lines(env: Env, sandbox: str | None = None) -> list[dict[str, Any]]:
    from risoluto.plugins.egress._audit import audit_for

    audit = audit_for(env.kernel)
    audit.close()  # what is queued is on disk after this
    text = (env.kernel.settings.data_path / "egress-audit.log").read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    for line in lines:
        assert set(line) == FIELDS and line["verdict"] in ("allow", "deny", "ask"), line
    return [x for x in lines if sandbox is None or x["sandbox"] == sandbox]


async def set_overlay(env: Env, egress: dict[str, Any]) -> None:
    response = await env.client.put("/api/v1/config/overlay",
                                    json={"codex": {"sandbox": {"egressAllowlist": ALLOW}}, "egress": egress})
    assert response.status_code == 200, await response.get_json()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def script(env: Env, *lines: str) -> str:
    ca = env.targets.ca.ca_path.read_text()
    head = [f"cat > /tmp/ca.pem <<'EOF'\n{ca}EOF",
            "c() { name=$1; shift; out=$(" + CURL + " \"$@\" 2>/dev/null); rc=$?; echo \"$name=$out rc$rc\"; }"]
    return "\n".join([*head, *lines, "echo done=1"])


async def pending(env: Env, host: str, sandbox: str, timeout: float = 60) -> dict[str, Any]:
    with anyio.fail_after(timeout):
        while True:
            response = await env.client.get("/api/v1/egress/approvals")
            found = [a for a in (await response.get_json())["approvals"]
                     if a["host"] == host and a["sandbox"] == sandbox]
            if found:
                return found[0]
            await anyio.sleep(0.1)


async def answer(env: Env, approval: dict[str, Any], decision: str) -> int:
    response = await env.client.post(f"/api/v1/egress/approvals/{approval['id']}", json={"decision": decision})
    return response.status_code


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
async def test_every_policy_decision_leaves_one_line_and_streams_within_a_second(
        sandbox_world: Any, runtime: str) -> None:  # noqa: F811
    async with egress_env(sandbox_world, runtime) as env:
        # pinned.test is on the allowlist AND the deny list: deny wins
        await set_overlay(env, {"deny": ["pinned.test"],
                                "rules": [{"hosts": ["allowed.test"], "paths": ["/blocked/*"], "verdict": "deny"}]})
        received: list[tuple[float, dict[str, Any]]] = []
        async with anyio.create_task_group() as tg:
            async def listen() -> None:
                stream = env.client.request("/api/v1/egress/decisions/stream",
                                            scope_base={"client": ("127.0.0.1", 5)})
                async with stream as conn:
                    await conn.send_complete()
                    buf = b""
                    while True:
                        buf += await conn.receive()
                        while b"\n\n" in buf:
                            event, buf = buf.split(b"\n\n", 1)
                            for line in event.decode().splitlines():
                                if line.startswith("data: "):
                                    received.append((time.time(), json.loads(line[6:])))

            tg.start_soon(listen)
            ip = env.targets.ns.ns_ip
            box = await env.launch("DEC-A", script(
                env,
                "c tunnel --cacert /tmp/ca.pem https://allowed.test/",
                "c unlisted http://unlisted.test/",
                f"c ip_literal http://{ip}/",
                "c deny_listed http://pinned.test/",
                "c rule_hit http://allowed.test/blocked/x",
                "echo \"body=$(curl -sS http://other.test/ 2>/dev/null | tr '\\n' ' ')\"",
                f"echo big=$(curl -sS --cacert /tmp/ca.pem https://allowed.test/big/{BIG} | sha256sum | cut -c1-64)",
            ), wait=True)
            out = results(await logs(env.client, box["id"]))
            await anyio.sleep(1.0)
            tg.cancel_scope.cancel()
        lines = audit_lines(env, box["id"])
    assert box["runtime"] == runtime and out.get("done") == "1", out
    assert out["tunnel"].startswith("200/200"), out
    for name in ("unlisted", "ip_literal", "deny_listed", "rule_hit"):
        assert out[name].startswith("403/"), (name, out[name])
    # the refusal body: plain words for whoever reads it, no internal detail
    assert out["body"].startswith("Network access to other.test was refused"), out["body"]
    assert "will not help" in out["body"] and "ask the operator" in out["body"] and ip not in out["body"]
    # a byte-exact large transfer through the (zero-copy) tunnel
    assert out["big"] == hashlib.sha256(b"x" * BIG).hexdigest()
    kinds = [(x["verdict"], x["reason"], x["host"]) for x in lines]
    assert kinds == [
        ("allow", "allowlist", "allowed.test"), ("deny", "host_not_allowed", "unlisted.test"),
        ("deny", "ip_literal_not_allowed", ip), ("deny", "deny_listed", "pinned.test"),
        ("deny", "rule_deny", "allowed.test"), ("deny", "host_not_allowed", "other.test"),
        ("allow", "allowlist", "allowed.test"),
    ], kinds
    assert all(x["issue"] == "DEC-A" for x in lines)
    tunnel, big = lines[0], lines[-1]
    assert (tunnel["sni"], tunnel["port"], tunnel["method"], tunnel["rule"]) == ("allowed.test", 443, None,
                                                                                  "allowed.test")
    assert big["bytes_down"] > BIG and big["bytes_up"] > 0 and big["duration_ms"] >= 0
    assert (lines[4]["method"], lines[4]["path"], lines[4]["rule"]) == ("GET", "/blocked/x", "rules[0]")
    assert lines[3]["rule"] == "deny:pinned.test"
    # the stream delivered every one of them, each within a second of the decision
    streamed = [(t, d) for t, d in received if d["sandbox"] == box["id"]]
    assert [d["reason"] for _, d in streamed] == [x["reason"] for x in lines]
    for t, d in streamed:
        at = datetime.fromisoformat(d["at"].replace("Z", "+00:00")).timestamp()
        assert t - at < 1.0, d


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
async def test_approvals_from_real_workers(sandbox_world: Any, runtime: str) -> None:  # noqa: F811
    # ask (looser than deny) and the flood's name pins (deploy-time) come from the config file
    def ask_and_pins(t: Any) -> dict[str, Any]:
        pins = {f"h{i}.flood.test": t.ns.ns_ip for i in range(1000)}
        return {"onUnlisted": "ask", "askTimeoutSeconds": 20, "hosts": {"pinned.test": t.ns.ns_ip, **pins}}

    async with egress_env(sandbox_world, runtime, ask_and_pins) as env:
        held = await env.launch("DEC-B", script(
            env,
            "c once http://unlisted.test/once",
            "c issue --cacert /tmp/ca.pem https://other.test/",
            "c denied http://unlisted.test/denied",
            "c late -m 40 http://unlisted.test/late",  # curl waits longer than the proxy holds
        ))
        first = await pending(env, "unlisted.test", held["id"])
        # while that request is held, another sandbox's allowed traffic goes through at once
        other = await env.launch("DEC-E", script(env, "c ok http://allowed.test/"), wait=True)
        assert results(await logs(env.client, other["id"]))["ok"].startswith("200/")
        still = [a["id"] for a in approvals_for(env.kernel).list()]
        assert first["id"] in still  # it was still held all along
        assert await answer(env, first, "allow-once") == 200
        assert await answer(env, await pending(env, "other.test", held["id"]), "allow-issue") == 200
        assert await answer(env, await pending(env, "unlisted.test", held["id"]), "deny") == 200
        late = await pending(env, "unlisted.test", held["id"])  # nobody answers this one
        out = await env.output(held, "done=1")
        assert await answer(env, late, "allow-once") == 404  # timed out: gone, and it was denied
        # allow-issue: the next sandbox of DEC-B gets other.test without asking; DEC-C does not
        foreign = await env.launch("DEC-C", script(env, "c issue --cacert /tmp/ca.pem https://other.test/"))
        same = await env.launch("DEC-B", script(env, "c issue --cacert /tmp/ca.pem https://other.test/"), wait=True)
        foreign_ask = await pending(env, "other.test", foreign["id"])
        assert await answer(env, foreign_ask, "deny") == 200
        foreign_out = await env.output(foreign, "done=1")
        same_out = results(await logs(env.client, same["id"]))
        assert same["policy"]["egressIssueHosts"] == ["other.test"]

        # a flood of 1000 unlisted hosts from one sandbox: never more than 16 held, the rest refused at
        # once, and the kernel's memory stays put (names pinned to the target, as a resolver would answer)
        rss_before = rss_bytes()
        flood = await env.launch("DEC-F", script(env, "python3 - <<'EOF'\n" + FLOOD_PY + "EOF"))
        peak = 0
        with anyio.fail_after(120):
            while "flood=" not in await logs(env.client, flood["id"]):
                peak = max(peak, len([a for a in approvals_for(env.kernel).list() if a["sandbox"] == flood["id"]]))
                await anyio.sleep(0.05)
        approvals_for(env.kernel).cancel_all()
        flood_out = await env.output(flood, "done=1")
        rss_growth = rss_bytes() - rss_before

        # the server stops while a request is held: it is denied, and the old id means nothing
        restart = await env.launch("DEC-R", script(env, "c held http://unlisted.test/held"))
        waiting = await pending(env, "unlisted.test", restart["id"])
        await env.kernel.backends.egress.stop()
        restart_out = await env.output(restart, "done=1")
        assert await answer(env, waiting, "allow-once") == 404

        lines = audit_lines(env)
        metrics = env.kernel.metrics_registry
    assert out["once"].startswith("200/") and out["issue"].startswith("200/200"), out
    assert out["denied"].startswith("403/") and out["late"].startswith("403/"), out
    assert same_out["issue"].startswith("200/200"), same_out
    assert "/403" in foreign_out["issue"] and not foreign_out["issue"].endswith("rc0"), foreign_out
    mine = [(x["verdict"], x["reason"], x["host"]) for x in lines if x["sandbox"] == held["id"]]
    assert mine == [
        ("ask", "approval_pending", "unlisted.test"), ("allow", "approved_once", "unlisted.test"),
        ("ask", "approval_pending", "other.test"), ("allow", "approved_for_issue", "other.test"),
        ("ask", "approval_pending", "unlisted.test"), ("deny", "approval_denied", "unlisted.test"),
        ("ask", "approval_pending", "unlisted.test"), ("deny", "approval_timeout", "unlisted.test"),
    ], mine
    answered = [x for x in lines if x["sandbox"] == held["id"] and x["verdict"] != "ask"]
    assert [x["principal"] for x in answered] == ["loopback", "loopback", "loopback", None]
    assert [x["reason"] for x in lines if x["sandbox"] == same["id"]] == ["issue_allowlist"]
    assert [x["reason"] for x in lines if x["sandbox"] == foreign["id"]] == ["approval_pending", "approval_denied"]
    assert [x["reason"] for x in lines if x["sandbox"] == other["id"]] == ["allowlist"]
    # the flood: bounded
    assert peak <= 16 and int(flood_out["flood"]) == 1000, (peak, flood_out)
    assert rss_growth < 64 * 1024 * 1024, rss_growth
    flood_reasons = [x["reason"] for x in lines if x["sandbox"] == flood["id"]]
    flood_hosts = {x["host"] for x in lines if x["sandbox"] == flood["id"]}
    seen = collections.Counter((str(x["sandbox"])[:6], x["reason"]) for x in lines)
    assert len(flood_hosts) > 100, seen  # many distinct hosts tried
    assert "approval_queue_full" in flood_reasons or "too_many_connections" in flood_reasons
    assert metrics.get_sample_value("risoluto_egress_pending_approvals", {}) == 0
    # the restart
    assert restart_out["held"].startswith("403/"), restart_out
    assert [x["reason"] for x in lines if x["sandbox"] == restart["id"]] == ["approval_pending", "approval_cancelled"]


# 1000 CONNECTs to distinct unlisted hosts, 18 open at a time: below the per-sandbox connection cap
# (egress.maxConnections 40 / 2), so every one reaches a decision (16 held, the rest refused as the
# approval queue is full) instead of racing for a free connection; prints how many got an answer (a
# refusal) or were closed.
FLOOD_PY = r"""
import base64, os, socket, concurrent.futures
proxy = os.environ["HTTPS_PROXY"][len("http://"):]
cred, hostport = proxy.rsplit("@", 1)
host, port = hostport.rsplit(":", 1)
auth = base64.b64encode(cred.encode()).decode()
def one(i):
    try:
        s = socket.create_connection((host, int(port)), timeout=30)
        s.sendall(f"CONNECT h{i}.flood.test:443 HTTP/1.1\r\nProxy-Authorization: Basic {auth}\r\n\r\n".encode())
        s.recv(4096); s.close()
    except OSError:
        pass
    return 1
with concurrent.futures.ThreadPoolExecutor(18) as pool:
    print(f"flood={sum(pool.map(one, range(1000)))}", flush=True)
"""
