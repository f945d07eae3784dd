"""The default egress enforcer: an internal Docker network whose only way out is the kernel's proxy.

At app start (only with a non-empty ``codex.sandbox.egressAllowlist``) it:

1. creates (or reuses) the labelled Docker network ``risoluto-egress`` with ``internal: true``
   (no route out, no outside DNS) and inter-container traffic disabled; an existing network
   of that name that is not internal is refused;
2. binds the proxy to that network's gateway address only, on a free port;
3. adds the host firewall rules (``host_firewall``) so workers reach that port and nothing
   else on the host, when it runs as root (else the doctor reports the exposure).

Per launch, ``attach`` moves the worker onto the internal network, gives it
``HTTP(S)_PROXY`` with a credential of its own (registered with the proxy once the
container exists, removed with it, valid only from that container's address).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from typing import TYPE_CHECKING, Any

import anyio

from risoluto.errors import ApiError, ConfigError, StartupError
from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.doctor import FAIL, PASS, WARN, CheckResult

from ._approvals import approvals_for, issue_hosts_for
from ._audit import audit_for
from ._broker_launch import attach_broker, make_broker
from ._metrics import metrics_for
from ._hosts import Allowlist
from ._firewall import HostFirewall, can_manage
from ._proxy import Client, EgressProxy

if TYPE_CHECKING:
    from risoluto.hookspecs.sandbox import ContainerSpec, LaunchRequest
    from risoluto.kernel import Kernel
    from risoluto.settings import Settings

log = logging.getLogger("risoluto.egress")

NETWORK = "risoluto-egress"
LABELS = {"risoluto.managed": "true", "risoluto.network": "egress"}
NO_PROXY = "localhost,127.0.0.1,::1"
LOCATE_THREADS = 8  # engine look-ups of a sandbox's address at its first proxied request


def docker_client() -> Any:
    import os

    from risoluto.docker_transport import from_env

    return from_env(os.environ, timeout=30)  # one pool, and no ~/.netrc credentials sent to the engine


def ensure_network(client: Any, name: str) -> dict[str, Any]:
    """The egress network's attributes, creating it when missing; refuses a non-internal one."""
    found = [n for n in client.networks.list() if n.name == name]
    if found:
        network = client.networks.get(found[0].id)
    else:
        network = client.networks.create(
            name, driver="bridge", internal=True, labels=LABELS, check_duplicate=True,
            options={"com.docker.network.bridge.enable_icc": "false"},
        )
        network.reload()
    attrs = network.attrs
    if not attrs.get("Internal"):
        raise StartupError(
            f"egress: Docker network {name!r} exists but is not internal (it has a route out); "
            f"remove it (docker network rm {name}) and restart"
        )
    return attrs


def gateway_of(attrs: dict[str, Any]) -> tuple[str, str]:
    """(gateway IPv4 address, host bridge interface) of a bridge network."""
    configs = (attrs.get("IPAM") or {}).get("Config") or []
    gateway = next((c.get("Gateway") for c in configs if c.get("Gateway") and ":" not in c["Gateway"]), "")
    if not gateway:
        raise StartupError(f"egress: Docker network {attrs.get('Name')!r} has no IPv4 gateway to bind the proxy to")
    bridge = (attrs.get("Options") or {}).get("com.docker.network.bridge.name") or f"br-{attrs['Id'][:12]}"
    return gateway, bridge


def hostnet_runtime(info: dict[str, Any], runtime: str) -> bool:
    """Whether ``runtime`` (e.g. runsc) is registered with ``--network=host`` (gVisor hostinet)."""
    args = (info.get("Runtimes") or {}).get(runtime, {}).get("runtimeArgs") or []
    return any(a in ("--network=host", "-network=host") for a in args)


class DockerEgressEnforcer:
    """Internal network + proxy on its gateway + host firewall (see the module docstring)."""

    name = "docker-proxy"

    def __init__(self, settings: Settings, network: str = NETWORK):
        self.settings = settings
        self.network = network
        self.proxy: EgressProxy | None = None
        self.issue_hosts: Any = None
        self.firewall: HostFirewall | None = None
        self.gateway = ""
        self.bridge = ""
        self.port = 0
        self._protection = "not started"
        self._task: asyncio.Task[None] | None = None
        self._stopping: anyio.Event | None = None
        self._docker: Any = None
        self._locates: Any = None

    async def start(self, kernel: Kernel) -> None:
        self._locates = anyio.CapacityLimiter(LOCATE_THREADS)
        self._docker = await anyio.to_thread.run_sync(docker_client)
        attrs = await anyio.to_thread.run_sync(ensure_network, self._docker, self.network)
        self.gateway, self.bridge = gateway_of(attrs)
        self.issue_hosts = issue_hosts_for(kernel)
        self.proxy = EgressProxy(lambda: kernel.settings.egress, kernel.hooks.egress_decision, metrics_for(kernel),
                                 audit=audit_for(kernel), approvals=approvals_for(kernel),
                                 issue_hosts=self.issue_hosts, approve=kernel.hooks.egress_decide)
        self.proxy.broker = make_broker(kernel)  # None unless egress.credentials is set
        await self._serve(self.proxy)
        why = can_manage()
        if why:
            self._protection = f"none: {why}; host services are reachable from workers via {self.gateway}"
            log.error("egress: %s", self._protection)
        else:
            self.firewall = HostFirewall(self.bridge, self.gateway, self.port)
            try:
                await self.firewall.install()
            except StartupError:
                await self.stop()
                raise
            self._protection = f"firewall: {self.bridge} may reach only {self.gateway}:{self.port} on the host"
        log.info("egress proxy on %s:%d (network %s, bridge %s)", self.gateway, self.port, self.network, self.bridge)

    async def _serve(self, proxy: EgressProxy) -> None:
        """Run the proxy in a task of its own for the app's lifetime (start() returns meanwhile)."""
        ready = anyio.Event()
        self._stopping = stopping = anyio.Event()
        failure: list[BaseException] = []

        async def run() -> None:
            try:
                async with anyio.create_task_group() as tg:
                    _, self.port = await tg.start(proxy.serve, self.gateway)
                    ready.set()
                    await stopping.wait()
                    tg.cancel_scope.cancel()
            except Exception as exc:  # reported by start(); never an unretrieved task exception
                failure.append(exc)
                ready.set()

        # Quart/hypercorn run on asyncio; the proxy outlives this call, so it gets its own task.
        self._task = asyncio.get_running_loop().create_task(run())
        await ready.wait()
        if failure:
            raise StartupError(f"egress: the proxy cannot listen on {self.gateway}: {failure[0]}")

    async def stop(self) -> None:
        if self.proxy is not None:  # held requests are denied (fail closed), and told so, before the proxy goes
            await self.proxy.release_held()
        if self.firewall is not None:
            await self.firewall.remove()
        if self._stopping is not None and self._task is not None:
            self._stopping.set()
            with anyio.move_on_after(10):
                await self._task
        self._protection = "stopped"

    def status(self) -> dict[str, Any]:
        return {"bind": f"{self.gateway}:{self.port}", "network": self.network, "bridge": self.bridge,
                "host_protection": self._protection}

    # -- per launch ----------------------------------------------------------------------
    def attach(self, spec: ContainerSpec, request: LaunchRequest, settings: Settings) -> None:
        if self.proxy is None:
            raise ApiError(503, "egress_unavailable", "The egress proxy is not running.")
        try:
            allowlist = Allowlist(settings.codex.sandbox.egress_allowlist)  # this launch's own rules
        except ConfigError as exc:
            raise ApiError(400, "invalid_config", str(exc)) from None
        username = f"sbx-{secrets.token_hex(6)}"
        secret = secrets.token_urlsafe(24)
        url = f"http://{username}:{secret}@{self.gateway}:{self.port}"
        spec.network = self.network
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            spec.env[name] = url
        spec.env["NO_PROXY"] = spec.env["no_proxy"] = NO_PROXY
        issue = "" if request.dry_run else request.issue
        if issue and self.issue_hosts is not None:  # hosts granted to this issue by allow-issue
            spec.policy["egressIssueHosts"] = list(self.issue_hosts.entries(issue))
        proxy = self.proxy

        async def created(container_id: str) -> None:
            async def locate() -> set[str]:
                # threads of its own: on a frozen engine this waits, and must not take anyio's
                # shared threads from routes that do not need the engine
                return await anyio.to_thread.run_sync(self._addresses, container_id, limiter=self._locates)

            proxy.register(Client(username=username, secret=secret.encode(), allowlist=allowlist,
                                  sandbox=container_id, issue=issue, locate=locate))

        async def removed(container_id: str) -> None:
            proxy.unregister(username)

        spec.on_created.append(created)
        spec.on_removed.append(removed)
        if proxy.broker is not None and not request.dry_run:
            attach_broker(proxy.broker, spec, request, settings, username, self._docker)

    def _addresses(self, container_id: str) -> set[str]:
        """The container's addresses on the egress network: its credential is valid only from there."""
        container = self._docker.containers.get(container_id)
        net = (container.attrs.get("NetworkSettings", {}).get("Networks") or {}).get(self.network) or {}
        found = {a for a in (net.get("IPAddress"), net.get("GlobalIPv6Address")) if a}
        if not found:
            raise LookupError("the sandbox has no address on the egress network yet")
        return found


@hookimpl
def risoluto_egress_enforcer(settings: Settings) -> DockerEgressEnforcer | None:
    return DockerEgressEnforcer(settings) if settings.sandbox.runtime == "docker" else None


@hookimpl
def risoluto_doctor_checks(kernel: Kernel) -> list[CheckResult]:
    sandbox = kernel.settings.codex.sandbox
    if not sandbox.egress_allowlist:
        return []
    try:
        client = docker_client()
        try:
            info = client.info()
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001 - any engine failure is reported, not raised
        return [CheckResult(item="egress network", status=FAIL, fix="start the Docker engine",
                            reason=f"Docker engine not reachable: {type(exc).__name__}")]
    results = [_embedded_dns_check(info)]
    if sandbox.security.gvisor:
        results.append(_gvisor_check(info))
    return results


def _engine_fixed(version: str) -> bool:
    """Whether this engine has the fix for CVE-2024-29018 (26.0.0, 25.0.5, 23.0.11)."""
    parts = [int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3]] + [0, 0, 0]
    major, minor, patch = parts[:3]
    return (major, minor, patch) >= (26, 0, 0) or (major == 25 and patch >= 5) or (major == 23 and patch >= 11)


def _loopback_resolvers(path: str = "/etc/resolv.conf") -> list[str]:
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError:
        return []
    found = [line.split()[1] for line in lines if line.startswith("nameserver") and len(line.split()) > 1]
    return [ns for ns in found if ns.startswith("127.") or ns == "::1"]


def _embedded_dns_check(info: dict[str, Any]) -> CheckResult:
    item = "egress DNS"
    version = str(info.get("ServerVersion", ""))
    loopback = _loopback_resolvers()
    if loopback and not _engine_fixed(version):
        return CheckResult(
            item=item, status=FAIL,
            reason=f"Docker {version} with a loopback resolver ({loopback[0]}) answers workers' DNS from the "
                   "host namespace (CVE-2024-29018): names can leak out of the internal network",
            fix="upgrade the engine (>= 26.0) or give Docker a non-loopback resolver",
        )
    return CheckResult(item=item, status=PASS, reason="Docker's embedded DNS cannot forward workers' queries out "
                       "of the internal network")


def _gvisor_check(info: dict[str, Any]) -> CheckResult:
    item = "egress under gVisor"
    if hostnet_runtime(info, "runsc"):
        return CheckResult(
            item=item, status=WARN,
            reason="runsc is registered with --network=host: gVisor hands network calls to the host kernel, "
                   "inside the container's own network namespace; egress is still confined by the internal network",
            fix="register runsc without --network=host where gVisor's own network stack works (docs/egress.md)",
        )
    return CheckResult(item=item, status=PASS, reason="runsc uses gVisor's own network stack on the internal network")
