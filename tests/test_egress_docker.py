"""Egress enforcement with real sandboxes on a real Docker engine (runc and runsc).

Targets are servers this test runs: HTTP, TLS (throwaway CA) and DNS in a network namespace
of its own, reached by the host through a veth pair (``egress.allowPrivateNetworks`` lists
that /30 only), plus a listener on the egress network's gateway standing in for a host
service. Workers run curl and python3 inside the sandbox; every bypass class of docs/egress.md is
attempted from inside and must fail, while allowed names work.
"""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path
from typing import Any, AsyncIterator

import anyio
import anyio.abc
import attrs
import pytest

from docker_util import docker_engine, logs, run, sandbox_world, wait_for_log  # noqa: F401
from egress_support import CA, DnsServer, TargetNamespace, serve_origin
from risoluto.kernel import Kernel
from risoluto.settings import deep_merge

pytestmark = [pytest.mark.anyio, pytest.mark.docker]

ALLOW = ["allowed.test", "*.wild.test", "private.test", "pinned.test"]


@attrs.define
class Targets:
    ns: TargetNamespace
    ca: CA
    dns: DnsServer
    origins: dict[str, Any]


@contextlib.asynccontextmanager
async def targets(tmp: Path) -> AsyncIterator[Targets]:
    """HTTP (80, 8080), TLS (443) and DNS (53) servers inside a network namespace of the test."""
    ca = CA(tmp)
    with TargetNamespace() as ns:
        socks = ns.sockets([(socket.SOCK_STREAM, 80), (socket.SOCK_STREAM, 443), (socket.SOCK_STREAM, 8080),
                            (socket.SOCK_DGRAM, 53)])
        async with anyio.create_task_group() as tg:
            origins = {
                "http": await serve_origin(tg, socks[0], "http"),
                "https": await serve_origin(tg, socks[1], "https", ca.server_context()),
                "alt": await serve_origin(tg, socks[2], "alt"),
            }
            names = ("allowed.test", "a.wild.test", "other.test", "unlisted.test")
            dns = DnsServer({name: [ns.ns_ip] for name in names} | {"private.test": ["10.77.0.1"]})
            await dns.start(tg, raw=socks[3])
            yield Targets(ns, ca, dns, origins)
            tg.cancel_scope.cancel()


@attrs.define
class Env:
    client: Any
    kernel: Kernel
    docker: Any
    targets: Targets
    gateway: str
    host_service_port: int
    host_service_hits: list[str]

    async def set_allowlist(self, allowlist: list[str]) -> None:
        """The operator's way: PUT the config overlay (applies to the next launches)."""
        response = await self.client.put("/api/v1/config/overlay",
                                         json={"codex": {"sandbox": {"egressAllowlist": allowlist}}})
        assert response.status_code == 200, await response.get_json()

    async def launch(self, issue: str, script: str, env: dict[str, str] | None = None,
                     wait: bool = False) -> dict[str, Any]:
        return await run(self.client, {"issue": issue, "command": ["sh", "-c", script], "env": env or {},
                                       "wait": wait})

    async def output(self, record: dict[str, Any], until: str) -> dict[str, str]:
        return results(await wait_for_log(self.client, record["id"], until, timeout=150))

    def proxy_url(self, record: dict[str, Any]) -> str:
        env = dict(e.split("=", 1) for e in self.docker.inspect_container(record["id"])["Config"]["Env"])
        return env["HTTPS_PROXY"]


@contextlib.asynccontextmanager
async def egress_env(world: Any, runtime: str, egress: Any = None) -> AsyncIterator[Env]:
    """``egress(targets)`` -> extra ``egress`` settings of the config file (deploy-time or looser
    keys, which an overlay may not set)."""
    async with targets(world.tmp) as t, anyio.create_task_group() as tg:
        overrides = {
            "codex": {"sandbox": {"egressAllowlist": ALLOW, "security": {"gvisor": runtime == "runsc"}}},
            "egress": deep_merge({"resolver": f"{t.ns.ns_ip}:53", "allowPrivateNetworks": [t.ns.cidr],
                                  "hosts": {"pinned.test": t.ns.ns_ip}, "idleTimeoutS": 5.0, "maxConnections": 40},
                                 egress(t) if egress else {}),
        }
        # the same config as a file, so that overlay changes merge over it as in production; the file
        # also allows other.test: an overlay may only narrow the file's allowlist, and sandbox B's
        # overlay narrows it to other.test alone
        config_file = world.tmp / "config.yaml"
        file_list = {"codex": {"sandbox": {"egressAllowlist": [*ALLOW, "other.test"]}}}
        config_file.write_text(json.dumps(world.config(deep_merge(overrides, file_list))))
        client, kernel = await world.app(overrides, env={"RISOLUTO_CONFIG": str(config_file)})
        gateway = kernel.backends.egress.status()["bind"].rsplit(":", 1)[0]
        hits: list[str] = []
        service = await anyio.create_tcp_listener(local_host=gateway, local_port=0)

        async def record(stream: Any) -> None:
            hits.append("connection")
            await stream.aclose()

        async def serve_service() -> None:
            async with service:
                await service.serve(record)

        tg.start_soon(serve_service)
        yield Env(client, kernel, world.docker, t, gateway, service.extra(anyio.abc.SocketAttribute.local_port), hits)
        tg.cancel_scope.cancel()


def results(logs: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in logs.splitlines() if "=" in line and not line.startswith(" "))


# Probes run inside a worker: each prints name=result. curl prints "<http code>/<CONNECT code>"
# and " rc<exit status>" on failure; python prints ok / closed / timeout.
CURL = "curl -sS -o /dev/null --connect-timeout 3 -m 8 -w '%{http_code}/%{http_connect}'"
SNI_PY = r"""
import base64, os, socket, ssl, sys
proxy = os.environ["HTTPS_PROXY"][len("http://"):]
cred, hostport = proxy.rsplit("@", 1)
host, port = hostport.rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=5)
auth = base64.b64encode(cred.encode()).decode()
s.sendall(f"CONNECT allowed.test:443 HTTP/1.1\r\nProxy-Authorization: Basic {auth}\r\n\r\n".encode())
head = s.recv(4096)
ctx = ssl.create_default_context(cafile="/tmp/ca.pem")
ctx.check_hostname = False
try:
    t = ctx.wrap_socket(s, server_hostname=sys.argv[1])
    t.sendall(b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
    print("ok" if b"200 OK" in t.recv(4096) else "bad")
except (ssl.SSLError, OSError):
    print("closed")
"""
UDP_PY = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
q = bytes.fromhex("abcd01000001000000000000") + b"\x0bworker-udp1\x04test\x00\x00\x01\x00\x01"
try:
    s.sendto(q, (sys.argv[1], 53)); s.recvfrom(512); print("answered")
except OSError:
    print("timeout")
"""
RESOLVE_PY = r"""
import socket
try:
    socket.getaddrinfo("worker-dns2.test", 80); print("resolved")
except OSError:
    print("failed")
"""


def probe_script(env: Env) -> str:
    ip, gw = env.targets.ns.ns_ip, env.gateway
    ca = env.targets.ca.ca_path.read_text()
    lines = [
        f"cat > /tmp/ca.pem <<'EOF'\n{ca}EOF",
        f"cat > /tmp/sni.py <<'EOF'\n{SNI_PY}EOF",
        f"cat > /tmp/udp.py <<'EOF'\n{UDP_PY}EOF",
        f"cat > /tmp/resolve.py <<'EOF'\n{RESOLVE_PY}EOF",
        "c() { name=$1; shift; out=$(" + CURL + " \"$@\" 2>/dev/null); rc=$?; echo \"$name=$out rc$rc\"; }",
        "c http_allowed http://allowed.test/",
        "c https_allowed --cacert /tmp/ca.pem https://allowed.test/",
        "c https_wildcard --cacert /tmp/ca.pem https://a.wild.test/",
        "c http_mixed_case http://ALLOWED.Test./",
        "c http_pinned http://pinned.test/",
        "c http_unlisted http://unlisted.test/",
        "c https_unlisted --cacert /tmp/ca.pem https://unlisted.test/",
        "c https_wildcard_apex --cacert /tmp/ca.pem https://wild.test/",
        f"c ip_literal http://{ip}/",
        f"c ip_literal_https -k https://{ip}/",
        "c other_port http://allowed.test:8080/",
        "c https_other_port -k https://allowed.test:8080/",
        "c private_name http://private.test/",
        "c no_credential --proxy http://$(echo $HTTP_PROXY | cut -d@ -f2) http://allowed.test/",
        "c stolen_credential --proxy \"$STOLEN\" http://other.test/",
        f"c direct_tcp --noproxy '*' http://{ip}/",
        f"c direct_tcp_tls --noproxy '*' -k https://{ip}/",
        f"c host_service --noproxy '*' http://{gw}:{env.host_service_port}/",
        f"echo direct_udp=$(python3 /tmp/udp.py {ip})",
        f"echo gateway_dns=$(python3 /tmp/udp.py {gw})",
        "echo worker_dns=$(timeout 15 getent hosts worker-dns1.test >/dev/null && echo resolved || echo failed)",
        "echo worker_resolve=$(timeout 15 python3 /tmp/resolve.py || echo failed)",
        "echo sni_other=$(python3 /tmp/sni.py other.test)",
        "echo sni_same=$(python3 /tmp/sni.py allowed.test)",
        "echo caps=$(grep CapEff /proc/self/status | tr -d '\\t')",
        "echo done=1",
    ]
    return "\n".join(lines)


FLOOD_PY = r"""
import os, socket, time
proxy = os.environ["HTTP_PROXY"].rsplit("@", 1)[1]
host, port = proxy.rsplit(":", 1)
held = []
for round in range(40):  # keep ~40 slow-loris connections open (twice this sandbox's share) and spray garbage
    held = [s for s in held if s.fileno() >= 0][-40:]
    for i in range(10):
        try:
            s = socket.create_connection((host, int(port)), timeout=2); s.sendall(b"GET http://allowed")
            held.append(s)
            g = socket.create_connection((host, int(port)), timeout=2); g.sendall(os.urandom(2048)); g.close()
        except OSError:
            pass
    if round == 3:
        print("flood=started", flush=True)
    time.sleep(1)
"""


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
async def test_bypass_classes_fail_and_allowed_names_work(sandbox_world: Any, runtime: str) -> None:  # noqa: F811
    async with egress_env(sandbox_world, runtime) as env:
        # sandbox B: its own allowlist (other.test only), set through the overlay before its launch
        await env.set_allowlist(["other.test"])
        other_script = (f"c() {{ echo \"$1=$({CURL} $2 2>/dev/null)\"; }}; c own http://other.test/; "
                        "c foreign http://allowed.test/; echo ready=1; sleep 60")
        other = await env.launch("EGR-B", other_script)
        other_out = await env.output(other, "ready=1")
        stolen = env.proxy_url(other)
        await env.set_allowlist(ALLOW)
        # sandbox C floods the proxy (slow loris, garbage) while A is served
        flood = await env.launch("EGR-C", f"cat > /tmp/f.py <<'EOF'\n{FLOOD_PY}EOF\npython3 /tmp/f.py")
        await env.output(flood, "flood=started")
        box = await env.launch("EGR-A", probe_script(env), env={"STOLEN": stolen}, wait=True)
        out = results(await logs(env.client, box["id"]))
        assert box["exit_code"] == 0 and out.get("done") == "1", out
        for record in (other, flood):
            await env.client.delete(f"/api/v1/sandboxes/{record['id']}")
        registry = env.kernel.metrics_registry
        origins = env.targets.origins
        dns_queries = list(env.targets.dns.queries)
        hits = list(env.host_service_hits)
    assert box["runtime"] == runtime and other["policy"]["egressAllowlist"] == ["other.test"]
    # two sandboxes, two allowlists: each gets only its own rules
    assert other_out["own"].startswith("200/") and other_out["foreign"].startswith("403/"), other_out
    # allowed names work, over HTTP and HTTPS (CONNECT), exact, wildcard, normalised, pinned
    for name in ("http_allowed", "https_allowed", "https_wildcard", "http_mixed_case", "http_pinned"):
        assert out[name].startswith("200/"), (name, out[name])
    # every bypass class fails
    for name in ("http_unlisted", "ip_literal", "other_port", "private_name"):
        assert out[name].startswith("403/"), (name, out[name])
    for name in ("https_unlisted", "https_wildcard_apex", "ip_literal_https", "https_other_port"):
        assert "/403" in out[name] and not out[name].endswith("rc0"), (name, out[name])
    assert out["no_credential"].startswith("407/"), out["no_credential"]
    assert out["stolen_credential"].startswith("407/"), out["stolen_credential"]
    for name in ("direct_tcp", "direct_tcp_tls", "host_service"):
        assert out[name].startswith("000/") and not out[name].endswith("rc0"), (name, out[name])
    assert out["direct_udp"] == "timeout" and out["gateway_dns"] == "timeout"
    assert out["worker_dns"] == "failed" and out["worker_resolve"].startswith("failed"), out
    assert out["sni_other"] == "closed" and out["sni_same"] == "ok"
    assert out["caps"] == "CapEff:0000000000000000"  # nothing was added back
    # nothing reached the targets or the host service directly, and workers never asked our DNS
    assert hits == []
    assert not [q for q in dns_queries if q.startswith("worker-")]
    assert all(r["headers"].get("Host") in ("allowed.test", "a.wild.test", "pinned.test", "other.test")
               for origin in origins.values() for r in origin.requests)
    assert origins["alt"].requests == []  # the other port was never reached
    # the flood was cut down to its share and timed out, while everyone else was served
    for reason in ("too_many_connections", "header_timeout"):
        assert registry.get_sample_value("risoluto_egress_decisions_total", {"verdict": "deny", "reason": reason}) > 0
