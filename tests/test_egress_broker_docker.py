"""Credential brokering with real workers on a real Docker engine (runc and runsc).

An HTTPS origin with its own CA (``egress.upstreamCaFile``) runs in a network namespace of
this test (reached by the host through a veth pair; ``egress.allowPrivateNetworks`` lists
that /30 only). ``api.test`` and ``other-api.test`` are credentialed, ``plain.test`` is only
allowlisted. Inside the worker curl and python3 talk HTTPS with certificate verification on
and nothing but the environment the sandbox got: the origin sees the real ``Authorization``,
the worker never can; every misuse of a placeholder is refused with nothing sent upstream.
The origin answers a digest of the ``Authorization`` it got, never the value.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
from typing import Any, AsyncIterator

import anyio
import pytest

from backend_support import lock_store, use_store
from broker_support import serve_upstream
from docker_util import docker_engine, logs, run, sandbox_world, wait_for_log  # noqa: F401
from egress_support import CA, TargetNamespace
from risoluto.plugins.egress._audit import audit_for

pytestmark = [pytest.mark.anyio, pytest.mark.docker]

KEY = "broker docker test master key"
REAL = "sk-real-" + hashlib.sha256(b"broker-docker").hexdigest()[:32]
ROTATED = "sk-rotated-" + hashlib.sha256(b"rotated").hexdigest()[:32]
OPENAI = "sk-openai-" + hashlib.sha256(b"openai").hexdigest()[:32]


def digest(value: str) -> str:
    return hashlib.sha256(f"Bearer {value}".encode()).hexdigest()


@contextlib.asynccontextmanager
async def broker_world(world: Any, runtime: str) -> AsyncIterator[tuple[Any, Any, Any, Any]]:
    ca = CA(world.tmp, ["api.test", "other-api.test", "plain.test"])
    with TargetNamespace() as ns:
        (sock,) = ns.sockets([(socket.SOCK_STREAM, 443)])
        async with anyio.create_task_group() as tg:
            upstream = await serve_upstream(tg, sock, ca.server_context())
            overrides = {
                "codex": {"sandbox": {"egressAllowlist": ["api.test", "other-api.test", "plain.test"],
                                      "security": {"gvisor": runtime == "runsc"}}},
                "egress": {
                    "hosts": {name: ns.ns_ip for name in ("api.test", "other-api.test", "plain.test")},
                    "allowPrivateNetworks": [ns.cidr], "idleTimeoutS": 10.0, "upstreamCaFile": str(ca.ca_path),
                    "credentials": [
                        {"secret": "API_TOKEN", "hosts": ["api.test"], "paths": ["/v1/*", "/sse"],
                         "methods": ["GET", "POST"]},
                        {"secret": "OTHER_TOKEN", "hosts": ["other-api.test"]},
                        {"secret": "OPENAI_API_KEY", "hosts": ["api.test"], "paths": ["/openai/*"]},
                    ],
                },
            }
            # Codex's auth.json carries an API key: the worker's copy must hold a placeholder
            (world.auth / "auth.json").write_text(json.dumps({"OPENAI_API_KEY": OPENAI, "tokens": None}))
            config_file = world.tmp / "config.yaml"
            config_file.write_text(json.dumps(world.config(overrides)))
            client, kernel = await world.app(overrides, env={"RISOLUTO_CONFIG": str(config_file), "MASTER_KEY": KEY})
            for name, value in (("API_TOKEN", REAL), ("OTHER_TOKEN", "sk-other-" + "o" * 24), ("OPENAI_API_KEY", OPENAI)):
                response = await client.put(f"/api/v1/secrets/{name}", json={"value": value})
                assert response.status_code == 204, await response.get_json()
            yield client, kernel, upstream, ca
            tg.cancel_scope.cancel()


CURL = "curl -sS --connect-timeout 5 -m 15"
SSE_PY = r"""
import os, time, urllib.request
req = urllib.request.Request("https://api.test/sse", headers={"Authorization": "Bearer " + os.environ["API_TOKEN"]})
t0, times = time.monotonic(), []
with urllib.request.urlopen(req, timeout=15) as r:
    for line in r:
        if line.startswith(b"data:"):
            times.append(round(time.monotonic() - t0, 2))
print("sse=" + ",".join(map(str, times)))
"""
PY_GET = r"""
import json, os, sys, urllib.request
req = urllib.request.Request("https://api.test/v1/py", headers={"Authorization": "Bearer " + os.environ["API_TOKEN"]})
with urllib.request.urlopen(req, timeout=15) as r:
    print("python=%d:%s" % (r.status, json.load(r)["authorization_sha256"]))
"""
PEER_PY = r"""
import os, socket, ssl, base64
proxy = os.environ["HTTPS_PROXY"][len("http://"):]
cred, hostport = proxy.rsplit("@", 1)
host, port = hostport.rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=10)
s.sendall(("CONNECT plain.test:443 HTTP/1.1\r\nProxy-Authorization: Basic %s\r\n\r\n"
           % base64.b64encode(cred.encode()).decode()).encode())
s.recv(4096)
ctx = ssl.create_default_context(cafile="/tmp/origin-ca.pem")
t = ctx.wrap_socket(s, server_hostname="plain.test")
issuer = dict(x[0] for x in t.getpeercert()["issuer"])
print("plain_issuer=" + issuer.get("commonName", "?"))
"""


def worker_script(ca_pem: str) -> str:
    c = 'c() { name=$1; shift; echo "$name=$(' + CURL + ' -o /dev/null -w "%{http_code}" "$@" 2>/dev/null)"; }'
    auth = '-H "Authorization: Bearer $API_TOKEN"'
    return "\n".join([
        f"cat > /tmp/sse.py <<'EOF'\n{SSE_PY}EOF",
        f"cat > /tmp/get.py <<'EOF'\n{PY_GET}EOF",
        f"cat > /tmp/peer.py <<'EOF'\n{PEER_PY}EOF",
        f"cat > /tmp/origin-ca.pem <<'EOF'\n{ca_pem}EOF",
        c,
        # everything the worker can read about itself goes to the log, which the test searches
        "echo env_value=$API_TOKEN",
        "echo --- environment; env; tr '\\0' '\\n' < /proc/self/environ; tr '\\0' '\\n' < /proc/1/environ",
        "echo --- files; cat $CODEX_HOME/* /etc/risoluto-ca/* 2>&1 | grep -v '^[A-Za-z0-9+/=]*$'",
        "echo bundle_certs=$(grep -c 'BEGIN CERTIFICATE' /etc/risoluto-ca/bundle.pem)",
        f"echo curl=$({CURL} {auth} https://api.test/v1/models)",
        "python3 /tmp/get.py",
        "key=$(python3 -c \"import json,os; print(json.load(open(os.environ['CODEX_HOME']+'/auth.json'))['OPENAI_API_KEY'])\")",
        "echo auth_key=$key",
        f'echo openai=$({CURL} -H "Authorization: Bearer $key" https://api.test/openai/models)',
        f"c wrong_path {auth} https://api.test/admin",
        f"c wrong_method -X DELETE {auth} https://api.test/v1/models",
        'c in_query "https://api.test/v1/models?key=$API_TOKEN"',
        "c other_header -H \"X-Token: $API_TOKEN\" https://api.test/v1/models",
        f"c wrong_host {auth} https://other-api.test/v1/models",
        'c other_sandbox -H "Authorization: Bearer $OTHER_PH" https://api.test/v1/models',
        'c ended_sandbox -H "Authorization: Bearer $ENDED_PH" https://api.test/v1/models',
        "c plain_untrusted https://plain.test/",
        "c plain_with_origin_ca --cacert /tmp/origin-ca.pem https://plain.test/",
        "python3 /tmp/peer.py",
        "python3 /tmp/sse.py",
        "echo phase1=done; sleep 8",
        f"echo rotated=$({CURL} {auth} https://api.test/v1/rotated)",
        "echo phase2=done; sleep 8",
        f"c locked {auth} https://api.test/v1/locked",
        "echo done=1",
    ])


def results(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith(" "))


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
async def test_brokered_secret_never_reaches_the_worker(sandbox_world: Any, runtime: str) -> None:  # noqa: F811
    async with broker_world(sandbox_world, runtime) as (client, kernel, upstream, ca):
        broker = kernel.backends.egress.proxy.broker
        sleeper = {"issue": "BRK-B", "command": ["sh", "-c", "echo ph=$API_TOKEN; sleep 100"], "secrets": ["API_TOKEN"]}
        other = await run(client, {**sleeper, "wait": False})
        other_ph = results(await wait_for_log(client, other["id"], "ph=", timeout=120))["ph"]
        ended = await run(client, {**sleeper, "issue": "BRK-C", "command": ["sh", "-c", "echo ph=$API_TOKEN"]})
        ended_ph = results(await logs(client, ended["id"]))["ph"]
        with anyio.fail_after(30):  # its placeholder is dropped when the container is removed
            while any(ended_ph in s.placeholders.values() for s in broker._sandboxes.values()):
                await anyio.sleep(0.2)
        box = await run(client, {"issue": "BRK-A", "command": ["sh", "-c", worker_script(ca.ca_path.read_text())],
                                 "secrets": ["API_TOKEN"], "env": {"OTHER_PH": other_ph, "ENDED_PH": ended_ph},
                                 "wait": False})
        inspect = sandbox_world.docker.inspect_container(box["id"])
        text = await wait_for_log(client, box["id"], "phase1=done", timeout=150)
        response = await client.put("/api/v1/secrets/API_TOKEN", json={"value": ROTATED})
        assert response.status_code == 204
        text = await wait_for_log(client, box["id"], "phase2=done", timeout=60)
        store = kernel.backends.secrets.store
        lock_store(kernel)  # the store locked
        try:
            text = await wait_for_log(client, box["id"], "done=1", timeout=60)
        finally:
            use_store(kernel, store)
        await client.delete(f"/api/v1/sandboxes/{other['id']}")
        registry = kernel.metrics_registry
        seen = list(upstream.requests)
        audit = audit_for(kernel)
    audit.close()
    audit_raw = audit.path.read_bytes()
    out = results(text)
    assert box["runtime"] == runtime
    ph = out["env_value"]
    assert ph.startswith("risoluto-placeholder-API_TOKEN-") and ph not in (other_ph, ended_ph)
    # the real value is nowhere the worker can look: environment, /proc, CODEX_HOME, CA files, logs
    for where in (text, json.dumps(inspect), json.dumps(box), json.dumps(other)):
        assert REAL not in where and ROTATED not in where and OPENAI not in where
    assert f"API_TOKEN={ph}" in json.dumps(inspect["Config"]["Env"])
    assert int(out["bundle_certs"]) > 10  # the image's roots plus the sandbox CA
    # curl and python, verification on, through the sandbox's own CA: the origin got the real value
    assert out["curl"].startswith("{") and json.loads(out["curl"])["authorization_sha256"] == digest(REAL)
    assert out["python"] == f"200:{digest(REAL)}"
    # CODEX_HOME/auth.json holds this sandbox's placeholder for the brokered OPENAI_API_KEY, which works
    assert out["auth_key"].startswith("risoluto-placeholder-OPENAI_API_KEY-")
    assert json.loads(out["openai"])["authorization_sha256"] == digest(OPENAI)
    for name in ("wrong_path", "wrong_method", "in_query", "other_header", "wrong_host", "other_sandbox",
                 "ended_sandbox"):
        assert out[name] == "403", (name, out[name])
    # a non-credentialed host is an end-to-end tunnel: the worker sees the origin's own certificate
    assert out["plain_untrusted"] == "000" and out["plain_with_origin_ca"] == "200"
    assert out["plain_issuer"] == "risoluto test CA"
    # server-sent events arrive one by one (0.4 s apart at the origin)
    times = [float(t) for t in out["sse"].split(",")]
    assert len(times) == 3 and times[2] - times[0] >= 0.6, times
    assert json.loads(out["rotated"])["authorization_sha256"] == digest(ROTATED)
    assert out["locked"] == "503"
    # nothing refused ever reached the origin
    targets = [r["target"] for r in seen]
    assert targets == ["/v1/models", "/v1/py", "/openai/models", "/", "/sse", "/v1/rotated"], targets
    assert registry.get_sample_value("risoluto_egress_brokered_requests_total",
                                     {"outcome": "credential_not_allowed"}) == 7
    # the decision audit: one line per terminated request, names only, never a value or placeholder
    for text_ in (REAL, ROTATED, OPENAI, ph, other_ph, ended_ph, "risoluto-placeholder"):
        assert text_.encode() not in audit_raw, text_
    mine = [r for r in map(json.loads, audit_raw.splitlines()) if r["issue"] == "BRK-A"]
    assert [(r["path"], r["credential"]) for r in mine if r["reason"] == "credential_injected"] == [
        ("/v1/models", "API_TOKEN"), ("/v1/py", "API_TOKEN"), ("/openai/models", "OPENAI_API_KEY"),
        ("/sse", "API_TOKEN"), ("/v1/rotated", "API_TOKEN")]
    assert sum(r["reason"] == "credential_not_allowed" for r in mine) == 7
    assert [r["reason"] for r in mine if r["reason"] == "secrets_locked"] == ["secrets_locked"]


async def test_doctor_probe_proves_brokering_from_inside(sandbox_world: Any) -> None:  # noqa: F811
    from risoluto.doctor import run_probes
    from risoluto.plugins.egress.broker_probes import ITEM

    async with broker_world(sandbox_world, "runc") as (client, kernel, upstream, ca):
        found = {r.item: r for r in await run_probes(kernel)}
        seen = list(upstream.requests)
    row = found[ITEM]
    assert row.status == "PASS", row.reason
    assert "API_TOKEN" in row.reason and "OPENAI_API_KEY" in row.reason and REAL not in row.reason
    assert seen == []  # the refused probe requests never reached the origin
