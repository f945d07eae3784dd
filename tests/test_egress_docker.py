"""Egress enforcement with real sandboxes on a real Docker engine (runc and runsc).

Targets are servers this test runs: HTTP, TLS (throwaway CA) and DNS in a network namespace
of its own, reached by the host through a veth pair (``egress.allowPrivateNetworks`` lists
that /30 only), plus a listener on the egress network's gateway standing in for a host
service. Workers run curl and python3 inside the sandbox; every bypass class of SPEC 5 is
attempted from inside and must fail, while allowed names work.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any, AsyncIterator

import anyio
import anyio.abc
import attrs
import pytest

from egress_support import CA, DnsServer, TargetNamespace, serve_origin
from risoluto.kernel import Kernel
from risoluto.settings import Settings, build_settings

pytestmark = [pytest.mark.anyio, pytest.mark.docker]

IMAGE = os.environ.get("RISOLUTO_TEST_IMAGE", "risoluto-test:latest")
ALLOW = ["allowed.test", "*.wild.test", "private.test", "pinned.test"]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def _docker() -> Any:
    try:
        import docker

        client = docker.from_env(timeout=60)
        client.ping()
        client.images.get(IMAGE)
        return client
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("CI") == "true":
            pytest.fail(f"Docker engine or image {IMAGE} unavailable under CI: {exc}")
        pytest.skip(f"Docker engine or image {IMAGE} unavailable: {exc}")


@attrs.define
class World:
    kernel: Kernel
    ns: TargetNamespace
    ca: CA
    dns: DnsServer
    origins: dict[str, Any]
    gateway: str
    host_service_port: int
    host_service_hits: list[str]
    docker: Any

    def settings(self, allowlist: list[str]) -> Settings:
        base = self.kernel.settings
        sandbox = attrs.evolve(base.codex.sandbox, egress_allowlist=allowlist)
        return attrs.evolve(base, codex=attrs.evolve(base.codex, sandbox=sandbox))


@pytest.fixture(scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    client = _docker()
    tmp = tmp_path_factory.mktemp("egress")
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
            dns = DnsServer({name: [ns.ns_ip] for name in ("allowed.test", "a.wild.test", "other.test",
                                                          "unlisted.test")} | {"private.test": ["10.77.0.1"]})
            await dns.start(tg, raw=socks[3])
            config = {
                "codex": {"sandbox": {"egressAllowlist": ALLOW, "image": IMAGE}},
                "egress": {"resolver": f"{ns.ns_ip}:53", "allowPrivateNetworks": [ns.cidr],
                           "hosts": {"pinned.test": ns.ns_ip}, "idleTimeoutS": 5.0, "maxConnections": 40},
            }
            kernel = Kernel(build_settings(config, None, {"DATA_DIR": str(tmp / "data")}))
            async with kernel.running():
                gateway = kernel.state["egress.enforcer"].status()["bind"].rsplit(":", 1)[0]
                hits: list[str] = []
                service = await anyio.create_tcp_listener(local_host=gateway, local_port=0)

                async def record(stream: Any) -> None:
                    hits.append("connection")
                    await stream.aclose()

                async def serve_service() -> None:
                    async with service:
                        await service.serve(record)

                tg.start_soon(serve_service)
                yield World(kernel, ns, ca, dns, origins, gateway, service.extra(anyio.abc.SocketAttribute.local_port),
                            hits, client)
            tg.cancel_scope.cancel()


class Sandbox:
    """A sandbox launched the way the runtime does: spec from the hooks, lifecycle callbacks."""

    def __init__(self, world: World, allowlist: list[str], runtime: str, command: str, env: dict[str, str]):
        self.world, self.runtime = world, runtime
        self.settings = world.settings(allowlist)
        self.command, self.env = command, env
        self.container: Any = None
        self.spec: Any = None

    async def start(self) -> None:
        from risoluto.hookspecs.sandbox import ContainerSpec, LaunchRequest

        spec = ContainerSpec(name=f"rsl-egress-test-{os.urandom(4).hex()}", image=IMAGE,
                             command=["sh", "-c", self.command], env=dict(self.env))
        self.world.kernel.hooks.sandbox_spec(spec, LaunchRequest(issue="egress-test"), self.settings)
        self.spec = spec
        self.container = await anyio.to_thread.run_sync(lambda: self.world.docker.containers.create(
            spec.image, spec.command, name=spec.name, environment=spec.env, network=spec.network,
            labels=spec.labels, user="1000:1000", cap_drop=["ALL"], security_opt=["no-new-privileges"],
            runtime=self.runtime, dns=[self.world.ns.ns_ip],  # a leak would reach our DNS server
        ))
        for callback in spec.on_created:
            await callback(self.container.id)
        await anyio.to_thread.run_sync(self.container.start)

    async def wait(self, timeout: float = 120) -> str:
        await anyio.to_thread.run_sync(lambda: self.container.wait(timeout=timeout))
        return (await anyio.to_thread.run_sync(self.container.logs)).decode()

    async def remove(self) -> None:
        await anyio.to_thread.run_sync(lambda: self.container.remove(force=True))
        for callback in self.spec.on_removed:
            await callback(self.container.id)

    def proxy_url(self) -> str:
        env = dict(e.split("=", 1) for e in self.world.docker.containers.get(self.container.id).attrs["Config"]["Env"])
        return env["HTTPS_PROXY"]


@contextlib.asynccontextmanager
async def sandbox(world: World, runtime: str, command: str, allowlist: list[str] | None = None,
                  env: dict[str, str] | None = None) -> AsyncIterator[Sandbox]:
    box = Sandbox(world, ALLOW if allowlist is None else allowlist, runtime, command, env or {})
    try:
        await box.start()
        yield box
    finally:
        if box.container is not None:
            await box.remove()


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


def probe_script(world: World) -> str:
    ip, gw = world.ns.ns_ip, world.gateway
    ca = world.ca.ca_path.read_text()
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
        f"c host_service --noproxy '*' http://{gw}:{world.host_service_port}/",
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
async def test_bypass_classes_fail_and_allowed_names_work(world: World, runtime: str) -> None:
    other_box_script = (f"c() {{ echo \"$1=$({CURL} $2 2>/dev/null)\"; }}; c own http://other.test/; "
                        "c foreign http://allowed.test/; echo ready=1; sleep 90")
    async with sandbox(world, runtime, other_box_script, allowlist=["other.test"]) as other:
        stolen = other.proxy_url()
        with anyio.fail_after(60):
            while "ready=1" not in (await anyio.to_thread.run_sync(other.container.logs)).decode():
                await anyio.sleep(0.5)
        other_out = results((await anyio.to_thread.run_sync(other.container.logs)).decode())
        async with sandbox(world, runtime, f"cat > /tmp/f.py <<'EOF'\n{FLOOD_PY}EOF\npython3 /tmp/f.py") as flood:
            with anyio.fail_after(60):
                while "flood=started" not in (await anyio.to_thread.run_sync(flood.container.logs)).decode():
                    await anyio.sleep(0.5)
            async with sandbox(world, runtime, probe_script(world), env={"STOLEN": stolen}) as box:
                out = results(await box.wait())
    assert out.get("done") == "1", out
    # two sandboxes, two allowlists: each gets only its own rules
    assert other_out["own"].startswith("200/") and other_out["foreign"].startswith("403/"), other_out
    # allowed names work, over HTTP and HTTPS (CONNECT), exact, wildcard, normalised, pinned
    for name in ("http_allowed", "https_allowed", "https_wildcard", "http_mixed_case", "http_pinned"):
        assert out[name].startswith("200/"), (name, out[name])
    # every bypass class fails
    refused_403 = ("http_unlisted", "ip_literal", "other_port", "private_name")
    for name in refused_403:
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
    # nothing reached the targets or the host service directly, and workers never asked DNS
    assert world.host_service_hits == []
    assert not [q for q in world.dns.queries if q.startswith("worker-")]
    assert all(r["headers"].get("Host") in ("allowed.test", "a.wild.test", "pinned.test", "other.test")
               for origin in world.origins.values() for r in origin.requests)
    assert world.origins["alt"].requests == []  # the other port was never reached
    # the flood was cut down to its share and timed out, while everyone else was served
    registry = world.kernel.metrics_registry
    for reason in ("too_many_connections", "header_timeout"):
        assert registry.get_sample_value("risoluto_egress_decisions_total", {"verdict": "deny", "reason": reason}) > 0
